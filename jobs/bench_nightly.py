"""Benchmark the nightly top-K job (Ray Data) against a single-process loop.

    python jobs/bench_nightly.py --users 10000 100000

For each size it generates logs of that many users over one catalogue (same
seed and item count, so one model fits every size) and prepares them once
(kept under --workdir for the next run). The model is --model, or a small
re-ranker trained once on the smallest size (a tiny random BERT: the nightly
job reads the item table, never the encoder, so the encoder's size does not
change what is measured). Then, side by side in this one run:

* ray:    `run_nightly` on a local Ray, as `rerank nightly` runs it (read,
          group events by user, actor pool of TopKActor, write Parquet);
* single: `single_process` below, the same lists in one process (events
          read with pyarrow, users in order, the same `top_k` in batches),
          using every core's thread in PyTorch.

Prints users/s for both, their ratio, how each one's time grows from the
smallest to the largest size against the growth in users, and checks that the
two made the same lists (a sample of users).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

logger = logging.getLogger("bench_nightly")


def _complete(path: Path) -> bool:
    return (path / "_SUCCESS").is_file()


def prepared_users(root: Path, users: int, events_per_user: int, items: int) -> Path:
    from ray_app.config import load_config
    from ray_app.data.config import GenerateConfig, PrepareConfig
    from ray_app.data.prepare import run_prepare
    from ray_app.data.synthetic import generate

    raw, prepared = root / f"raw-{users}", root / f"prepared-{users}"
    if _complete(prepared):
        return prepared
    generate(
        GenerateConfig(
            output=str(raw), num_users=users, num_events=users * events_per_user, num_items=items
        )
    )
    cfg = load_config(
        PrepareConfig,
        None,
        [
            f"input.interactions={raw / 'interactions'}",
            f"input.items={raw / 'items'}",
            f"output={prepared}",
        ],
    )
    run_prepare(cfg)
    return prepared


def train_model(prepared: Path, out: Path, minutes: float) -> Path:
    from ray_app.training.config import TrainConfig
    from ray_app.training.trainer import run_train

    if _complete(out):
        return out
    cfg = TrainConfig.model_validate(
        {
            "prepared": str(prepared),
            "output": str(out),
            "model": {"encoder": "tiny"},
            "epochs": 1,
            "max_minutes": minutes,
        }
    )
    run_train(cfg)
    return out


def same_catalogue(model: Path, prepared: Path) -> None:
    ids = pq.read_table(model / "items.parquet", columns=["item_id"])["item_id"].to_pylist()
    items = pq.read_table(prepared / "items", columns=["item_idx", "item_id"]).to_pandas()
    ours = items.sort_values("item_idx")["item_id"].tolist()
    if ids[1:] != ours and ids != ours:
        raise SystemExit(
            f"{model} was trained on another catalogue than {prepared}: "
            "pass a --model trained on data generated with the same --items"
        )


def single_process(ranker, interactions: list, opts, batch_size: int):
    """The nightly lists without Ray: one process, users in order, the same `user_events`
    and `top_k` as the actors run."""
    import itertools

    import pyarrow as pa

    from ray_app.batch.nightly import top_k, user_events

    table = pa.concat_tables(interactions)
    users = table["user_id"].to_numpy(zero_copy_only=False)
    order = np.argsort(users, kind="stable")
    table = table.take(order)
    users = users[order]
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    rows = pa.concat_tables(
        user_events(table.slice(lo, hi - lo), "now", opts.now)
        for lo, hi in itertools.pairwise(bounds)
    )
    return pa.concat_tables(
        top_k(ranker, rows.slice(lo, batch_size), opts) for lo in range(0, len(rows), batch_size)
    )


def main() -> int:
    from ray_app.batch.config import NightlyConfig
    from ray_app.batch.nightly import ListOptions, end_of_day, run_nightly
    from ray_app.model.ranker import Ranker
    from ray_app.runtime import ensure_ray, local_cpus
    from ray_app.storage import read_parquet

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--events-per-user", type=int, default=20)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--model", help="a model artifact trained on this catalogue")
    p.add_argument("--train-minutes", type=float, default=2.0)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--num-candidates", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default="runs/bench-nightly")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ray").setLevel(logging.WARNING)
    root = Path(args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    from ray_app.runtime import RayConfig

    ensure_ray(RayConfig())
    sizes = sorted(args.users)
    prepared = {n: prepared_users(root, n, args.events_per_user, args.items) for n in sizes}
    model = (
        Path(args.model)
        if args.model
        else train_model(prepared[sizes[0]], root / "model", args.train_minutes)
    )
    date = "2026-01-01"
    rows = []
    for n in sizes:
        same_catalogue(model, prepared[n])
        out = root / f"topk-{n}"
        cfg = NightlyConfig.model_validate(
            {
                "model": str(model),
                "prepared": str(prepared[n]),
                "output": str(out),
                "date": date,
                "k": args.k,
                "num_candidates": args.num_candidates,
                "batch_size": args.batch_size,
            }
        )
        t = time.perf_counter()
        result = run_nightly(cfg)
        ray_s = time.perf_counter() - t

        torch.set_num_threads(local_cpus())
        t = time.perf_counter()
        ranker = Ranker.from_path(str(model))
        tables = [
            pq.read_table(f) for f in sorted((prepared[n] / "interactions").rglob("*.parquet"))
        ]
        opts = ListOptions(args.k, args.num_candidates, 0.0, end_of_day(date))
        reference = single_process(ranker, tables, opts, args.batch_size)
        single_s = time.perf_counter() - t

        lists = read_parquet(str(out / f"dt={date}"))
        ref = reference.to_pandas()
        users = np.random.default_rng(0).choice(ref["user_id"].unique(), 200, replace=False)
        a = lists[lists.user_id.isin(users)].sort_values(["user_id", "rank"], ignore_index=True)
        b = ref[ref.user_id.isin(users)].sort_values(["user_id", "rank"], ignore_index=True)
        same = bool(
            len(a) == len(b)
            and (a.item_id == b.item_id).mean() > 0.99
            and np.allclose(a.score, b.score, atol=1e-4)
        )
        row = {
            "users": n,
            "events": int(sum(t.num_rows for t in tables)),
            "ray_s": ray_s,
            "single_s": single_s,
            "ray_users_per_s": n / ray_s,
            "single_users_per_s": n / single_s,
            "ratio": single_s / ray_s,
            "rows": result["counts"]["rows"],
            "same_lists": same,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\nmodel={model} cores={local_cpus()} k={args.k} "
        f"num_candidates={args.num_candidates} items={args.items}\n"
    )
    print("| users | events | Ray users/s | single-process users/s | Ray / single | same lists |")
    print("|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['users']:,} | {r['events']:,} | {r['ray_users_per_s']:.0f} "
            f"| {r['single_users_per_s']:.0f} | {r['ratio']:.2f} | {r['same_lists']} |"
        )
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        grow = hi["users"] / lo["users"]
        print(
            f"\nusers x{grow:.1f}: Ray time x{hi['ray_s'] / lo['ray_s']:.2f}, "
            f"single-process time x{hi['single_s'] / lo['single_s']:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["same_lists"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
