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


def test_serve_config_points_at_the_app_builder_with_valid_args():
    import importlib

    import yaml

    from ray_app.config import AppArgs

    root = Path(__file__).resolve().parents[1]
    conf = yaml.safe_load((root / "cluster" / "serve" / "rerank.yaml").read_text())
    for app in conf["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        args = AppArgs.model_validate(app["args"])
        assert args.events.kind == "redis" and args.autoscaling.max_replicas > 1
