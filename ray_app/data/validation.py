"""Row-level parsing and validation of interactions and items.

Vectorized over Arrow/pandas batches. Each check yields a reason string for
the rows it rejects; the first failing check names the row's reason. The
reasons are a closed vocabulary (below) so manifests and dashboards can count
them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ray_app.data import schema
from ray_app.data.text import join_list

MISSING_USER_ID = "missing_user_id"
MISSING_ITEM_ID = "missing_item_id"
ID_TOO_LONG = "id_too_long"
MISSING_TIMESTAMP = "missing_timestamp"
BAD_TIMESTAMP = "bad_timestamp"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
BAD_VALUE = "bad_value"
UNKNOWN_ITEM = "unknown_item"
DUPLICATE_EVENT = "duplicate_event"
TEXT_TOO_LONG = "text_too_long"
DUPLICATE_ITEM = "duplicate_item"
BELOW_MIN_INTERACTIONS = "user_below_min_interactions"
NO_HISTORY = "no_history_before_target"

_UNIT_DIV = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class Rules:
    """Resolved validation settings (times already in epoch seconds)."""

    event_types: tuple[str, ...]
    default_event_type: str
    min_timestamp: int
    max_timestamp: int
    max_id_chars: int
    max_text_chars: int
    timestamp_unit: str = "s"


class Reasons:
    """Accumulates the first rejection reason per row."""

    def __init__(self, initial: pa.Array | pa.ChunkedArray | None, n: int) -> None:
        if initial is None:
            self.values = np.full(n, None, dtype=object)
        else:
            self.values = np.asarray(
                initial.to_pylist() if initial.null_count < n else [None] * n, dtype=object
            )

    def add(self, mask: np.ndarray, reason: str) -> None:
        free = pd.isna(self.values)
        self.values[mask & free] = reason

    @property
    def ok(self) -> np.ndarray:
        return pd.isna(self.values)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _clean_str(col: pa.ChunkedArray | pa.Array | None, n: int) -> pd.Series:
    """Text of a column, trimmed, blanks as None. A list-typed column (genres, tags,
    categories as Parquet `list<string>`) reads as its `|`-delimited string form,
    the form the text template splits and JSON-list text is flattened to."""
    if col is None:
        return pd.Series([None] * n, dtype=object)
    if _is_list(col.type):
        col = pa.array([join_list(v) for v in col.to_pylist()], pa.string())
    elif not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    s = pc.utf8_trim_whitespace(col)
    return pd.Series(s.to_pandas(), dtype=object).where(lambda x: x.notna() & (x != ""), None)


def parse_timestamps(col: pa.ChunkedArray | pa.Array | None, n: int, unit: str = "s"):
    """Epoch seconds (int64), plus masks for missing and unparseable values.

    Accepts integers or floats in `unit`, Arrow timestamps, numeric strings and
    ISO-8601 strings (with or without offset; naive means UTC).
    """
    div = _UNIT_DIV[unit]
    out = np.zeros(n, dtype=np.int64)
    missing = np.zeros(n, dtype=bool)
    bad = np.zeros(n, dtype=bool)
    if col is None:
        missing[:] = True
        return out, missing, bad
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_timestamp(t):
        missing = col.is_null().to_numpy(zero_copy_only=False)
        vals = pc.cast(col.fill_null(0), pa.timestamp("s", tz=t.tz), safe=False)
        return pc.cast(vals, pa.int64()).to_numpy(), missing, bad
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        missing = col.is_null().to_numpy(zero_copy_only=False)
        v = (
            col.fill_null(0)
            .to_numpy(zero_copy_only=False)
            .astype(np.float64 if pa.types.is_floating(t) else np.int64)
        )
        if pa.types.is_floating(t):
            bad = ~np.isfinite(v) & ~missing
            v = np.where(np.isfinite(v), v, 0)
            out = np.floor(v / div).astype(np.int64)
        else:
            out = v // div
        return out, missing, bad
    s = _clean_str(col, n)
    missing = s.isna().to_numpy()
    num = pd.to_numeric(s, errors="coerce")
    is_num = num.notna().to_numpy()
    nv = num.to_numpy(dtype=np.float64, na_value=np.nan)
    out[is_num] = np.floor(nv[is_num] / div).astype(np.int64)
    rest = ~is_num & ~missing
    if rest.any():
        dt = pd.to_datetime(s[rest], format="ISO8601", utc=True, errors="coerce")
        ok = dt.notna().to_numpy()
        secs = np.zeros(len(dt), dtype=np.int64)
        if ok.any():
            delta = dt[ok] - pd.Timestamp(0, tz="UTC")
            secs[ok] = (delta // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)
        idx = np.flatnonzero(rest)
        out[idx] = secs
        bad[idx[~ok]] = True
    return out, missing, bad


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def normalize_interactions(table: pa.Table, rules: Rules) -> tuple[pd.DataFrame, np.ndarray]:
    """Contract-named batch -> typed interactions frame and per-row reasons (None = valid)."""
    n = table.num_rows
    reasons = Reasons(_column(table, schema.REASON), n)
    user = _clean_str(_column(table, schema.USER_ID), n)
    item = _clean_str(_column(table, schema.ITEM_ID), n)
    reasons.add(user.isna().to_numpy(), MISSING_USER_ID)
    reasons.add(item.isna().to_numpy(), MISSING_ITEM_ID)
    too_long = (user.str.len().fillna(0) > rules.max_id_chars) | (
        item.str.len().fillna(0) > rules.max_id_chars
    )
    reasons.add(too_long.to_numpy(), ID_TOO_LONG)
    ts, missing, bad = parse_timestamps(_column(table, schema.TIMESTAMP), n, rules.timestamp_unit)
    reasons.add(missing, MISSING_TIMESTAMP)
    reasons.add(bad, BAD_TIMESTAMP)
    reasons.add((ts < rules.min_timestamp) | (ts > rules.max_timestamp), TIMESTAMP_OUT_OF_RANGE)

    ev = _clean_str(_column(table, schema.EVENT_TYPE), n).str.lower()
    ev = ev.where(ev.notna(), rules.default_event_type)
    vocab = {e: i + 1 for i, e in enumerate(rules.event_types)}
    ev_idx = ev.map(vocab)
    reasons.add(ev_idx.isna().to_numpy(), UNKNOWN_EVENT_TYPE)

    raw_val = _column(table, schema.VALUE)
    if raw_val is None:
        value = np.full(n, np.nan, dtype=np.float32)
    elif pa.types.is_integer(raw_val.type) or pa.types.is_floating(raw_val.type):
        value = raw_val.to_numpy().astype(np.float32)
    else:
        vs = _clean_str(raw_val, n)
        num = pd.to_numeric(vs, errors="coerce")
        reasons.add((vs.notna() & num.isna()).to_numpy(), BAD_VALUE)
        value = num.to_numpy(dtype=np.float32, na_value=np.nan)

    frame = pd.DataFrame(
        {
            schema.USER_ID: user,
            schema.ITEM_ID: item,
            schema.TIMESTAMP: ts,
            schema.EVENT_TYPE: ev,
            schema.EVENT_IDX: ev_idx.fillna(0).astype(np.int8).to_numpy(),
            schema.VALUE: value,
            schema.SOURCE_FILE: table.column(schema.SOURCE_FILE).to_numpy(),
            schema.SOURCE_ROW: table.column(schema.SOURCE_ROW).to_numpy(),
        }
    )
    return frame, reasons.values


def normalize_items(
    table: pa.Table, max_id_chars: int, max_text_chars: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Contract-named catalogue batch -> item frame (text fields as str) and reasons."""
    n = table.num_rows
    reasons = Reasons(_column(table, schema.REASON), n)
    item = _clean_str(_column(table, schema.ITEM_ID), n)
    reasons.add(item.isna().to_numpy(), MISSING_ITEM_ID)
    reasons.add((item.str.len().fillna(0) > max_id_chars).to_numpy(), ID_TOO_LONG)
    data = {schema.ITEM_ID: item}
    total = np.zeros(n, dtype=np.int64)
    for f in schema.ITEM_TEXT_FIELDS:
        s = _clean_str(_column(table, f), n)
        data[f] = s
        total += s.str.len().fillna(0).to_numpy(dtype=np.int64)
    reasons.add(total > max_text_chars, TEXT_TOO_LONG)
    data[schema.SOURCE_FILE] = table.column(schema.SOURCE_FILE).to_numpy()
    data[schema.SOURCE_ROW] = table.column(schema.SOURCE_ROW).to_numpy()
    return pd.DataFrame(data), reasons.values


