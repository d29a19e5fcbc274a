"""The `prepare` stage: raw logs + catalogue -> validated sequences and training examples.

Ray Data pipeline, in three streaming passes so memory is bounded by a
bucket, not by the input:

1. read + parse + validate every interaction (one read task per file); valid
   rows are written to hash buckets of users, rejected rows to `rejected/`;
2. per bucket: order by time, drop duplicates, filter short users, split;
   writes `interactions/` and returns train item counts (for popularity);
3. per bucket: history windows, targets and sampled negatives -> `examples/`.

Output (published atomically, see `storage.StagedOutput`)::

    items/                 item_idx, item_id, title, text, input_ids
    interactions/          cleaned events with their split
    examples/{train,valid,test}/
    rejected/{interactions,items}/   reason, source_file, source_row, record
    filtered/              rows removed by a documented filter (min_interactions)
    manifest.json, _SUCCESS
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_app.data import schema
from ray_app.data.adapters import Adapter, Source, make_adapter
from ray_app.data.config import PrepareConfig
from ray_app.data.negatives import NegativeSampler, user_hash
from ray_app.data.readers import detect_format, read_raw
from ray_app.data.sequences import (
    SplitSpec,
    assign_splits,
    build_examples,
    order_and_dedupe,
    rejected_events,
    target_rows,
)
from ray_app.data.text import ItemTokenizer, TextRenderer
from ray_app.data.validation import (
    BELOW_MIN_INTERACTIONS,
    DUPLICATE_EVENT,
    DUPLICATE_ITEM,
    UNKNOWN_ITEM,
    Rules,
    make_rejected,
    normalize_interactions,
    normalize_items,
    rejected_table,
)
from ray_app.errors import naming_the_batch
from ray_app.storage import (
    InputError,
    StagedOutput,
    exists,
    join,
    read_parquet,
    resolve,
)
from ray_app.times import parse_time

logger = logging.getLogger(__name__)

_BYTES_PER_EVENT = {"parquet": 12, "csv": 32, "tsv": 32, "jsonl": 400}
EVENTS_PER_BUCKET = 500_000


class RejectedShareError(RuntimeError):
    """Too many input rows were rejected; the run stops before publishing."""


def resolve_rules(cfg: PrepareConfig) -> Rules:
    v = cfg.validation
    max_ts = (
        parse_time(v.max_timestamp) if v.max_timestamp is not None else int(time.time()) + 86_400
    )
    return Rules(
        event_types=tuple(e.lower() for e in v.event_types),
        default_event_type=v.default_event_type.lower(),
        min_timestamp=parse_time(v.min_timestamp),
        max_timestamp=max_ts,
        max_id_chars=v.max_id_chars,
        max_text_chars=v.max_text_chars,
        timestamp_unit=cfg.input.timestamp_unit,
    )


def split_spec(cfg: PrepareConfig, file_splits: list[str] | None = None) -> SplitSpec:
    sp = cfg.split
    return SplitSpec(
        file_splits=tuple(file_splits) if file_splits else None,
        method=sp.method,
        min_interactions=sp.min_interactions,
        max_history=sp.max_history,
        valid_start=parse_time(sp.valid_start) if sp.valid_start is not None else None,
        test_start=parse_time(sp.test_start) if sp.test_start is not None else None,
    )


def _write(table: pa.Table, uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs, compression="zstd")


def _batch_name(table: pa.Table) -> str:
    """Deterministic file name for a batch, so a retried task overwrites, not duplicates."""
    f = table.column(schema.SOURCE_FILE)
    r = table.column(schema.SOURCE_ROW)
    key = f"{f[0]}-{r[0]}-{f[-1]}-{r[-1]}-{table.num_rows}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _counts_table(counts: Counter) -> pa.Table:
    return pa.table(
        {
            "key": pa.array(list(counts), pa.string()),
            "count": pa.array(list(counts.values()), pa.int64()),
        }
    )


@naming_the_batch(files_arg=3, source_file=schema.SOURCE_FILE, source_row=schema.SOURCE_ROW)
def parse_items(table: pa.Table, adapter: Adapter, rules: Rules, files: list[str]) -> pa.Table:
    """Raw catalogue batch -> contract item rows; rejected ones carry reason and record."""
    contract = adapter.to_items(table)
    frame, reasons = normalize_items(contract, rules.max_id_chars, rules.max_text_chars)
    bad = ~pd.isna(reasons)
    frame[schema.REASON] = reasons
    records = np.full(len(frame), None, dtype=object)
    if bad.any():
        records[bad] = rejected_table(table, bad, reasons, files).column("record").to_pylist()
    frame["record"] = records
    return pa.Table.from_pandas(frame, preserve_index=False, schema=_ITEM_ROWS)


_ITEM_ROWS = pa.schema(
    [pa.field(schema.ITEM_ID, pa.string())]
    + [pa.field(f, pa.string()) for f in schema.ITEM_TEXT_FIELDS]
    + [
        pa.field(schema.SOURCE_FILE, pa.int32()),
        pa.field(schema.SOURCE_ROW, pa.int64()),
        pa.field(schema.REASON, pa.string()),
        pa.field("record", pa.string()),
    ]
)


class InteractionValidator:
    """Pass 1 (Ray Data actor): validate a raw batch, bucket valid rows by user, keep rejects."""

    def __init__(
        self,
        adapter: Adapter,
        rules: Rules,
        item_ids: Any,
        num_buckets: int,
        work_dir: str,
        rejected_dir: str,
        files: list[str],
    ) -> None:
        import ray

        ids = ray.get(item_ids) if isinstance(item_ids, ray.ObjectRef) else item_ids
        self.index = pd.Index(np.asarray(ids, dtype=object))
        self.adapter, self.rules, self.num_buckets = adapter, rules, num_buckets
        self.work_dir, self.rejected_dir, self.files = work_dir, rejected_dir, files

    def __call__(self, raw: pa.Table) -> pa.Table:
        if raw.num_rows == 0:
            return _counts_table(Counter())
        return validate_and_bucket(
            raw,
            self.adapter,
            self.rules,
            self.index,
            self.num_buckets,
            self.work_dir,
            self.rejected_dir,
            self.files,
        )


@naming_the_batch(files_arg=7, source_file=schema.SOURCE_FILE, source_row=schema.SOURCE_ROW)
def validate_and_bucket(
    raw: pa.Table,
    adapter: Adapter,
    rules: Rules,
    index: pd.Index,
    num_buckets: int,
    work_dir: str,
    rejected_dir: str,
    files: list[str],
) -> pa.Table:
    """Validate one raw batch; write valid rows to user buckets, rejects to `rejected_dir`.

    Returns the batch's counts (read, valid, rejected by reason) as a small table.
    """
    contract = adapter.to_interactions(raw)
    frame, reasons = normalize_interactions(contract, rules)
    item_idx = index.get_indexer(frame[schema.ITEM_ID].to_numpy())
    unknown = (item_idx < 0) & pd.isna(reasons)
    reasons[unknown] = UNKNOWN_ITEM
    ok = pd.isna(reasons)
    name = _batch_name(raw)
    counts: Counter = Counter({"read": raw.num_rows, "valid": int(ok.sum())})
    counts.update(f"rejected:{r}" for r in reasons[~ok])
    if (~ok).any():
        _write(rejected_table(raw, ~ok, reasons, files), join(rejected_dir, f"{name}.parquet"))
    good = frame[ok].copy()
    good[schema.ITEM_IDX] = (item_idx[ok] + 1).astype(np.int32)
    bucket = (user_hash(good[schema.USER_ID].to_numpy()) % np.uint64(num_buckets)).astype(np.int64)
    for b in np.unique(bucket):
        part = good[bucket == b]
        _write(
            pa.Table.from_pandas(part, preserve_index=False),
            join(work_dir, f"b={b:05d}", f"{name}.parquet"),
        )
    return _counts_table(counts)


def _read_bucket(work_dir: str, bucket: int) -> pd.DataFrame:
    path = join(work_dir, f"b={bucket:05d}")
    if not exists(path):
        return pd.DataFrame(
            columns=[
                schema.USER_ID,
                schema.ITEM_ID,
                schema.TIMESTAMP,
                schema.EVENT_TYPE,
                schema.EVENT_IDX,
                schema.VALUE,
                schema.SOURCE_FILE,
                schema.SOURCE_ROW,
                schema.ITEM_IDX,
            ]
        )
    return read_parquet(path)


def sequence_bucket(
    events: pd.DataFrame, spec: SplitSpec
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Order, dedupe, filter, split one bucket: (kept, duplicates, filtered)."""
    events, dups = order_and_dedupe(events)
    kept, filtered = assign_splits(events, spec)
    return kept, dups, filtered


