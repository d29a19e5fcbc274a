"""Every config shipped under cluster/configs validates against the current config models."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_app.config import EvaluateConfig, PrepareConfig, TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "cluster" / "configs").glob("*.yaml"))
MODELS = {"prepare": PrepareConfig, "train": TrainConfig, "evaluate": EvaluateConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    stage = path.name.split("-", 1)[0]
    assert stage in MODELS, f"{path.name}: name must start with a stage ({sorted(MODELS)})"
    load_config(MODELS[stage], path)
