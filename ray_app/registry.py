"""Every stage, in one place: the pipeline's stages in their order, and the commands.

`rerank`'s subcommands, the pipeline and the configuration reference all iterate
these; a new stage is a package with a `stage.py` and one line here.
"""

from __future__ import annotations

from ray_app.batch.stage import NIGHTLY
from ray_app.data.stage import GENERATE, PREPARE
from ray_app.evaluation.stage import EVALUATE
from ray_app.pipeline.stage import PIPELINE
from ray_app.serving.stage import SERVE
from ray_app.stage import Stage
from ray_app.training.stage import TRAIN

PIPELINE_STAGES: tuple[Stage, ...] = (GENERATE, PREPARE, TRAIN, EVALUATE, NIGHTLY)
"""The stages `rerank pipeline` runs, in order (`generate` only when configured)."""

COMMANDS: dict[str, Stage] = {s.name: s for s in (*PIPELINE_STAGES, PIPELINE, SERVE)}
"""Every command that runs a stage, by name: the pipeline's stages, the pipeline, serve."""
