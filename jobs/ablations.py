"""The re-ranker against the baselines, with ablations, on one prepared data set.

    python jobs/ablations.py --prepared runs/movielens/prepared \\
        --config cluster/configs/train-movielens.yaml --workdir runs/movielens/ablations

Trains, from one train config: the hybrid model with several seeds, the same
model without the text tower (IDs only), with a frozen encoder, and a trio
(text + IDs fine-tuned, text + IDs with the encoder frozen, IDs only) with a
share of items held out of training entirely (cold start; one epoch on the
frozen encoder, then the fine-tuning ones). Then one evaluation scores every
baseline and every model on valid and test under both protocols
(`<workdir>/evaluation/report.md`) with paired per-user differences for
fine-tuned vs frozen and text vs IDs only, and a summary table (mean and
standard deviation over seeds) is printed and written to
`<workdir>/ablations.md`.

A variant whose artifact is already published is not trained again, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np


def variants(seeds: list[int], cold_fraction: float, cold_epochs: int) -> dict[str, list[str]]:
    out = {f"hybrid-s{s}": [f"seed={s}"] for s in seeds}
    out["no-text"] = ["model.use_text=false"]
    out["frozen-encoder"] = ["model.trainable_layers=0"]
    cold = [
        f"cold_start_fraction={cold_fraction}",
        f"epochs={cold_epochs}",
        f"encoder_frozen_epochs={min(1, cold_epochs - 1)}",
    ]
    out["cold-hybrid"] = cold
    out["cold-frozen-encoder"] = [*cold, "model.trainable_layers=0"]
    out["cold-ids-only"] = [*cold, "model.use_text=false"]
    return out


def pairs(names: list[str], seeds: list[int]) -> list[tuple[str, str]]:
    """The paired comparisons the ablation is about, among the variants present."""
    want = [(f"hybrid-s{s}", "frozen-encoder") for s in seeds]
    want += [(f"hybrid-s{s}", "no-text") for s in seeds]
    want += [("cold-hybrid", "cold-frozen-encoder"), ("cold-hybrid", "cold-ids-only")]
    return [(a, b) for a, b in want if a in names and b in names]


def summary(metrics: dict, seeds: list[int], k: int) -> str:
    from ray_app.evaluation.report import paired_table

    test = metrics["results"]["test"]
    cols = [("sampled", f"hr@{k}"), ("sampled", f"ndcg@{k}"), ("full", f"ndcg@{k}")]
    head = "| method | sampled HR@10 | sampled NDCG@10 | full NDCG@10 |"
    lines = [head, "|---|---:|---:|---:|"]
    for name, r in test.items():
        if name.startswith("hybrid-s") or name.startswith("cold-"):
            continue
        lines.append(f"| {name} | " + " | ".join(f"{r[p][m]:.4f}" for p, m in cols) + " |")
    hyb = [test[f"hybrid-s{s}"] for s in seeds if f"hybrid-s{s}" in test]
    for i, r in enumerate(hyb):
        lines.append(
            f"| hybrid, seed {seeds[i]} | " + " | ".join(f"{r[p][m]:.4f}" for p, m in cols) + " |"
        )
    if hyb:
        cells = []
        for p, m in cols:
            v = np.array([r[p][m] for r in hyb])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        lines.append(f"| **hybrid, mean ± sd over {len(hyb)} seeds** | " + " | ".join(cells) + " |")
    base = {
        n: r
        for n, r in test.items()
        if n in ("popularity", "item_knn", "ease", "sasrec", "sasrec_ce")
    }
    if base and hyb:
        lines.append("")
        for p, m in cols:
            best = max(base, key=lambda n: base[n][p][m])
            mean = float(np.mean([r[p][m] for r in hyb]))
            lines.append(
                f"- {p} {m}: hybrid mean {mean:.4f} vs best baseline {best} "
                f"{base[best][p][m]:.4f} ({mean / base[best][p][m] - 1:+.1%})"
            )
    cold = metrics.get("cold_start", {})
    if cold:
        lines += [
            "",
            f"Cold start (held-out items vs {metrics['num_negatives']} other held-out "
            "items; random: HR@10 0.100, NDCG@10 0.045), on the valid + test targets that "
            "are held-out items, and on every event on a held-out item (per-user means):",
            "",
            "| model | valid + test HR@10 | NDCG@10 | users | every event HR@10 | NDCG@10 "
            "| users | events |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in cold.items():
            a = r["all_events"]
            lines.append(
                f"| {name} | {r.get(f'hr@{k}', float('nan')):.4f} "
                f"| {r.get(f'ndcg@{k}', float('nan')):.4f} | {r.get('users', 0)} "
                f"| {a[f'hr@{k}']:.4f} | {a[f'ndcg@{k}']:.4f} | {a['users']} | {a['events']} |"
            )
    if metrics.get("paired"):
        lines += ["", *paired_table(metrics)]
    return "\n".join(lines)


def main() -> int:
    from ray_app.config import EvaluateConfig, TrainConfig, load_config
    from ray_app.evaluation.evaluate import run_evaluate
    from ray_app.storage import is_complete
    from ray_app.training.trainer import run_train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prepared", required=True)
    p.add_argument("--config", required=True, help="the train config every variant starts from")
    p.add_argument("--workdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cold-fraction", type=float, default=0.2)
    p.add_argument("--cold-epochs", type=int, default=2)
    p.add_argument("--sasrec-epochs", type=int, default=300)
    p.add_argument(
        "--baselines",
        nargs="+",
        default=["popularity", "item_knn", "ease", "sasrec", "sasrec_ce"],
        help="baselines scored beside the models",
    )
    p.add_argument("--only", nargs="*", help="train only these variants")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    timings = {}
    all_variants = variants(args.seeds, args.cold_fraction, args.cold_epochs)
    for name, extra in all_variants.items():
        out = os.path.join(args.workdir, name)
        if (args.only and name not in args.only) or is_complete(out):
            continue
        cfg = load_config(
            TrainConfig,
            args.config,
            [f"prepared={args.prepared}", f"output={out}", *args.overrides, *extra],
        )
        t = time.time()
        metrics = run_train(cfg)
        timings[name] = {
            "wall_s": round(time.time() - t, 1),
            "train_s": metrics["history"][-1]["train_s"],
        }
        logging.info("trained %s: %s", name, timings[name])
    models = {n: os.path.join(args.workdir, n) for n in all_variants}
    models = {n: path for n, path in models.items() if is_complete(path)}
    ev = load_config(
        EvaluateConfig,
        None,
        [
            f"prepared={args.prepared}",
            f"output={os.path.join(args.workdir, 'evaluation')}",
            f"sasrec_epochs={args.sasrec_epochs}",
            f"baselines={json.dumps(args.baselines)}",
        ],
    )
    ev = ev.model_copy(update={"models": models, "paired": pairs(list(models), args.seeds)})
    metrics = run_evaluate(ev)
    text = summary(metrics, args.seeds, ev.k)
    with open(os.path.join(args.workdir, "ablations.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.workdir, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
