"""Turning exceptions (including ones wrapped by Ray tasks) into one readable line."""

from __future__ import annotations


def root_cause(exc: BaseException) -> BaseException:
    """The innermost user exception: Ray wraps task errors, the message is inside."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None or inner is exc:
            break
        exc = inner
    return exc


def describe(exc: BaseException) -> str:
    cause = root_cause(exc)
    return f"{type(cause).__name__}: {cause}"
