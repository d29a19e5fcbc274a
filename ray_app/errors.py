"""Turning exceptions (including ones wrapped by Ray tasks) into one readable line."""

from __future__ import annotations

import re


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


_RAISED = re.compile(r"^(\w+(?:Error|Exception)): (.+)$")


def describe(exc: BaseException) -> str:
    """`Type: message` of the error the user's code raised. Ray Data ships a failed
    UDF's own exception only as traceback text inside the task error; its last
    `SomeError: message` line is the one that names the problem."""
    cause = root_cause(exc)
    if type(cause).__name__ == "UserCodeException":
        raised = [m for line in str(exc).splitlines() if (m := _RAISED.match(line.strip()))]
        raised = [m for m in raised if m.group(1) != "UserCodeException"]
        if raised:
            return f"{raised[-1].group(1)}: {raised[-1].group(2)}"
    return f"{type(cause).__name__}: {cause}"
