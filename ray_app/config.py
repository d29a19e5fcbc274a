"""Loading a stage's config: YAML plus `--set key=value` overrides, checked by its model.

Every stage owns its config model (`<stage package>/config.py`); this module
holds what they share: the strict base model, the loader and the error
messages. Unknown keys and wrong types are errors raised before any work
starts, with the dotted key in the message, because a typo in a cluster job
should fail in a second, not after an hour of compute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are checked,
    and each field's docstring is its description (the configuration reference)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


def no_credentials(path: str) -> str:
    """A URI with a key in it (`s3://KEY:SECRET@bucket/...`, which pyarrow accepts) is
    refused: manifests record each run's resolved config, so the key would be published
    with the outputs. Keys come from the environment or the cloud's own mechanisms."""
    scheme, sep, rest = path.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        raise ValueError(
            f"{scheme}://...@...: credentials do not go in paths (manifests publish them); "
            "set them in the environment (AWS_ACCESS_KEY_ID, ...) or use the cloud's "
            "instance/pod identity"
        )
    return path


PathLike = Annotated[str, Field(min_length=1), AfterValidator(no_credentials)]


def _no_credentials_in(paths: str | list[str]) -> str | list[str]:
    for p in [paths] if isinstance(paths, str) else paths:
        no_credentials(p)
    return paths


Paths = Annotated[str | list[str], AfterValidator(_no_credentials_in)]


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    except ValueError as e:  # a YAML timestamp that is no real day: 2026-02-30
        raise ConfigError(f"override {key}: value {raw!r}: {e}") from e
    return key.split("."), value


def _apply(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section"
            )
        node = nxt
    node[keys[-1]] = value


def format_errors(model: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid {model.__name__} config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def read_yaml(p: Path, what: str = "") -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{what}config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{what}config file {p} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what}config file {p} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    model: type[ConfigT],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> ConfigT:
    """Build a stage config: `base` dict, then the YAML file, then `key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        data = deep_merge(data, read_yaml(Path(path)))
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(data, keys, value)
    if overrides:
        source += " + overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(model, e, source)) from None


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out