class BucketSequencer:
    """Pass 2 (Ray Data actor): one bucket of users -> ordered, split interactions."""

    def __init__(self, spec: SplitSpec, work_dir: str, out_dir: str, files: list[str]) -> None:
        self.spec, self.work_dir, self.out_dir, self.files = spec, work_dir, out_dir, files

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        results = [self._one(int(b)) for b in batch["bucket"]]
        return pa.table(
            {
                "bucket": pa.array([r["bucket"] for r in results], pa.int64()),
                "stats": pa.array([json.dumps(r["stats"]) for r in results]),
                "items": pa.array([r["items"] for r in results], pa.list_(pa.int64())),
                "counts": pa.array([r["counts"] for r in results], pa.list_(pa.int64())),
            }
        )

    def _one(self, b: int) -> dict[str, Any]:
        kept, dups, filtered = sequence_bucket(_read_bucket(self.work_dir, b), self.spec)
        if not dups.empty:
            _write(
                rejected_events(dups, self.files),
                join(self.out_dir, "rejected", "interactions", f"dup-{b:05d}.parquet"),
            )
        if not filtered.empty:
            _write(
                rejected_events(filtered, self.files),
                join(self.out_dir, "filtered", f"part-{b:05d}.parquet"),
            )
        if not kept.empty:
            _write(
                _interactions_table(kept),
                join(self.out_dir, "interactions", f"part-{b:05d}.parquet"),
            )
        train = kept[kept[schema.SPLIT] == "train"] if not kept.empty else kept
        items, cnt = np.unique(train[schema.ITEM_IDX].to_numpy(np.int64), return_counts=True)
        return {
            "bucket": b,
            "stats": {
                "kept": len(kept),
                "duplicates": len(dups),
                "filtered": len(filtered),
                "users_kept": int(kept[schema.USER_ID].nunique()) if len(kept) else 0,
                "users_filtered": int(filtered[schema.USER_ID].nunique()) if len(filtered) else 0,
                **{f"split:{k}": int(v) for k, v in kept[schema.SPLIT].value_counts().items()},
            },
            "items": items,
            "counts": cnt,
        }