REJECTED_SCHEMA = pa.schema(
    [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("record", pa.string()),
    ]
)


def make_rejected(
    reasons, file_idx: np.ndarray, rows: np.ndarray, records: list, files: list[str]
) -> pa.Table:
    """The one constructor of `rejected/` rows: (reason, source file, row, record as JSON).

    `records` are dicts (serialised here) or JSON text already.
    """
    if len(rows) == 0:
        return REJECTED_SCHEMA.empty_table()
    return pa.table(
        {
            "reason": pa.array([str(r) for r in reasons], pa.string()),
            "source_file": pa.array(
                [files[i] if 0 <= i < len(files) else None for i in np.asarray(file_idx)],
                pa.string(),
            ),
            "source_row": pa.array(np.asarray(rows, dtype=np.int64)),
            "record": pa.array(
                [
                    r if isinstance(r, str) else json.dumps(r, ensure_ascii=False, default=str)
                    for r in records
                ],
                pa.string(),
            ),
        },
        schema=REJECTED_SCHEMA,
    )


def rejected_table(
    source: pa.Table, mask: np.ndarray, reasons: np.ndarray, files: list[str]
) -> pa.Table:
    """Rejected raw rows: every source column goes into the record."""
    idx = np.flatnonzero(mask)
    sub = source.take(pa.array(idx))
    data_cols = [
        c
        for c in sub.column_names
        if c not in (schema.SOURCE_FILE, schema.SOURCE_ROW, schema.REASON)
    ]
    return make_rejected(
        reasons[idx],
        sub.column(schema.SOURCE_FILE).to_numpy(),
        sub.column(schema.SOURCE_ROW).to_numpy(),
        sub.select(data_cols).to_pylist(),
        files,
    )
