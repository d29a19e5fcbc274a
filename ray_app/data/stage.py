"""The two data stages: `generate` (sample data) and `prepare` (logs -> examples)."""

from __future__ import annotations

from typing import Any

from ray_app.data.config import GenerateConfig, PrepareConfig
from ray_app.stage import Stage

GENERATE = Stage(
    name="generate",
    config=GenerateConfig,
    run_path="ray_app.data.synthetic:generate",
    summarize=lambda cfg, summary: summary,
    help="write synthetic interaction logs and an item catalogue",
    description="Synthetic logs for trying the project without data: users with a few "
    "interests, Zipf-like item popularity, several event types, and item titles, genres and "
    "descriptions that carry the signal the text encoder can learn from. Writes "
    "<output>/interactions/part-*.parquet and <output>/items/items.parquet.",
    examples=(
        "rerank generate --set output=runs/raw --set num_events=1000000",
        "rerank generate --set output=runs/raw --set num_items=5000 --set seed=1",
    ),
)


def _prepared(cfg: PrepareConfig, manifest: dict[str, Any]) -> dict[str, Any]:
    return {"output": cfg.output, "counts": manifest["counts"], "timings": manifest["timings"]}


PREPARE = Stage(
    name="prepare",
    config=PrepareConfig,
    run_path="ray_app.data.prepare:run_prepare",
    summarize=_prepared,
    help="validate logs and build sequences/examples (Ray Data)",
    description="Read the logs and the catalogue (CSV/TSV/JSONL/Parquet, local or s3://, "
    "gs://...), validate every row (bad rows kept in rejected/ with a reason and counted), "
    "order each user's events in time, split train/valid/test and build training examples "
    "with sampled negatives. Publishes <output>/ atomically with a manifest.json.",
    examples=(
        "rerank prepare --config cluster/configs/prepare-movielens.yaml",
        "rerank prepare --set input.adapter=movielens --set input.path=data/ml-latest-small "
        "--set output=runs/ml/prepared",
        "rerank prepare --set input.interactions='logs/*.parquet' --set input.items="
        "items.jsonl --set input.interaction_columns.user_id=uid --set output=runs/prepared",
    ),
)
