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
import logging
import math
import time
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ray_app.config import PrepareConfig, dump_config, parse_time
from ray_app.data import schema as S
from ray_app.data.adapters import Adapter, make_adapter
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
    DUPLICATE_ITEM,
    UNKNOWN_ITEM,
    Rules,
    normalize_interactions,
    normalize_items,
    rejected_table,
)
from ray_app.storage import InputError, StagedOutput, code_version, join, resolve

logger = logging.getLogger(__name__)

_BYTES_PER_EVENT = {"parquet": 12, "csv": 32, "tsv": 32, "jsonl": 400}
EVENTS_PER_BUCKET = 500_000


class RejectedShareError(RuntimeError):
    """Too many input rows were rejected; the run stops before publishing."""


def resolve_rules(cfg: PrepareConfig) -> Rules:
    v = cfg.validation
    max_ts = parse_time(v.max_timestamp) if v.max_timestamp is not None else int(time.time()) + 86_400
    return Rules(
        event_types=tuple(e.lower() for e in v.event_types),
        default_event_type=v.default_event_type.lower(),
        min_timestamp=parse_time(v.min_timestamp),
        max_timestamp=max_ts,
        max_id_chars=v.max_id_chars,
        max_text_chars=v.max_text_chars,
        timestamp_unit=cfg.input.timestamp_unit,
    )


def split_spec(cfg: PrepareConfig) -> SplitSpec:
    sp = cfg.split
    return SplitSpec(
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
    f = table.column(S.SOURCE_FILE)
    r = table.column(S.SOURCE_ROW)
    key = f"{f[0]}-{r[0]}-{f[-1]}-{r[-1]}-{table.num_rows}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _counts_table(counts: Counter) -> pa.Table:
    return pa.table(
        {"key": pa.array(list(counts), pa.string()), "count": pa.array(list(counts.values()), pa.int64())}
    )


def parse_items(table: pa.Table, adapter: Adapter, rules: Rules, files: list[str]) -> pa.Table:
    """Raw catalogue batch -> contract item rows; rejected ones carry reason and record."""
    contract = adapter.to_items(table)
    frame, reasons = normalize_items(contract, rules.max_id_chars, rules.max_text_chars)
    bad = ~pd.isna(reasons)
    rej = rejected_table(table, bad, reasons, files)
    frame[S.REASON] = None
    frame["record"] = None
    out = pa.Table.from_pandas(frame[~bad], preserve_index=False, schema=_ITEM_ROWS)
    if rej.num_rows:
        rows = pd.DataFrame({S.REASON: rej.column("reason").to_pylist(),
                             "record": rej.column("record").to_pylist(),
                             S.SOURCE_FILE: frame[S.SOURCE_FILE].to_numpy()[bad],
                             S.SOURCE_ROW: frame[S.SOURCE_ROW].to_numpy()[bad]})
        out = pa.concat_tables([out, pa.Table.from_pandas(rows, preserve_index=False, schema=_ITEM_ROWS)],
                               promote_options="default")
    return out


_ITEM_ROWS = pa.schema(
    [pa.field(S.ITEM_ID, pa.string())]
    + [pa.field(f, pa.string()) for f in S.ITEM_TEXT_FIELDS]
    + [pa.field(S.SOURCE_FILE, pa.int32()), pa.field(S.SOURCE_ROW, pa.int64()),
       pa.field(S.REASON, pa.string()), pa.field("record", pa.string())]
)


class InteractionValidator:
    """Pass 1 (Ray Data actor): validate a raw batch, bucket valid rows by user, keep rejects."""

    def __init__(
        self, adapter: Adapter, rules: Rules, item_ids: Any, num_buckets: int,
        work_dir: str, rejected_dir: str, files: list[str],
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
            raw, self.adapter, self.rules, self.index, self.num_buckets,
            self.work_dir, self.rejected_dir, self.files,
        )


def validate_and_bucket(
    raw: pa.Table, adapter: Adapter, rules: Rules, index: pd.Index, num_buckets: int,
    work_dir: str, rejected_dir: str, files: list[str],
) -> pa.Table:
    contract = adapter.to_interactions(raw)
    frame, reasons = normalize_interactions(contract, rules)
    item_idx = index.get_indexer(frame[S.ITEM_ID].to_numpy())
    unknown = (item_idx < 0) & pd.isna(reasons)
    reasons[unknown] = UNKNOWN_ITEM
    ok = pd.isna(reasons)
    name = _batch_name(raw)
    counts: Counter = Counter({"read": raw.num_rows, "valid": int(ok.sum())})
    counts.update(f"rejected:{r}" for r in reasons[~ok])
    if (~ok).any():
        _write(rejected_table(raw, ~ok, reasons, files), join(rejected_dir, f"{name}.parquet"))
    good = frame[ok].copy()
    good[S.ITEM_IDX] = (item_idx[ok] + 1).astype(np.int32)
    bucket = (user_hash(good[S.USER_ID].to_numpy()) % np.uint64(num_buckets)).astype(np.int64)
    for b in np.unique(bucket):
        part = good[bucket == b]
        _write(pa.Table.from_pandas(part, preserve_index=False),
               join(work_dir, f"b={b:05d}", f"{name}.parquet"))
    return _counts_table(counts)


def _read_bucket(work_dir: str, bucket: int) -> pd.DataFrame:
    import pyarrow.dataset as pads

    fs, path = resolve(join(work_dir, f"b={bucket:05d}"))
    from pyarrow.fs import FileType

    if fs.get_file_info(path).type == FileType.NotFound:
        return pd.DataFrame(columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.EVENT_TYPE, S.EVENT_IDX,
                                     S.VALUE, S.SOURCE_FILE, S.SOURCE_ROW, S.ITEM_IDX])
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pandas()


