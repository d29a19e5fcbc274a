"""Training throughput: Ray Train (1 and 2 workers) against a plain PyTorch loop.

    python jobs/bench_train.py --prepared runs/movielens/prepared --minutes 2

All three run the same model, the same `train_step` and the same examples in
one invocation, each for the same wall-clock budget of training steps
(encoder cache building and validation excluded), and report samples/s. The
plain loop uses every core in one process; Ray Train with 1 worker uses the
same number of threads; 2 workers split them (DDP over gloo on CPUs). The
encoder is fine-tuned from the first step in all three.

On a shared machine throughput drifts by 10% and more within minutes, so the
variants run in `--rounds` interleaved rounds (every other round in reverse
order) and the tables report each variant's median with its ratio to the
plain loop's median, plus the ratio within each round. Two tables: samples/s
over the whole budget, which includes one-off start-up (Ray Data's read and
shuffle tasks, worker processes spawning: on 2 cores a large share of a
2-minute budget, a small one of a real epoch), and steady state after the
first steps of each run, the rate an epoch of a long run goes at.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np


def plain_loop(cfg, minutes: float, threads: int) -> dict:
    import pyarrow.dataset as pads
    import torch

    from ray_app.storage import join, resolve
    from ray_app.training.batches import to_examples
    from ray_app.training.inputs import load_train_data
    from ray_app.training.meters import Throughput
    from ray_app.training.steps import (
        Precision,
        build_model,
        lr_factor,
        make_optimizer,
        prepare_text,
        refresh_text,
        set_lr,
        train_step,
    )

    torch.set_num_threads(threads)
    data = load_train_data(cfg)
    mcfg = cfg.model.model_copy(update={"num_event_types": data.num_event_types})
    model, _ = build_model(mcfg, data.num_items, cfg.seed)
    model.items.known.copy_(data.known)
    device = torch.device("cpu")
    text = prepare_text(model, data.item_ids, device)
    opt = make_optimizer(model, cfg)
    fs, path = resolve(join(cfg.prepared, "examples", "train"))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    perm = np.random.default_rng(cfg.seed).permutation(len(table))
    steps = len(table) // cfg.batch_size
    precision = Precision(cfg.precision, device)
    speed, step = Throughput(world=1), 0
    while time.time() - speed.t0 < minutes * 60 and step < steps:
        rows = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ex = to_examples(table.take(rows), mcfg.max_history, cfg.negatives_per_example, data.hidden)
        set_lr(opt, lr_factor(step, steps, steps // 20))
        live = text if model.text is not None and model.text.trainable else None
        train_step(model, opt, ex, live, data, cfg, device, precision)
        step += 1
        speed.add(len(rows), step)
        if model.text is not None and model.text.trainable and step % cfg.refresh_text_every == 0:
            refresh_text(model, text, device)
    return {
        "samples_per_s": speed.samples_per_s(),
        "samples_per_s_steady": speed.steady_per_s(),
        "steps": step,
    }


def ray_train(cfg, workers: int, threads: int, minutes: float, workdir: str) -> dict:
    from ray_app.training.trainer import run_train

    run = cfg.model_copy(
        update={
            "encoder_frozen_epochs": 0,
            "num_workers": workers,
            # Reserve 1 CPU per worker so Ray Data can still run; use `threads`.
            "cpus_per_worker": 1,
            "torch_threads": threads,
            "epochs": 1,
            "max_minutes": minutes,
            "output": os.path.join(workdir, f"model-{workers}w"),
            "storage": os.path.join(workdir, f"runs-{workers}w"),
            "resume": False,
        }
    )
    metrics = run_train(run)
    row = metrics["history"][-1]
    return {
        "samples_per_s": row["samples_per_s"],
        "samples_per_s_steady": row["samples_per_s_steady"],
        "steps": row["step"],
    }


def main() -> int:
    from ray_app.config import load_config
    from ray_app.runtime import ensure_ray, local_cpus
    from ray_app.training.config import TrainConfig
    from ray_app.training.meters import STEADY_AFTER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prepared", required=True, help="a published prepare output")
    p.add_argument("--minutes", type=float, default=2.0, help="training time per variant")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="train config overrides, e.g. model.trainable_layers=2",
    )
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all variants")
    p.add_argument(
        "--reference-before-ray",
        action="store_true",
        help="also time the plain loop once before Ray starts",
    )
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = local_cpus()
    cfg = load_config(
        TrainConfig, None, [f"prepared={args.prepared}", "output=unused", *args.overrides]
    )
    plain = "plain PyTorch loop (1 process)"
    names = [plain, "Ray Train, 1 worker"] + (["Ray Train, 2 workers"] if cores >= 2 else [])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    alone = None
    if args.reference_before_ray:
        # On a small machine Ray's idle daemons take a share of the cores.
        alone = plain_loop(cfg, args.minutes, cores)
        print(f"plain loop before Ray starts: {alone['samples_per_s']:.1f} samples/s", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        # One logical CPU more than there are cores: each Ray Train worker
        # reserves one, and Ray Data's feeding tasks need a slot of their own.
        # Ray is up for the plain loop too, so its daemons cost both the same.
        ensure_ray(cfg.ray.model_copy(update={"num_cpus": cores + 1, "show_progress": False}))
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                if name == plain:
                    res = plain_loop(cfg, args.minutes, cores)
                else:
                    workers = 1 if "1 worker" in name else 2
                    sub = os.path.join(workdir, f"r{r}")
                    res = ray_train(cfg, workers, cores // workers, args.minutes, sub)
                runs[name].append(res)
                print(f"round {r + 1} {name}: {json.dumps(res)}", flush=True)
    print(
        f"\nencoder={cfg.model.encoder} trainable_layers={cfg.model.trainable_layers} "
        f"batch={cfg.batch_size} cores={cores} budget={args.minutes} min each, "
        f"{args.rounds} round(s)"
    )
    results = {"runs": runs, "plain_before_ray": alone}
    for key, title in (
        ("samples_per_s", "whole budget (start-up of the data pipeline included)"),
        ("samples_per_s_steady", f"steady state (after the first {STEADY_AFTER} steps)"),
    ):
        med = {n: float(np.median([x[key] for x in rs])) for n, rs in runs.items()}
        results[f"median_{key}"] = med
        rounds_head = " | ".join(f"round {r + 1}" for r in range(args.rounds))
        print(f"\nsamples/s, {title}:\n")
        print(f"| variant | median samples/s | vs plain loop | {rounds_head} |")
        print("|---|---:|---:|" + "---:|" * args.rounds)
        for name, rs in runs.items():
            per_round = " | ".join(
                f"{x[key]:.1f} ({x[key] / runs[plain][i][key]:.2f})" for i, x in enumerate(rs)
            )
            print(f"| {name} | {med[name]:.1f} | {med[name] / med[plain]:.2f} | {per_round} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
