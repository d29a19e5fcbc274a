"""What a stage is, as the CLI, the pipeline and the configuration reference see it.

Each stage package declares one `Stage` in its `stage.py`, beside its config
model and its code; `ray_app/registry.py` lists them. A stage's run function is
named by its import path and imported only when the stage runs, so listing
the stages (the CLI's help, `rerank config`) imports no PyTorch or Ray.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Option:
    """A command-line flag of a stage's command that sets one config key."""

    flag: str
    key: str
    help: str


@dataclass(frozen=True)
class Stage:
    """One stage: its name, config model and run function, and what it reports."""

    name: str
    config: type[BaseModel]
    run_path: str
    """`package.module:function` taking the validated config."""
    summarize: Callable[[Any, Any], dict[str, Any]]
    """(config, the run function's result) -> what the stage reports: the JSON its command
    prints and what the pipeline records in pipeline.json."""
    help: str
    """One line for `rerank --help`."""
    description: str
    examples: tuple[str, ...]
    options: tuple[Option, ...] = ()
    show: Callable[[Any, Any], str] | None = None
    """Text for people the command prints before its summary line (evaluate's report)."""

    def run(self, cfg: BaseModel) -> Any:
        module, _, function = self.run_path.partition(":")
        return getattr(importlib.import_module(module), function)(cfg)

    def summary_line(self, cfg: BaseModel, result: Any) -> str:
        """The summary as one line of JSON: the last line a command prints, for the
        scheduler or script that ran it (`tail -n 1 | jq`)."""
        return json_line(self.summarize(cfg, result))


def json_line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
