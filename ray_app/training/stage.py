"""The `train` stage."""

from __future__ import annotations

from typing import Any

from ray_app.stage import Stage
from ray_app.training.config import TrainConfig


def _trained(cfg: TrainConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    history = metrics["history"]
    return {
        "output": cfg.output,
        **{k: v for k, v in metrics.items() if k != "history"},
        "last_epoch": history[-1] if history else {},
    }


TRAIN = Stage(
    name="train",
    config=TrainConfig,
    run_path="ray_app.training.trainer:run_train",
    summarize=_trained,
    help="fine-tune the re-ranker with Ray Train and publish a model artifact",
    description="Train the text + behaviour re-ranker on a prepare output with Ray Train (one "
    "DDP process per worker; NCCL and mixed precision on GPUs), validate every epoch, keep the "
    "best epoch, checkpoint from rank 0 and publish <output>/ (safetensors weights, item "
    "table, encoder, metrics, training_curves.png). A re-run with the same output resumes "
    "from the last checkpoint.",
    examples=(
        "rerank train --config cluster/configs/train-movielens.yaml",
        "rerank train --set prepared=runs/ml/prepared --set output=runs/ml/model "
        "--set max_minutes=10",
        "rerank train --config cluster/configs/train-cluster.yaml --set num_workers=4",
    ),
)
