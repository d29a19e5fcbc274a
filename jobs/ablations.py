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

With `--study time`, the variants are instead the model's time inputs, scored
at the target's time, at every Δ after the last event and in the nightly
backtest (the shipped model and the no-time-input model with every seed; one
seed each of intervals without the gaps to the last event, the shipped
model without returning-user moments or with nightly moments in
training, every gap to the moment of scoring as before, that with
returning-user moments, and the shipped model selected at the target's time
only), compared user by user
with the best baseline and the no-time-input model:

    python jobs/ablations.py --study time --prepared runs/amazon/prepared \
        --config cluster/configs/train-amazon.yaml \
        --evaluate-config cluster/configs/evaluate-amazon.yaml --workdir runs/amazon/time

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


def time_variants(seeds: list[int]) -> dict[str, list[str]]:
    out = {f"time-s{s}": [f"seed={s}"] for s in seeds}
    out |= {f"no-time-s{s}": [f"seed={s}", "model.recency_buckets=1"] for s in seeds}
    out["intervals"] = ["model.time_input=intervals"]
    out["no-returning-moments"] = ["returning_fraction=0"]
    out["nightly-moments"] = ["nightly_fraction=0.25"]
    out["to-scoring"] = ["model.time_input=to_scoring", "returning_fraction=0"]
    out["to-scoring-returning"] = ["model.time_input=to_scoring"]
    out["select-at-target"] = ["select_metric=ndcg_full"]
    return out


def time_groups(names: list[str], seeds: list[int]) -> dict[str, list[str]]:
    groups = {
        "reranker": [f"time-s{s}" for s in seeds if f"time-s{s}" in names],
        "no-time": [f"no-time-s{s}" for s in seeds if f"no-time-s{s}" in names],
    }
    return {g: m for g, m in groups.items() if m}


def time_summary(metrics: dict, k: int) -> str:
    """Per method: NDCG@k at the target's time, at every Δ and in the backtest (full), then
    sampled; the re-ranker minus the best baseline and minus no-time, with 95% intervals."""
    moments = metrics["moments"]["results"]["test"]
    back = metrics["backtest"].get("test", {})
    labels = ["target", *metrics["moments"]["deltas_s"]]
    names = [n for n in moments if not n.startswith(("time-s", "no-time-s"))]
    lines = []
    for proto in ("full", "sampled"):
        head = [f"{proto} NDCG@{k}", *labels] + (["backtest"] if proto == "full" else [])
        lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for n in names:
            cells = []
            for m in labels:
                c = moments[n].get(m, {}).get(proto)
                v = f"{c[f'ndcg@{k}']:.4f}" if c else ""
                if c and f"ndcg@{k}_sd" in c:
                    v += f" ± {c[f'ndcg@{k}_sd']:.4f}"
                cells.append(v)
            if proto == "full":
                cells.append(f"{back[n]['all'][f'ndcg@{k}']:.4f}" if n in back else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = {"best baseline": metrics["versus_best_baseline"].get("reranker", {})}
    rows |= {pair: diff for pair, diff in metrics.get("compare", {}).items()}
    for title, cols in rows.items():
        lines.append(f"reranker - {title}:" if title == "best baseline" else f"{title}:")
        for col, d in cols.items():
            lo, hi = d["ci95"]
            who = f" ({d['baseline']})" if "baseline" in d else ""
            lines.append(f"- {col}{who}: {d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        lines.append("")
    return "\n".join(lines)


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
    from ray_app.config import load_config
    from ray_app.evaluation.config import EvaluateConfig
    from ray_app.evaluation.evaluate import run_evaluate
    from ray_app.storage import is_complete
    from ray_app.training.config import TrainConfig
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
    p.add_argument("--study", choices=["text", "time"], default="text")
    p.add_argument("--evaluate-config", help="evaluate config the scoring starts from")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--evaluate-set",
        dest="evaluate_overrides",
        action="append",
        default=[],
        help="key=value for the evaluate config, e.g. returning_splits=[test]",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="train the variants and stop; a later run without it scores every one published",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    timings = {}
    if args.study == "time":
        all_variants = time_variants(args.seeds)
    else:
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
        with open(os.path.join(args.workdir, f"{name}.timing.json"), "w") as f:
            json.dump(timings[name], f)
    if args.train_only:
        return 0
    models = {n: os.path.join(args.workdir, n) for n in all_variants}
    models = {n: path for n, path in models.items() if is_complete(path)}
    overrides = [
        f"prepared={args.prepared}",
        f"output={os.path.join(args.workdir, 'evaluation')}",
        f"baselines={json.dumps(args.baselines)}",
    ]
    if not args.evaluate_config:
        overrides.append(f"sasrec_epochs={args.sasrec_epochs}")
    overrides += args.evaluate_overrides
    ev = load_config(EvaluateConfig, args.evaluate_config, overrides)
    if args.study == "time":
        groups = time_groups(list(models), args.seeds)
        compare = [("reranker", "no-time")] if len(groups) == 2 else []
        update = {"models": models, "groups": groups, "compare": compare, "paired": []}
    else:
        update = {"models": models, "paired": pairs(list(models), args.seeds)}
    metrics = run_evaluate(ev.model_copy(update=update))
    text = (
        time_summary(metrics, ev.k) if args.study == "time" else summary(metrics, args.seeds, ev.k)
    )
    with open(os.path.join(args.workdir, "ablations.md"), "w") as f:
        f.write(text + "\n")
    for name in models:
        path = os.path.join(args.workdir, f"{name}.timing.json")
        if name not in timings and os.path.exists(path):
            with open(path) as f:
                timings[name] = json.load(f)
    with open(os.path.join(args.workdir, "timings.json"), "w") as f:
        json.dump(timings, f, indent=2)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
