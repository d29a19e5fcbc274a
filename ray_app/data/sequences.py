"""Per-user sequences: time order, dedupe, split, history windows, examples.

Pure functions over one pandas frame holding *all* events of a set of users
(one hash bucket in the Ray pipeline, everything in the single-process
reference). Nothing here depends on how users are partitioned, so bucket
count and worker count never change the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from ray_app.data import schema
from ray_app.data.negatives import NegativeSampler, splitmix64, user_hash
from ray_app.data.validation import BELOW_MIN_INTERACTIONS, DUPLICATE_EVENT, make_rejected

SORT_KEYS = [schema.USER_ID, schema.TIMESTAMP, schema.SOURCE_FILE, schema.SOURCE_ROW]
DEDUPE_KEYS = [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, schema.EVENT_TYPE]
TRAIN, VALID, TEST = schema.SPLITS


@dataclass(frozen=True)
class SplitSpec:
    method: str  # leave_last_out | time
    min_interactions: int
    max_history: int
    valid_start: int | None = None
    test_start: int | None = None
    # presplit: split label of each source file index.
    file_splits: tuple[str, ...] | None = None


def order_and_dedupe(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sort each user's events by time (ties: file order); split off exact duplicates.

    A duplicate is the same user, item, timestamp and event type; the first
    occurrence in file order is kept.
    """
    events = events.sort_values(SORT_KEYS, kind="stable", ignore_index=True)
    dup = events.duplicated(subset=DEDUPE_KEYS, keep="first").to_numpy()
    return events[~dup].reset_index(drop=True), events[dup].assign(
        **{schema.REASON: DUPLICATE_EVENT}
    )