def sequence_bucket(events: pd.DataFrame, spec: SplitSpec) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Order, dedupe, filter, split one bucket: (kept, duplicates, filtered)."""
    events, dups = order_and_dedupe(events)
    kept, filtered = assign_splits(events, spec)
    return kept, dups, filtered


class BucketSequencer:
    """Pass 2 (Ray Data actor): one bucket of users -> ordered, split interactions."""

    def __init__(self, spec: SplitSpec, work_dir: str, out_dir: str, files: list[str]) -> None:
        self.spec, self.work_dir, self.out_dir, self.files = spec, work_dir, out_dir, files

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self._one(int(b)) for b in batch["bucket"]]
        return {k: np.array([r[k] for r in results], dtype=object) for k in results[0]}

    def _one(self, b: int) -> dict[str, Any]:
        kept, dups, filtered = sequence_bucket(_read_bucket(self.work_dir, b), self.spec)
        if not dups.empty:
            _write(rejected_events(dups, self.files),
                   join(self.out_dir, "rejected", "interactions", f"dup-{b:05d}.parquet"))
        if not filtered.empty:
            _write(rejected_events(filtered, self.files), join(self.out_dir, "filtered", f"part-{b:05d}.parquet"))
        if not kept.empty:
            _write(_interactions_table(kept), join(self.out_dir, "interactions", f"part-{b:05d}.parquet"))
        train = kept[kept[S.SPLIT] == "train"] if not kept.empty else kept
        items, cnt = np.unique(train[S.ITEM_IDX].to_numpy(np.int64), return_counts=True)
        return {
            "bucket": b,
            "stats": {
                "kept": len(kept), "duplicates": len(dups), "filtered": len(filtered),
                "users_kept": int(kept[S.USER_ID].nunique()) if len(kept) else 0,
                "users_filtered": int(filtered[S.USER_ID].nunique()) if len(filtered) else 0,
                **{f"split:{k}": int(v) for k, v in kept[S.SPLIT].value_counts().items()},
            },
            "items": items,
            "counts": cnt,
        }


def _interactions_table(kept: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(kept[[f.name for f in S.INTERACTIONS_SCHEMA]], schema=S.INTERACTIONS_SCHEMA,
                                preserve_index=False)


class BucketExampleBuilder:
    """Pass 3 (Ray Data actor): one bucket's interactions -> examples with negatives."""

    def __init__(self, spec: SplitSpec, sampler: Any, num_negatives: int, out_dir: str) -> None:
        import ray

        self.sampler = ray.get(sampler) if isinstance(sampler, ray.ObjectRef) else sampler
        self.spec, self.k, self.out_dir = spec, num_negatives, out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = [self._one(int(b)) for b in batch["bucket"]]
        return {"bucket": batch["bucket"], "stats": np.array(counts, dtype=object)}

    def _one(self, b: int) -> dict[str, int]:
        fs, path = resolve(join(self.out_dir, "interactions", f"part-{b:05d}.parquet"))
        from pyarrow.fs import FileType

        if fs.get_file_info(path).type == FileType.NotFound:
            return {}
        events = pq.read_table(path, filesystem=fs).to_pandas()
        counts: dict[str, int] = {}
        for split, rows in target_rows(events, self.spec).items():
            for i, table in enumerate(build_examples(events, rows, self.spec, self.sampler, self.k)):
                _write(table, join(self.out_dir, "examples", split, f"part-{b:05d}-{i:04d}.parquet"))
                counts[split] = counts.get(split, 0) + table.num_rows
        return counts


