"""Turning exceptions (including ones wrapped by Ray tasks) into one readable line."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

_WRAPPERS = {"UserCodeException", "RayTaskError"}


class BatchFailed(RuntimeError):
    """A batch of input rows could not be processed: the message names the source
    file and rows, then the error the code raised on them."""


def _inner(exc: BaseException) -> BaseException | None:
    """The exception `exc` wraps: a Ray task's `cause`, Ray Train's failure of the
    lowest rank (`worker_failures`) or of its controller, or Python's `__cause__`."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    return getattr(exc, "controller_failure", None) or getattr(exc, "cause", None) or exc.__cause__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost user exception: Ray wraps task errors, the message is inside."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = _inner(exc)
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


# `pyarrow.lib.ArrowNotImplementedError: Unsupported cast ...` in a task's traceback text.
_RAISED = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*(?:Error|Exception|Failed)): (.+)$")
_FRAME = re.compile(r'^File "([^"]+)", line (\d+), in (.+)$')
# Frames that never say where an error was raised: installed libraries, and this
# module's own wrapper (`naming_the_batch`), which only re-raises (matched by its
# path inside the package: on a cluster the code runs from another folder).
_LIBRARY = ("site-packages", "dist-packages", ".pyx", ".pxi", "<frozen", "ray_app/errors.py")


def describe(exc: BaseException) -> str:
    """`Type: message` of the error the code raised, with where it was raised.

    Ray Data ships a failed UDF's own exception only as traceback text inside
    the task error (`UserCodeException: UDF failed to process a data block.`);
    the last `SomeError: message` line that is not Ray's wrapper names the
    problem, and the last frame outside installed libraries says where."""
    cause = root_cause(exc)
    if type(cause).__name__ in _WRAPPERS or type(exc).__name__.startswith("RayTaskError"):
        lines = [line.strip() for line in str(exc).splitlines()]
        found = None
        for i, line in enumerate(lines):
            m = _RAISED.match(line)
            if m and m.group(1) not in _WRAPPERS:
                found = (i, m)
        if found is not None:
            i, m = found
            where = ""
            for line in reversed(lines[:i]):
                f = _FRAME.match(line)
                if f and not any(lib in f.group(1) for lib in _LIBRARY):
                    where = f" (at {f.group(1)}:{f.group(2)} in {f.group(3)})"
                    break
            if m.group(1) == BatchFailed.__name__:
                return f"{m.group(2)}{where}"
            return f"{m.group(1)}: {m.group(2)}{where}"
    if isinstance(cause, BatchFailed):
        return str(cause)
    return f"{type(cause).__name__}: {cause}"


def naming_the_batch(files_arg: int, source_file: str, source_row: str) -> Callable[[F], F]:
    """Decorate a Ray Data batch function so that any error it raises names the
    input file and rows of the batch (from its provenance columns) beside the
    error itself. `files_arg`: the position of the file-name list among the
    function's arguments."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(table, *args: Any, **kwargs: Any):
            try:
                return fn(table, *args, **kwargs)
            except Exception as e:
                files = args[files_arg - 1] if len(args) >= files_arg else []
                raise BatchFailed(
                    f"{_where(table, files, source_file, source_row)}: {type(e).__name__}: {e}"
                ) from e

        return run  # type: ignore[return-value]

    return wrap


def _where(table: Any, files: list[str], source_file: str, source_row: str) -> str:
    try:
        idx = np.unique(table.column(source_file).to_numpy())
        rows = table.column(source_row).to_numpy()
        names = ", ".join(files[i] if 0 <= i < len(files) else str(i) for i in idx[:3])
        return f"{names} rows {int(rows.min())}..{int(rows.max())}"
    except Exception:  # the location is a courtesy; never hide the error behind it
        return "a batch"