def assign_splits(events: pd.DataFrame, spec: SplitSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the `split` column; split off users below `min_interactions` (a documented filter).

    `events` must be ordered by `order_and_dedupe`.
    """
    user = events[schema.USER_ID].to_numpy()
    n = len(events)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if n else np.array([], int)
    lengths = np.diff(np.r_[starts, n])
    per_row_len = np.repeat(lengths, lengths)
    keep = per_row_len >= spec.min_interactions
    filtered = events[~keep].assign(**{schema.REASON: BELOW_MIN_INTERACTIONS})
    events = events[keep].reset_index(drop=True)
    pos_from_end = _pos_from_end(events[schema.USER_ID].to_numpy())
    split = np.full(len(events), TRAIN, dtype=object)
    if spec.method == "leave_last_out":
        split[pos_from_end == 0] = TEST
        split[pos_from_end == 1] = VALID
    elif spec.method == "presplit":
        split = np.asarray(spec.file_splits, dtype=object)[
            events[schema.SOURCE_FILE].to_numpy(np.int64)
        ]
    else:
        ts = events[schema.TIMESTAMP].to_numpy()
        split[ts >= spec.valid_start] = VALID
        split[ts >= spec.test_start] = TEST
    events[schema.SPLIT] = split
    return events, filtered


def _pos_from_end(user: np.ndarray) -> np.ndarray:
    n = len(user)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    idx = np.arange(n) - np.repeat(starts, lengths)
    return np.repeat(lengths, lengths) - 1 - idx


def target_rows(events: pd.DataFrame, spec: SplitSpec) -> dict[str, np.ndarray]:
    """Row positions that are prediction targets, per split.

    Every target has at least one earlier event as history. Leave-last-out:
    every train event but each user's first is a train target; valid and test
    are one target each. Time split and presplit: each user's first valid
    event and first test event (in time order) that have an earlier event.
    """
    user = events[schema.USER_ID].to_numpy()
    n = len(events)
    if n == 0:
        return {s: np.zeros(0, dtype=np.int64) for s in schema.SPLITS}
    first = np.r_[True, user[1:] != user[:-1]]
    split = events[schema.SPLIT].to_numpy()
    out = {TRAIN: np.flatnonzero((split == TRAIN) & ~first)}
    for s in (VALID, TEST):
        is_s = split == s
        if spec.method == "leave_last_out":
            out[s] = np.flatnonzero(is_s & ~first)
        else:
            idx = np.flatnonzero(is_s)
            owner = user[idx]
            first_of_user = idx[np.r_[True, owner[1:] != owner[:-1]]] if len(idx) else idx
            out[s] = first_of_user[~first[first_of_user]]
    return out


def build_examples(
    events: pd.DataFrame,
    targets: np.ndarray,
    spec: SplitSpec,
    sampler: NegativeSampler | None,
    num_negatives: int,
    chunk_rows: int = 100_000,
) -> Iterator[pa.Table]:
    """Examples for `targets`, in chunks: the last `max_history` events before each target."""
    if len(targets) == 0:
        return
    user = events[schema.USER_ID].to_numpy()
    n = len(events)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lengths = np.diff(np.r_[starts, n])
    user_start = np.repeat(starts, lengths)
    item_idx = events[schema.ITEM_IDX].to_numpy(np.int32)
    ts = events[schema.TIMESTAMP].to_numpy(np.int64)
    ev = events[schema.EVENT_IDX].to_numpy(np.int8)
    uhash = user_hash(user)
    window = np.arange(-spec.max_history, 0)
    for lo in range(0, len(targets), chunk_rows):
        t = targets[lo : lo + chunk_rows]
        hist_start = np.maximum(user_start[t], t - spec.max_history)
        hist_len = (t - hist_start).astype(np.int32)
        pos = t[:, None] + window[None, :]
        valid = pos >= hist_start[:, None]
        flat = pos[valid]
        offsets = np.r_[0, np.cumsum(hist_len)].astype(np.int32)
        gaps = (ts[t][:, None] - ts[np.maximum(pos, 0)])[valid]
        target_pos = (t - user_start[t]).astype(np.uint64)
        if sampler is not None and num_negatives > 0:
            negs = _negatives(
                sampler, user, uhash, item_idx, starts, lengths, t, target_pos, num_negatives
            )
        else:
            negs = np.zeros((len(t), 0), dtype=np.int32)
        neg_offsets = (np.arange(len(t) + 1) * negs.shape[1]).astype(np.int32)
        yield pa.table(
            {
                schema.USER_ID: pa.array(user[t], pa.string()),
                schema.TARGET_ITEM_ID: pa.array(events[schema.ITEM_ID].to_numpy()[t], pa.string()),
                schema.TARGET_ITEM_IDX: pa.array(item_idx[t]),
                schema.TARGET_TIMESTAMP: pa.array(ts[t]),
                schema.TARGET_EVENT_IDX: pa.array(ev[t]),
                schema.TARGET_POS: pa.array(target_pos.astype(np.int32)),
                schema.HIST_ITEM_IDX: pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(item_idx[flat])
                ),
                schema.HIST_EVENT_IDX: pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(ev[flat])
                ),
                schema.HIST_GAP: pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(gaps.astype(np.int64))
                ),
                schema.HIST_LEN: pa.array(hist_len),
                schema.NEGATIVES: pa.ListArray.from_arrays(
                    pa.array(neg_offsets), pa.array(negs.reshape(-1).astype(np.int32))
                ),
            },
            schema=schema.EXAMPLES_SCHEMA,
        )


def _negatives(
    sampler: NegativeSampler,
    user: np.ndarray,
    uhash: np.ndarray,
    item_idx: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    t: np.ndarray,
    target_pos: np.ndarray,
    k: int,
) -> np.ndarray:
    # Users of this chunk get small codes; their owned items are all their events.
    user_of_row = np.searchsorted(starts, t, side="right") - 1
    uniq, row_code = np.unique(user_of_row, return_inverse=True)
    lo, hi = starts[uniq[0]], starts[uniq[-1]] + lengths[uniq[-1]]
    seg_user = np.repeat(np.arange(len(starts)), lengths)[lo:hi]
    mine = np.isin(seg_user, uniq)
    own_rows = np.arange(lo, hi)[mine]
    own_codes = np.searchsorted(uniq, seg_user[mine])
    with np.errstate(over="ignore"):
        row_key = splitmix64(uhash[t] ^ (target_pos * np.uint64(0x2545F4914F6CDD1D)))
    return sampler.sample(row_code, row_key, (own_codes, item_idx[own_rows]), k)


def rejected_events(frame: pd.DataFrame, files: list[str]) -> pa.Table:
    """Interaction rows dropped after parsing (duplicates, filters) in the rejected schema."""
    cols = [schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, schema.EVENT_TYPE, schema.VALUE]
    records = frame[cols].astype({schema.VALUE: object}).where(frame[cols].notna(), None)
    return make_rejected(
        frame[schema.REASON].to_numpy(),
        frame[schema.SOURCE_FILE].to_numpy(),
        frame[schema.SOURCE_ROW].to_numpy(),
        records.to_dict(orient="records"),
        files,
    )
