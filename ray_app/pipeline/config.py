"""Config of the pipeline: every stage's keys under its name, the paths between them
under one `workdir`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from ray_app.config import ConfigError, PathLike, StrictModel, deep_merge, format_errors, read_yaml
from ray_app.stage import Stage

StageName = Literal["generate", "prepare", "train", "evaluate", "nightly"]


class PipelineConfig(StrictModel):
    """Config of the whole pipeline (`rerank pipeline`, `jobs/pipeline.py`): each
    stage's own config keys under its name; the paths that link the stages
    (prepared data, model, evaluation, top-K lists) default to folders of `workdir`."""

    workdir: PathLike
    """Folder (or URI) under which the stages' outputs go: raw/, prepared/, model/, evaluation/,
    topk/.
    """
    generate: dict[str, Any] | None = None
    """Sample data instead of your logs: GenerateConfig keys (`{}` = the defaults); prepare then
    reads the generated files. Leave unset to prepare `prepare.input`. A stage's section holds
    its keys; `config: <that stage's YAML file>` in it reads the file first
    (cluster/configs/train-cluster.yaml), so one file serves the stage's own job and the
    pipeline, and `--set train.epochs=3` still works.
    """
    prepare: dict[str, Any] = Field(default_factory=dict)
    """PrepareConfig keys (or `config: <file>` plus keys to change)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """TrainConfig keys (or `config: <file>` plus keys to change)."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """EvaluateConfig keys (or `config: <file>` plus keys to change)."""
    nightly: dict[str, Any] = Field(default_factory=dict)
    """NightlyConfig keys (or `config: <file>` plus keys to change)."""
    tracking: dict[str, Any] | None = None
    """MLflow tracking for train and evaluate at once (`tracking.mlflow_uri`, `experiment`):
    TrackingConfig keys, under each stage's own `tracking` unless that stage sets them.
    """
    stages: list[StageName] | None = None
    """Stages to run, in pipeline order (default: all; `generate` only when set)."""

    def paths(self) -> dict[str, str]:
        from ray_app.storage import join

        return {
            name: join(self.workdir, name)
            for name in ("raw", "prepared", "model", "evaluation", "topk")
        }

    def _section(self, name: str) -> dict[str, Any]:
        value = dict(getattr(self, name) or {})
        path = value.pop("config", None)
        return deep_merge(read_yaml(Path(path), f"{name}.config: "), value) if path else value

    def stage_configs(self, stages: Sequence[Stage]) -> dict[str, BaseModel]:
        """Every stage's validated config (of `stages`, the pipeline's, in order), linked
        through `workdir`; a bad key in any stage stops the pipeline before the first
        stage starts, naming `stage.key`."""
        p = self.paths()
        raw = {
            "generate": {"output": p["raw"]},
            "prepare": {"output": p["prepared"]},
            "train": {"output": p["model"]},
            "evaluate": {"output": p["evaluation"]},
            "nightly": {"output": p["topk"]},
        }
        raw["generate"] = deep_merge(raw["generate"], self._section("generate"))
        gen_out = raw["generate"]["output"]
        if self.generate is not None:
            files = {"interactions": f"{gen_out}/interactions", "items": f"{gen_out}/items"}
            raw["prepare"]["input"] = files
        for name in ("prepare", "train", "evaluate", "nightly"):
            if self.tracking and name in ("train", "evaluate"):
                raw[name]["tracking"] = dict(self.tracking)
            raw[name] = deep_merge(raw[name], self._section(name))
        prepared = raw["prepare"]["output"]
        model = raw["train"]["output"]
        raw["train"] = {"prepared": prepared, **raw["train"]}
        raw["evaluate"] = {"prepared": prepared, "models": {"reranker": model}, **raw["evaluate"]}
        raw["nightly"] = {"prepared": prepared, "model": model, **raw["nightly"]}
        names = [s.name for s in stages]
        wanted = self.stages or [s for s in names if s != "generate" or self.generate is not None]
        out: dict[str, BaseModel] = {}
        problems: list[str] = []
        for stage in stages:
            if stage.name not in wanted:
                continue
            try:
                out[stage.name] = stage.config.model_validate(raw[stage.name])
            except ValidationError as e:
                problems += [
                    f"  {stage.name}.{line.strip()}"
                    for line in format_errors(stage.config, e, "").splitlines()[1:]
                ]
        if problems:
            raise ConfigError("invalid PipelineConfig config:\n" + "\n".join(problems))
        return out
