"""The `nightly` stage."""

from __future__ import annotations

from ray_app.batch.config import NightlyConfig
from ray_app.stage import Option, Stage

REPORTED = ("output", "date", "as_of", "model_version", "counts", "latest", "timings")

NIGHTLY = Stage(
    name="nightly",
    config=NightlyConfig,
    run_path="ray_app.batch.nightly:run_nightly",
    summarize=lambda cfg, out: {k: out[k] for k in REPORTED},
    help="precompute every user's top-K to Parquet and publish it (Ray Data)",
    description="For every user, from their events up to the end of the date: retrieve "
    "candidates with the user vector against the item table, re-rank them with the model (the "
    "serving Ranker), keep the top K and publish <output>/dt=<date>/part-*.parquet "
    "atomically, then point <output>/LATEST at it. Schedule it daily "
    "(cluster/kuberay/nightly-cronjob.yaml).",
    examples=(
        "rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared "
        "--set output=runs/demo/topk",
        "rerank nightly --config cluster/configs/nightly-cluster.yaml --date 2026-11-24",
        "rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared "
        "--set output=runs/demo/backtest --set as_of=test",
    ),
    options=(Option("--date", "date", "YYYY-MM-DD (UTC) the lists are for; default: today"),),
)
