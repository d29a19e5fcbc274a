"""Time-input variants of a tiny re-ranker on generated returning-user data, in minutes.

    python jobs/time_inputs.py --workdir runs/time-inputs

Generates users whose sessions stay on one topic and who come back days later
(`session_focus`), trains the tiny test model once per variant, and prints
test full-ranking and sampled NDCG@10 at the target's time, at the last
event + each Δ and in the nightly backtest (full ranking): the quick check
of a time representation before the three-seed runs on real data
(`jobs/ablations.py --study time`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

VARIANTS = {
    "no time input": {"model.recency_buckets": 1},
    "to_scoring, as before": {"model.time_input": "to_scoring", "returning_fraction": 0.0},
    "intervals + returning 0.5": {"model.time_input": "intervals"},
    "to_last, no returning": {"returning_fraction": 0.0},
    "to_last + returning 0.25": {"returning_fraction": 0.25},
    "to_last + returning 0.5 (default)": {},
    "to_last + returning 0.5 + nightly 0.25": {"nightly_fraction": 0.25},
}
DELTAS = {"Δ=0": 0, "Δ=1h": 3_600, "Δ=7d": 7 * 86_400, "Δ=30d": 30 * 86_400}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--session-focus", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.006)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from ray_app.config import load_config
    from ray_app.data.config import GenerateConfig, PrepareConfig
    from ray_app.data.prepare import run_prepare
    from ray_app.data.synthetic import generate
    from ray_app.evaluation.baselines import Popularity
    from ray_app.model.artifact import load_artifact
    from ray_app.protocol import metrics
    from ray_app.protocol.data import load_prepared
    from ray_app.protocol.scorer import NetScorer
    from ray_app.protocol.scoring import backtest, sampled_candidates, score_split
    from ray_app.training.config import TrainConfig
    from ray_app.training.trainer import run_train

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")
    root = Path(args.workdir)
    raw, prepared = root / "raw", str(root / "prepared")
    generate(
        GenerateConfig(
            output=str(raw),
            num_events=15_000,
            num_items=300,
            seed=3,
            session_focus=args.session_focus,
        )
    )
    run_prepare(
        load_config(
            PrepareConfig,
            None,
            [
                f"input.interactions={raw / 'interactions'}",
                f"input.items={raw / 'items'}",
                f"output={prepared}",
            ],
        )
    )
    data = load_prepared(prepared)
    test = data.splits["test"]
    cands = sampled_candidates(data, "test", 99, 0)

    def ndcg(scorer, targets) -> tuple[float, float]:
        r = score_split(scorer, targets, cands, 10, lists=False)
        return float(metrics.ndcg(r["full"], 10).mean()), float(
            metrics.ndcg(r["sampled"], 10).mean()
        )

    popularity = Popularity().fit(data.train, data.num_items)
    rows = {
        "popularity": {
            "target": ndcg(popularity, test),
            "backtest": (float(backtest(popularity, test, 10, None).ndcg.mean()), float("nan")),
        }
    }
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        base = [
            f"prepared={prepared}",
            f"output={root / f'model-{i}'}",
            f"storage={root / f'runs-{i}'}",
            "model.encoder=tiny",
            "model.dim=32",
            f"epochs={args.epochs}",
            f"lr={args.lr}",
            "batch_size=128",
            "patience=10",
            "refresh_text_every=20",
            f"seed={args.seed}",
        ]
        cfg = load_config(TrainConfig, None, [*base, *(f"{k}={v}" for k, v in overrides.items())])
        run_train(cfg)
        art = load_artifact(cfg.output)
        scorer = NetScorer(art.model, art.item_vectors)
        rows[name] = {"target": ndcg(scorer, test)}
        rows[name] |= {d: ndcg(scorer, test.after_last_event(s)) for d, s in DELTAS.items()}
        night = backtest(scorer, test, 10, popularity).ndcg.mean()
        rows[name]["backtest"] = (float(night), float("nan"))
        print(name, rows[name], flush=True)
    for proto, j in (("full", 0), ("sampled", 1)):
        cols = ["target", *DELTAS] + (["backtest"] if proto == "full" else [])
        print(f"\n| {proto} NDCG@10 | " + " | ".join(cols) + " |")
        print("|---" + "|---:" * len(cols) + "|")
        for name, r in rows.items():
            cells = [f"{r.get(c, r['target'])[j]:.4f}" for c in cols]
            print(f"| {name} | " + " | ".join(cells) + " |")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