def _interactions_table(kept: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(
        kept[[f.name for f in schema.INTERACTIONS_SCHEMA]],
        schema=schema.INTERACTIONS_SCHEMA,
        preserve_index=False,
    )


class BucketExampleBuilder:
    """Pass 3 (Ray Data actor): one bucket's interactions -> examples with negatives."""

    def __init__(self, spec: SplitSpec, sampler: Any, num_negatives: int, out_dir: str) -> None:
        import ray

        self.sampler = ray.get(sampler) if isinstance(sampler, ray.ObjectRef) else sampler
        self.spec, self.k, self.out_dir = spec, num_negatives, out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        counts = [json.dumps(self._one(int(b))) for b in batch["bucket"]]
        return pa.table({"bucket": pa.array(batch["bucket"]), "stats": pa.array(counts)})

    def _one(self, b: int) -> dict[str, int]:
        path = join(self.out_dir, "interactions", f"part-{b:05d}.parquet")
        if not exists(path):
            return {}
        events = read_parquet(path)
        counts: dict[str, int] = {}
        for split, rows in target_rows(events, self.spec).items():
            for i, table in enumerate(
                build_examples(events, rows, self.spec, self.sampler, self.k)
            ):
                _write(
                    table, join(self.out_dir, "examples", split, f"part-{b:05d}-{i:04d}.parquet")
                )
                counts[split] = counts.get(split, 0) + table.num_rows
        return counts


def _pool(cpus: int, work_units: int | None = None):
    """An actor pool that starts at full size: every pass here has work for all of it."""
    import ray.data

    size = max(1, min(cpus, work_units or cpus))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=size, initial_size=size)


