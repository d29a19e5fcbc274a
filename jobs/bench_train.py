"""Training throughput: Ray Train (1 and 2 workers) against a plain PyTorch loop.

    python jobs/bench_train.py --prepared runs/movielens/prepared --minutes 2

All three run the same model, the same `train_step` and the same examples in
one invocation, each for the same wall-clock budget of training steps
(encoder cache building and validation excluded), and report samples/s. The
plain loop uses every core in one process; Ray Train with 1 worker uses the
same number of threads; 2 workers split them (DDP over gloo on CPUs). The
encoder is fine-tuned from the first step in all three.
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
    from ray_app.training.batches import ItemText, to_examples
    from ray_app.training.loop import (
        Precision,
        build_model,
        load_train_data,
        lr_factor,
        make_optimizer,
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
    text = ItemText(data.item_ids) if model.text is not None else None
    if text is not None and model.text.trainable and model.text.caches_lower:
        text.build_cache(model.text, device)
    refresh_text(model, text, device)
    opt = make_optimizer(model, cfg)
    fs, path = resolve(join(cfg.prepared, "examples", "train"))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    perm = np.random.default_rng(cfg.seed).permutation(len(table))
    steps = len(table) // cfg.batch_size
    precision = Precision(cfg.precision, device)
    n, t0, step = 0, time.time(), 0
    while time.time() - t0 < minutes * 60 and step < steps:
        rows = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        ex = to_examples(table.take(rows), mcfg.max_history, cfg.negatives_per_example, data.hidden)
        set_lr(opt, lr_factor(step, steps, steps // 20))
        live = text if model.text is not None and model.text.trainable else None
        train_step(model, opt, ex, live, data, cfg, device, precision)
        step += 1
        n += len(rows)
        if model.text is not None and model.text.trainable and step % cfg.refresh_text_every == 0:
            refresh_text(model, text, device)
    return {"samples_per_s": n / (time.time() - t0), "steps": step}


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
    return {"samples_per_s": row["samples_per_s"], "steps": row["step"]}


def main() -> int:
    from ray_app.config import TrainConfig, load_config
    from ray_app.runtime import ensure_ray

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
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count() or 2
    cfg = load_config(
        TrainConfig, None, [f"prepared={args.prepared}", "output=unused", *args.overrides]
    )
    with tempfile.TemporaryDirectory() as workdir:
        results = {"plain PyTorch loop (1 process)": plain_loop(cfg, args.minutes, cores)}
        # One logical CPU more than there are cores: each Ray Train worker
        # reserves one, and Ray Data's feeding tasks need a slot of their own.
        ensure_ray(cfg.ray.model_copy(update={"num_cpus": cores + 1, "show_progress": False}))
        results["Ray Train, 1 worker"] = ray_train(cfg, 1, cores, args.minutes, workdir)
        if cores >= 2:
            results["Ray Train, 2 workers"] = ray_train(cfg, 2, cores // 2, args.minutes, workdir)
    base = results["plain PyTorch loop (1 process)"]["samples_per_s"]
    print(
        f"\nencoder={cfg.model.encoder} trainable_layers={cfg.model.trainable_layers} "
        f"batch={cfg.batch_size} cores={cores} budget={args.minutes} min each\n"
    )
    print("| variant | steps | samples/s | vs plain loop |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['steps']} | {r['samples_per_s']:.1f} | "
            f"{r['samples_per_s'] / base:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
