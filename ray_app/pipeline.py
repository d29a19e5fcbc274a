"""The whole pipeline in one driver: generate (optional) -> prepare -> train -> evaluate -> nightly.

It is what `rerank pipeline` / `jobs/pipeline.py` run on a cluster and what
`rerank demo` runs on the embedded defaults. Each stage publishes its output
atomically on its own, so a pipeline that fails can be re-run: finished stages
are re-done from their inputs (training resumes from its last checkpoint).
A failure names the stage, how long it had run and the error, and leaves the
outputs of the stages before it in place.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import BaseModel

from ray_app.config import PipelineConfig
from ray_app.errors import describe
from ray_app.storage import join, write_json

logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A pipeline stage raised; `stage` names it and `__cause__` is the error."""

    def __init__(self, stage: str, seconds: float, cause: BaseException) -> None:
        super().__init__(
            f"pipeline stage '{stage}' failed after {seconds:.1f} s: {describe(cause)}"
        )
        self.stage = stage


def _run_stage(name: str, cfg: BaseModel) -> dict[str, Any]:
    if name == "generate":
        from ray_app.data.synthetic import generate

        return {"summary": generate(cfg)}
    if name == "prepare":
        from ray_app.data.prepare import run_prepare

        return {"counts": run_prepare(cfg)["counts"]}
    if name == "train":
        from ray_app.training.trainer import run_train

        metrics = run_train(cfg)
        return {k: v for k, v in metrics.items() if k != "history"}
    if name == "evaluate":
        from ray_app.evaluation.evaluate import run_evaluate
        from ray_app.evaluation.report import markdown

        metrics = run_evaluate(cfg)
        print(markdown(metrics), flush=True)
        return {"report": join(cfg.output, "report.md")}
    if name == "nightly":
        from ray_app.batch.nightly import run_nightly

        out = run_nightly(cfg)
        return {k: out[k] for k in ("date", "counts", "latest", "model_version")}
    raise ValueError(f"unknown stage {name!r}")


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns (and writes to
    `<workdir>/pipeline.json`) each stage's output path, seconds and summary."""
    stages = cfg.stage_configs()
    summary: dict[str, Any] = {"workdir": cfg.workdir, "stages": {}}
    for name, stage_cfg in stages.items():
        logger.info("pipeline: stage '%s' starting (output %s)", name, stage_cfg.output)
        t = time.perf_counter()
        try:
            result = _run_stage(name, stage_cfg)
        except Exception as e:
            dt = time.perf_counter() - t
            logger.error("pipeline: stage '%s' failed after %.1f s", name, dt)
            raise StageFailed(name, dt, e) from e
        dt = time.perf_counter() - t
        logger.info("pipeline: stage '%s' done in %.1f s", name, dt)
        summary["stages"][name] = {"output": stage_cfg.output, "seconds": round(dt, 1), **result}
        write_json(join(cfg.workdir, "pipeline.json"), summary)
    print(json.dumps(summary, indent=2, default=str), flush=True)
    return summary