def _auto_buckets(cfg: PrepareConfig, files, fmt: str, cpus: int) -> int:
    if cfg.num_buckets:
        return cfg.num_buckets
    est_events = sum(f.size for f in files) / _BYTES_PER_EVENT.get(fmt, 32)
    return max(cpus, math.ceil(est_events / EVENTS_PER_BUCKET))


@dataclass
class _Run:
    """What the passes share: resolved settings, the staging area, the file list."""

    cfg: PrepareConfig
    rules: Rules
    spec: SplitSpec
    adapter: Adapter
    stage: StagedOutput
    files: list[str]
    cpus: int
    timings: dict[str, float] = field(default_factory=dict)


def _prepare_items(run: _Run, src: Source, file_offset: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read, validate and dedupe the catalogue; tokenize and write `items/`."""
    import ray
    import ray.data

    rows = read_raw(src.files, src.fs, src.spec, file_offset=file_offset).map_batches(
        parse_items,
        fn_args=(run.adapter, run.rules, run.files),
        batch_format="pyarrow",
        batch_size=None,
    )
    table = pa.concat_tables(ray.get(list(rows.to_arrow_refs())), promote_options="default")
    frame = table.to_pandas().sort_values([schema.SOURCE_FILE, schema.SOURCE_ROW], kind="stable")
    rejected = frame[frame[schema.REASON].notna()]
    valid = frame[frame[schema.REASON].isna()]
    dup = valid[schema.ITEM_ID].duplicated(keep="first").to_numpy()
    dups = valid[dup].assign(**{schema.REASON: DUPLICATE_ITEM})
    if not dups.empty:
        dups = dups.assign(
            record=[
                json.dumps({k: v for k, v in r.items() if v is not None})
                for r in dups[list(schema.ITEM_COLUMNS)].to_dict("records")
            ]
        )
    valid = valid[~dup].reset_index(drop=True)
    rejected = pd.concat([rejected, dups], ignore_index=True)
    counts: dict[str, Any] = {
        "read": len(frame),
        "valid": len(valid),
        "rejected": len(rejected),
        "rejected_by_reason": {k: int(v) for k, v in Counter(rejected[schema.REASON]).items()},
    }
    if len(rejected):
        _write(
            make_rejected(
                rejected[schema.REASON],
                rejected[schema.SOURCE_FILE],
                rejected[schema.SOURCE_ROW],
                rejected["record"].tolist(),
                run.files,
            ),
            run.stage.path("rejected", "items", "part-00000.parquet"),
        )
    _check_share(
        "items",
        counts,
        run.cfg.validation.max_rejected_fraction,
        run.stage.path("rejected", "items"),
    )
    if valid.empty:
        raise InputError("the item catalogue has no valid rows")
    extra = run.adapter.extra_item_text()
    for name in sorted({k for d in extra.values() for k in d}):
        valid[name] = [
            extra.get(i, {}).get(name) or old
            for i, old in zip(valid[schema.ITEM_ID], valid[name], strict=True)
        ]
    valid[schema.ITEM_IDX] = np.arange(1, len(valid) + 1, dtype=np.int32)
    (
        ray.data.from_pandas(valid[[schema.ITEM_IDX, *schema.ITEM_COLUMNS]])
        .map_batches(
            ItemTokenizer,
            fn_constructor_args=(run.cfg.text,),
            batch_size=2048,
            batch_format="pyarrow",
            compute=_pool(run.cpus, math.ceil(len(valid) / 2048)),
        )
        .write_parquet(run.stage.path("items"))
    )
    return valid, counts


def _validate_interactions(
    run: _Run, src: Source, item_ids: np.ndarray, num_buckets: int
) -> dict[str, Any]:
    """Pass 1: every raw interaction is either bucketed (valid) or written to rejected/."""
    import ray

    stats = (
        read_raw(src.files, src.fs, src.spec)
        .map_batches(
            InteractionValidator,
            fn_constructor_args=(
                run.adapter,
                run.rules,
                ray.put(item_ids),
                num_buckets,
                run.stage.path("_work"),
                run.stage.path("rejected", "interactions"),
                run.files,
            ),
            batch_format="pyarrow",
            batch_size=None,
            compute=_pool(run.cpus),
        )
        .to_pandas()
    )
    totals = stats.groupby("key")["count"].sum()
    by_reason = {k.split(":", 1)[1]: int(v) for k, v in totals.items() if k.startswith("rejected:")}
    counts = {"read": int(totals.get("read", 0)), "rejected_by_reason": by_reason}
    counts["rejected"] = sum(by_reason.values())
    _check_share(
        "interactions",
        counts,
        run.cfg.validation.max_rejected_fraction,
        run.stage.path("rejected", "interactions"),
    )
    return counts


def _sequence(
    run: _Run, buckets, n_items: int, counts: dict[str, Any]
) -> tuple[np.ndarray, dict[str, int]]:
    """Pass 2: order, dedupe, filter and split each bucket; returns train item counts."""
    seq = buckets.map_batches(
        BucketSequencer,
        fn_constructor_args=(run.spec, run.stage.path("_work"), run.stage.staging, run.files),
        batch_size=1,
        compute=_pool(run.cpus, buckets.count()),
    ).to_pandas()
    totals: Counter = Counter()
    train_counts = np.zeros(n_items + 1, dtype=np.int64)
    for _, row in seq.iterrows():
        totals.update(json.loads(row["stats"]))
        np.add.at(
            train_counts, np.asarray(row["items"], np.int64), np.asarray(row["counts"], np.int64)
        )
    by_reason = counts["rejected_by_reason"]
    if totals["duplicates"]:
        by_reason[DUPLICATE_EVENT] = int(totals["duplicates"])
    counts["rejected"] = sum(by_reason.values())
    counts["filtered"] = int(totals["filtered"])
    counts["filtered_by_reason"] = (
        {BELOW_MIN_INTERACTIONS: int(totals["filtered"])} if totals["filtered"] else {}
    )
    counts["kept"] = int(totals["kept"])
    counts["by_split"] = {k: int(totals.get(f"split:{k}", 0)) for k in schema.SPLITS}
    accounted = counts["kept"] + counts["rejected"] + counts["filtered"]
    if accounted != counts["read"]:
        raise RuntimeError(f"internal error: {counts['read']} rows read, {accounted} accounted for")
    _check_share(
        "interactions",
        counts,
        run.cfg.validation.max_rejected_fraction,
        run.stage.path("rejected", "interactions"),
    )
    users = {"kept": int(totals["users_kept"]), "filtered": int(totals["users_filtered"])}
    users["total"] = users["kept"] + users["filtered"]
    return train_counts, users


def _examples(run: _Run, buckets, train_counts: np.ndarray) -> dict[str, int]:
    """Pass 3: history windows, targets and negatives for every bucket."""
    import ray

    neg = run.cfg.negatives
    sampler = NegativeSampler.from_counts(train_counts, neg.sampler, neg.popularity_alpha, neg.seed)
    ex = buckets.map_batches(
        BucketExampleBuilder,
        fn_constructor_args=(run.spec, ray.put(sampler), neg.num_negatives, run.stage.staging),
        batch_size=1,
        compute=_pool(run.cpus, buckets.count()),
    ).to_pandas()
    totals: Counter = Counter()
    for st in ex["stats"]:
        totals.update(json.loads(st))
    return {k: int(totals.get(k, 0)) for k in schema.SPLITS}


def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the stage and publish its output; returns the manifest."""
    import ray
    import ray.data

    from ray_app.runtime import cluster_cpus, ensure_ray

    t_start = time.time()
    rules = resolve_rules(cfg)
    TextRenderer(cfg.text)  # template errors surface before any work
    adapter = make_adapter(cfg.input)
    isrc, tsrc = adapter.interaction_source(), adapter.item_source()
    spec = split_spec(cfg, adapter.file_splits)
    files = [f.path for f in isrc.files] + [f.path for f in tsrc.files]
    ensure_ray(cfg.ray)
    cpus = cluster_cpus()

    with StagedOutput(cfg.output, overwrite=cfg.overwrite) as stage:
        run = _Run(cfg, rules, spec, adapter, stage, files, cpus)
        timer = _Timer(run.timings)
        with timer("items_s"):
            items, item_counts = _prepare_items(run, tsrc, file_offset=len(isrc.files))
        fmt = detect_format(isrc.files[0].path, isrc.spec.format)
        num_buckets = _auto_buckets(cfg, isrc.files, fmt, cpus)
        with timer("validate_s"):
            counts = _validate_interactions(
                run, isrc, items[schema.ITEM_ID].to_numpy(dtype=object), num_buckets
            )
        buckets = ray.data.from_items(
            [{"bucket": b} for b in range(num_buckets)], override_num_blocks=num_buckets
        )
        with timer("sequence_s"):
            train_counts, users = _sequence(run, buckets, len(items), counts)
            stage.fs.delete_dir(resolve(stage.path("_work"))[1])
        with timer("examples_s"):
            examples = _examples(run, buckets, train_counts)
        run.timings["total_s"] = round(time.time() - t_start, 3)
        item_counts["with_train_interactions"] = int((train_counts[1:] > 0).sum())
        manifest = stage.manifest(
            "prepare",
            cfg,
            t_start,
            ray_version=ray.__version__,
            inputs={
                "adapter": cfg.input.adapter,
                "files": [
                    {"path": f.path, "size": f.size, "mtime": f.mtime}
                    for f in isrc.files + tsrc.files
                ],
                "side_files": adapter.side_files,
            },
            resolved={
                "min_timestamp": rules.min_timestamp,
                "max_timestamp": rules.max_timestamp,
                "num_buckets": num_buckets,
                "event_types": list(rules.event_types),
                "num_items": len(items),
                "item_idx_padding": schema.PAD_IDX,
            },
            counts={
                "interactions": counts,
                "users": users,
                "items": item_counts,
                "examples": examples,
            },
            timings=run.timings,
        )
        stage.publish(manifest)
    logger.info("prepare done in %.1fs: %s", run.timings["total_s"], manifest["counts"])
    return manifest


class _Timer:
    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    @contextmanager
    def __call__(self, key: str):
        t = time.time()
        yield
        self.into[key] = round(time.time() - t, 3)


def _check_share(what: str, counts: dict[str, Any], limit: float, where: str) -> None:
    read = counts["read"]
    if read == 0:
        raise InputError(f"no {what} rows were read")
    share = counts["rejected"] / read
    if share > limit:
        top = sorted(counts["rejected_by_reason"].items(), key=lambda kv: -kv[1])[:5]
        reasons = ", ".join(f"{k}={v}" for k, v in top)
        raise RejectedShareError(
            f"{counts['rejected']} of {read} {what} rows rejected ({share:.1%} > "
            f"validation.max_rejected_fraction={limit:.1%}); top reasons: {reasons}. "
            f"Rejected rows are in {where}"
        )
