"""Benchmark `prepare` (Ray Data) against a single-process pandas implementation.

Generates logs of each size once, then runs, side by side in this one run:

* ray:    `rerank prepare` on a local Ray (num_cpus from --cpus), as a user runs it;
* pandas: the same transformation (same parsing, validation, ordering, splits,
          history windows, negatives, outputs) in one process with pandas,
          holding everything in memory.

Each runs in its own subprocess; peak memory is the largest sum of PSS over
that subprocess and all its descendants (Ray's raylet, workers and object
store pages included), sampled every 0.25 s. Prints events/s, peak memory
and the ratios, and how each grows from the smallest to the largest size.

    python jobs/bench_prepare.py --sizes 1000000 5000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _peak_pss(proc: subprocess.Popen, stop: threading.Event, out: list[int]) -> None:
    peak = 0
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_full_info().pss
        peak = max(peak, total)
        stop.wait(0.25)
    out.append(peak)


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    stop, peak = threading.Event(), []
    th = threading.Thread(target=_peak_pss, args=(proc, stop, peak), daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t
    stop.set()
    th.join()
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}")
    return {"seconds": seconds, "peak_mb": peak[0] / 2**20, "stdout": stdout}


def pandas_reference(raw: str, out: str) -> None:
    """The whole prepare transformation in one process with pandas (the reference)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_app.config import load_config
    from ray_app.data import schema
    from ray_app.data.config import PrepareConfig
    from ray_app.data.negatives import NegativeSampler
    from ray_app.data.prepare import resolve_rules, split_spec
    from ray_app.data.sequences import assign_splits, build_examples, order_and_dedupe, target_rows
    from ray_app.data.text import ItemTokenizer
    from ray_app.data.validation import normalize_interactions

    cfg = load_config(
        PrepareConfig,
        None,
        [f"input.interactions={raw}/interactions", f"input.items={raw}/items", f"output={out}"],
    )
    rules, spec = resolve_rules(cfg), split_spec(cfg)
    items = pd.read_parquet(f"{raw}/items")
    items = items.drop_duplicates(schema.ITEM_ID).reset_index(drop=True)
    items[schema.ITEM_IDX] = np.arange(1, len(items) + 1, dtype=np.int32)
    for c in schema.ITEM_COLUMNS:
        if c not in items:
            items[c] = None
    tok = ItemTokenizer(cfg.text)
    os.makedirs(f"{out}/items", exist_ok=True)
    pq.write_table(
        tok(
            pa.Table.from_pandas(
                items[[schema.ITEM_IDX, *schema.ITEM_COLUMNS]], preserve_index=False
            )
        ),
        f"{out}/items/part.parquet",
    )
    raw_ev = pd.read_parquet(f"{raw}/interactions")
    raw_ev[schema.SOURCE_FILE] = np.int32(0)
    raw_ev[schema.SOURCE_ROW] = np.arange(len(raw_ev), dtype=np.int64)
    raw_ev[schema.REASON] = None
    frame, reasons = normalize_interactions(
        pa.Table.from_pandas(raw_ev, preserve_index=False), rules
    )
    idx = pd.Index(items[schema.ITEM_ID]).get_indexer(frame[schema.ITEM_ID])
    ok = pd.isna(reasons) & (idx >= 0)
    frame = frame[ok].copy()
    frame[schema.ITEM_IDX] = (idx[ok] + 1).astype(np.int32)
    kept, _ = order_and_dedupe(frame)
    kept, _ = assign_splits(kept, spec)
    os.makedirs(f"{out}/interactions", exist_ok=True)
    pq.write_table(
        pa.Table.from_pandas(
            kept[[f.name for f in schema.INTERACTIONS_SCHEMA]],
            schema=schema.INTERACTIONS_SCHEMA,
            preserve_index=False,
        ),
        f"{out}/interactions/part.parquet",
    )
    counts = np.bincount(
        kept.loc[kept[schema.SPLIT] == "train", schema.ITEM_IDX], minlength=len(items) + 1
    )
    neg = cfg.negatives
    sampler = NegativeSampler.from_counts(counts, neg.sampler, neg.popularity_alpha, neg.seed)
    n = 0
    for split, rows in target_rows(kept, spec).items():
        os.makedirs(f"{out}/examples/{split}", exist_ok=True)
        for i, t in enumerate(build_examples(kept, rows, spec, sampler, neg.num_negatives)):
            pq.write_table(t, f"{out}/examples/{split}/part-{i:04d}.parquet")
            n += t.num_rows
    print(json.dumps({"events": len(raw_ev), "examples": n}))


