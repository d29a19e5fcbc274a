"""The `evaluate` stage."""

from __future__ import annotations

from typing import Any

from ray_app.evaluation.config import EvaluateConfig
from ray_app.stage import Stage
from ray_app.storage import join


def _report(cfg: EvaluateConfig, metrics: dict[str, Any]) -> str:
    from ray_app.evaluation.report import markdown

    return markdown(metrics)


EVALUATE = Stage(
    name="evaluate",
    config=EvaluateConfig,
    run_path="ray_app.evaluation.evaluate:run_evaluate",
    summarize=lambda cfg, metrics: {"output": cfg.output, "report": join(cfg.output, "report.md")},
    show=_report,
    help="score the model and baselines on a prepared split: both protocols, report and plots",
    description="Fit popularity, item-kNN, EASE and SASRec (BCE and full-softmax CE) on train, "
    "tune them on valid, and score them and any trained models on valid and test, sampled (99 "
    "negatives) and full-ranking: at each target's time, at its history's last event + "
    "each of `deltas` (returning users), and as the nightly run of the day before listed "
    "it (backtest). Writes metrics.json, report.md and PNG plots to <output>/.",
    examples=(
        "rerank evaluate --config cluster/configs/evaluate-movielens.yaml",
        "rerank evaluate --set prepared=runs/ml/prepared --set output=runs/ml/eval "
        "--set models.reranker=runs/ml/model",
        "rerank evaluate --set prepared=runs/ml/prepared --set output=runs/ml/eval "
        "--set baselines=[popularity,ease] --set deltas=[0s,1d,30d]",
        "rerank evaluate --config cluster/configs/evaluate-movielens.yaml "
        "--set models='{s0: runs/ml/m0, s1: runs/ml/m1}' --set groups='{reranker: [s0, s1]}'",
    ),
)
