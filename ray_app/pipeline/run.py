"""The whole pipeline in one driver: generate (optional) -> prepare -> train -> evaluate -> nightly.

It is what `rerank pipeline` / `jobs/pipeline.py` run on a cluster and what
`rerank demo` runs on the embedded defaults. Each stage publishes its output
atomically on its own, so a pipeline that fails can be re-run: finished stages
are re-done from their inputs (training resumes from its last checkpoint).
A failure names the stage, how long it had run and the error, and leaves the
outputs of the stages before it in place.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import BaseModel

from ray_app.errors import describe
from ray_app.pipeline.config import PipelineConfig
from ray_app.registry import PIPELINE_STAGES
from ray_app.storage import join, write_json

logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A pipeline stage raised; `stage` names it and `__cause__` is the error."""

    def __init__(self, stage: str, seconds: float, cause: BaseException) -> None:
        super().__init__(
            f"pipeline stage '{stage}' failed after {seconds:.1f} s: {describe(cause)}"
        )
        self.stage = stage


def stage_configs(cfg: PipelineConfig) -> dict[str, BaseModel]:
    """Every stage's validated config: all keys checked before the first stage starts."""
    return cfg.stage_configs(PIPELINE_STAGES)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns (and writes to
    `<workdir>/pipeline.json`) each stage's output path, seconds and summary."""
    configs = stage_configs(cfg)
    summary: dict[str, Any] = {"workdir": cfg.workdir, "stages": {}}
    for stage in PIPELINE_STAGES:
        if stage.name not in configs:
            continue
        stage_cfg = configs[stage.name]
        logger.info("pipeline: stage '%s' starting (output %s)", stage.name, stage_cfg.output)
        t = time.perf_counter()
        try:
            result = stage.run(stage_cfg)
        except Exception as e:
            dt = time.perf_counter() - t
            logger.error("pipeline: stage '%s' failed after %.1f s", stage.name, dt)
            raise StageFailed(stage.name, dt, e) from e
        dt = time.perf_counter() - t
        logger.info("pipeline: stage '%s' done in %.1f s", stage.name, dt)
        if stage.show is not None:
            print(stage.show(stage_cfg, result), flush=True)
        summary["stages"][stage.name] = {
            "output": stage_cfg.output,
            "seconds": round(dt, 1),
            **stage.summarize(stage_cfg, result),
        }
        write_json(join(cfg.workdir, "pipeline.json"), summary)
    return summary