def main() -> None:
    from ray_app.runtime import local_cpus

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--cpus", type=int, default=local_cpus())
    ap.add_argument(
        "--reference-max-events",
        type=int,
        default=5_000_000,
        help="run the in-memory pandas reference only up to this size",
    )
    ap.add_argument(
        "--workdir", default=None, help="where generated data goes (default: a temp dir)"
    )
    ap.add_argument("--pandas-reference", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pandas_reference:
        pandas_reference(*args.pandas_reference)
        return
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    rerank = [sys.executable, "-m", "ray_app.cli"]
    results = []
    for size in args.sizes:
        raw = work / f"raw-{size}"
        if not (raw / "items").exists():
            subprocess.run(
                [*rerank, "generate", "--set", f"output={raw}", "--set", f"num_events={size}"],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        ray_run = measure(
            [
                *rerank,
                "prepare",
                "--set",
                f"input.interactions={raw}/interactions",
                "--set",
                f"input.items={raw}/items",
                "--set",
                f"output={work}/ray-{size}",
                "--set",
                f"ray.num_cpus={args.cpus}",
                "--set",
                "ray.show_progress=false",
            ],
            env,
        )
        manifest = json.loads((work / f"ray-{size}" / "manifest.json").read_text())
        ray_examples = sum(manifest["counts"]["examples"].values())
        pd_run = None
        if size <= args.reference_max_events:
            out = str(work / f"pandas-{size}")
            pd_run = measure([sys.executable, __file__, "--pandas-reference", str(raw), out], env)
            ref = json.loads(pd_run["stdout"].strip().splitlines()[-1])
            if ref["examples"] != ray_examples:
                raise SystemExit(
                    f"outputs differ: ray {ray_examples} examples, pandas {ref['examples']}"
                )
        results.append({"events": size, "ray": ray_run, "pandas": pd_run, "examples": ray_examples})
        ref_text = (
            f"pandas {pd_run['seconds']:.1f}s {pd_run['peak_mb']:.0f} MB" if pd_run else "pandas -"
        )
        print(
            f"[{size:,} events] ray {ray_run['seconds']:.1f}s {ray_run['peak_mb']:.0f} MB | "
            + ref_text,
            flush=True,
        )

    report(results, args.cpus)


def report(results: list[dict], cpus: int) -> None:
    print(f"\nprepare benchmark ({cpus} CPUs for Ray; pandas is one process)")
    print(
        f"{'events':>11} {'ray ev/s':>10} {'pandas ev/s':>12} {'speed ray/pd':>13} "
        f"{'ray peak MB':>12} {'pd peak MB':>11} {'mem ray/pd':>11}"
    )
    for r in results:
        e, ray_r, pd_r = r["events"], r["ray"], r["pandas"]
        rs = e / ray_r["seconds"]
        cells = ["-"] * 4
        if pd_r:
            ps = e / pd_r["seconds"]
            cells = [
                f"{ps:,.0f}",
                f"{rs / ps:.2f}",
                f"{pd_r['peak_mb']:,.0f}",
                f"{ray_r['peak_mb'] / pd_r['peak_mb']:.2f}",
            ]
        print(
            f"{e:>11,} {rs:>10,.0f} {cells[0]:>12} {cells[1]:>13} "
            f"{ray_r['peak_mb']:>12,.0f} {cells[2]:>11} {cells[3]:>11}"
        )
    for name in ("ray", "pandas"):
        runs = [r for r in results if r[name]]
        if len(runs) < 2:
            continue
        a, b = runs[0], runs[-1]
        d_events = b["events"] - a["events"]
        d_secs = b[name]["seconds"] - a[name]["seconds"]
        print(
            f"{name:>6}: {a['events']:,} -> {b['events']:,} events "
            f"(x{b['events'] / a['events']:g}): "
            f"time x{b[name]['seconds'] / a[name]['seconds']:.2f}, "
            f"peak memory x{b[name]['peak_mb'] / a[name]['peak_mb']:.2f}, "
            f"marginal cost {d_secs / d_events * 1e6:.1f} us/event"
        )


if __name__ == "__main__":
    main()