def _auto_buckets(cfg: PrepareConfig, files, fmt: str, cpus: int) -> int:
    if cfg.num_buckets:
        return cfg.num_buckets
    est_events = sum(f.size for f in files) / _BYTES_PER_EVENT.get(fmt, 32)
    return max(cpus, math.ceil(est_events / EVENTS_PER_BUCKET))


def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the stage and publish its output; returns the manifest."""
    import ray
    import ray.data

    from ray_app.runtime import cluster_cpus, ensure_ray

    t_start = time.time()
    timings: dict[str, float] = {}
    rules = resolve_rules(cfg)
    spec = split_spec(cfg)
    TextRenderer(cfg.text)  # template errors before any work
    adapter = make_adapter(cfg.input)
    isrc = adapter.interaction_source()
    tsrc = adapter.item_source()
    files = [f.path for f in isrc.files] + [f.path for f in tsrc.files]
    n_int_files = len(isrc.files)
    ensure_ray(cfg.ray)
    cpus = cluster_cpus()
    pool = (1, cpus)

    with StagedOutput(cfg.output, overwrite=cfg.overwrite) as stage:
        # ---- items
        t = time.time()
        item_rows = (
            read_raw(tsrc.files, tsrc.fs, tsrc.spec, file_offset=n_int_files)
            .map_batches(parse_items, fn_args=(adapter, rules, files), batch_format="pyarrow",
                         batch_size=None)
        )
        item_tab = pa.concat_tables(ray.get(list(item_rows.to_arrow_refs())), promote_options="default")
        items_df = item_tab.to_pandas().sort_values([S.SOURCE_FILE, S.SOURCE_ROW], kind="stable")
        rejected_items = items_df[items_df[S.REASON].notna()]
        valid = items_df[items_df[S.REASON].isna()]
        dup = valid[S.ITEM_ID].duplicated(keep="first").to_numpy()
        dup_rows = valid[dup].assign(**{S.REASON: DUPLICATE_ITEM})
        valid = valid[~dup].reset_index(drop=True)
        if not dup_rows.empty:
            dup_rows = dup_rows.assign(record=[
                pd.Series(r).dropna().to_json() for r in dup_rows[list(S.ITEM_COLUMNS)].to_dict("records")
            ])
        all_rej = pd.concat([rejected_items, dup_rows], ignore_index=True)
        item_counts = {
            "read": len(items_df),
            "valid": len(valid),
            "rejected": len(all_rej),
            "rejected_by_reason": dict(Counter(all_rej[S.REASON])) if len(all_rej) else {},
        }
        if len(all_rej):
            _write(
                pa.table({
                    "reason": pa.array(all_rej[S.REASON].astype(str)),
                    "source_file": pa.array([files[i] for i in all_rej[S.SOURCE_FILE]], pa.string()),
                    "source_row": pa.array(all_rej[S.SOURCE_ROW].to_numpy(np.int64)),
                    "record": pa.array(all_rej["record"].astype(str)),
                }),
                stage.path("rejected", "items", "part-00000.parquet"),
            )
        _check_share("items", item_counts, cfg.validation.max_rejected_fraction, stage.path("rejected", "items"))
        if valid.empty:
            raise InputError("the item catalogue has no valid rows")
        extra = adapter.extra_item_text()
        for field in {k for d in extra.values() for k in d}:
            valid[field] = [
                (extra.get(i, {}).get(field) or old) for i, old in zip(valid[S.ITEM_ID], valid[field], strict=True)
            ]
        valid[S.ITEM_IDX] = np.arange(1, len(valid) + 1, dtype=np.int32)
        (
            ray.data.from_pandas(valid[[S.ITEM_IDX, *S.ITEM_COLUMNS]])
            .map_batches(ItemTokenizer, fn_constructor_args=(cfg.text,), batch_size=2048,
                         batch_format="pyarrow", concurrency=pool)
            .write_parquet(stage.path("items"))
        )
        timings["items_s"] = round(time.time() - t, 3)

        # ---- pass 1: validate and bucket interactions
        t = time.time()
        fmt = detect_format(isrc.files[0].path, isrc.spec.format)
        num_buckets = _auto_buckets(cfg, isrc.files, fmt, cpus)
        work = stage.path("_work")
        ids_ref = ray.put(valid[S.ITEM_ID].to_numpy(dtype=object))
        stats = (
            read_raw(isrc.files, isrc.fs, isrc.spec)
            .map_batches(
                InteractionValidator,
                fn_constructor_args=(adapter, rules, ids_ref, num_buckets, work,
                                     stage.path("rejected", "interactions"), files),
                batch_format="pyarrow", batch_size=None, concurrency=pool,
            )
            .to_pandas()
        )
        c1 = Counter(dict(stats.groupby("key")["count"].sum().astype(int)))
        rejected_by_reason = {k.split(":", 1)[1]: int(v) for k, v in c1.items() if k.startswith("rejected:")}
        inter_counts = {"read": int(c1["read"]), "rejected_by_reason": rejected_by_reason}
        inter_counts["rejected"] = sum(rejected_by_reason.values())
        _check_share("interactions", inter_counts, cfg.validation.max_rejected_fraction,
                     stage.path("rejected", "interactions"))
        timings["validate_s"] = round(time.time() - t, 3)

        # ---- pass 2: order, dedupe, split per bucket
        t = time.time()
        buckets = ray.data.from_items([{"bucket": b} for b in range(num_buckets)],
                                      override_num_blocks=num_buckets)
        seq = buckets.map_batches(
            BucketSequencer, fn_constructor_args=(spec, work, stage.staging, files),
            batch_size=1, concurrency=pool,
        ).to_pandas()
        s2: Counter = Counter()
        n_items_total = len(valid) + 1
        train_counts = np.zeros(n_items_total, dtype=np.int64)
        for _, row in seq.iterrows():
            s2.update(row["stats"])
            np.add.at(train_counts, np.asarray(row["items"], dtype=np.int64), np.asarray(row["counts"], dtype=np.int64))
        if s2["duplicates"]:
            rejected_by_reason["duplicate_event"] = int(s2["duplicates"])
        inter_counts["rejected"] = sum(rejected_by_reason.values())
        inter_counts.update({
            "filtered": int(s2["filtered"]),
            "filtered_by_reason": {"user_below_min_interactions": int(s2["filtered"])} if s2["filtered"] else {},
            "kept": int(s2["kept"]),
            "by_split": {k: int(s2.get(f"split:{k}", 0)) for k in S.SPLITS},
        })
        accounted = inter_counts["kept"] + inter_counts["rejected"] + inter_counts["filtered"]
        if accounted != inter_counts["read"]:
            raise RuntimeError(
                f"internal error: {inter_counts['read']} interactions read but {accounted} accounted for"
            )
        _check_share("interactions", inter_counts, cfg.validation.max_rejected_fraction,
                     stage.path("rejected", "interactions"))
        stage.fs.delete_dir(resolve(work)[1])
        timings["sequence_s"] = round(time.time() - t, 3)

        # ---- pass 3: examples with negatives
        t = time.time()
        neg = cfg.negatives
        sampler = NegativeSampler.from_counts(train_counts, neg.sampler, neg.popularity_alpha, neg.seed)
        ex = buckets.map_batches(
            BucketExampleBuilder,
            fn_constructor_args=(spec, ray.put(sampler), neg.num_negatives, stage.staging),
            batch_size=1, concurrency=pool,
        ).to_pandas()
        ex_counts: Counter = Counter()
        for st in ex["stats"]:
            ex_counts.update(st)
        timings["examples_s"] = round(time.time() - t, 3)
        timings["total_s"] = round(time.time() - t_start, 3)

        item_counts["with_train_interactions"] = int((train_counts[1:] > 0).sum())
        manifest = {
            "stage": "prepare",
            "run_id": stage.run_id,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "code_version": code_version(),
            "ray_version": ray.__version__,
            "inputs": {
                "adapter": cfg.input.adapter,
                "files": [{"path": f.path, "size": f.size, "mtime": f.mtime} for f in isrc.files + tsrc.files],
            },
            "config": dump_config(cfg),
            "resolved": {
                "min_timestamp": rules.min_timestamp, "max_timestamp": rules.max_timestamp,
                "num_buckets": num_buckets, "event_types": list(rules.event_types),
                "num_items": len(valid), "item_idx_padding": S.PAD_IDX,
            },
            "counts": {
                "interactions": inter_counts,
                "users": {"kept": int(s2["users_kept"]), "filtered": int(s2["users_filtered"]),
                          "total": int(s2["users_kept"] + s2["users_filtered"])},
                "items": item_counts,
                "examples": {k: int(ex_counts.get(k, 0)) for k in S.SPLITS},
            },
            "timings": timings,
        }
        stage.publish(manifest)
    logger.info("prepare done in %.1fs: %s", timings["total_s"], manifest["counts"])
    return manifest


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
