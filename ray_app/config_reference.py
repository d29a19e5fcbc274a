"""The configuration reference, generated from the config models themselves.

Every key's type, default and description come from the stages' pydantic
models (descriptions are the fields' docstrings), so the reference cannot
drift from what the code accepts. `rerank config <stage>` prints one stage's
table; the README's copy is rewritten with `rerank config --write README.md`,
and a test fails when it is stale.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from ray_app.stage import Stage

BEGIN = "<!-- BEGIN CONFIG REFERENCE (rerank config --write README.md) -->"
END = "<!-- END CONFIG REFERENCE -->"


def _nested(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_name(annotation: Any) -> str:
    """A short, readable type: `a` | `b` for literals, `X or null` for optionals."""
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return type_name(get_args(annotation)[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = get_args(annotation)
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in get_args(annotation) if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory else field.default
    if value is PydanticUndefined:
        return ""
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) of every key, nested sections flattened."""
    out: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        description = " ".join((field.description or "").split())
        sub = _nested(field.annotation)
        if sub is not None:
            out += rows(sub, f"{prefix}{name}.")
        else:
            key = f"{prefix}{name}"
            out.append((key, type_name(field.annotation), default_text(field), description))
    return out


def stage_markdown(stage: Stage) -> str:
    model = stage.config
    doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
    lines = [
        f"#### `{stage.name}` ({model.__name__})",
        "",
        doc,
        "",
        "| key | type | default | description |",
        "|---|---|---|---|",
    ]
    for key, typ, default, description in rows(model):
        cells = [c.replace("|", "\\|") for c in (default, description)]
        lines.append(f"| `{key}` | {typ} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def reference_markdown(stages: Iterable[Stage]) -> str:
    return "\n".join(stage_markdown(s) for s in stages)


def replace_section(text: str, body: str) -> str:
    """`text` with what lies between BEGIN and END replaced by `body`."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN!r} ... {END!r} section to replace")
    return pattern.sub(lambda _: f"{BEGIN}\n\n{body}\n{END}", text)
