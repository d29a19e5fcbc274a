"""Ordering, dedupe, splits, history windows and negatives (pure functions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_app.data import schema as S
from ray_app.data.negatives import NegativeSampler
from ray_app.data.sequences import (
    SplitSpec,
    assign_splits,
    build_examples,
    order_and_dedupe,
    target_rows,
)

LLO = SplitSpec(method="leave_last_out", min_interactions=3, max_history=2)


def events(rows) -> pd.DataFrame:
    """rows: (user, item_idx, ts[, event_type]) in file order."""
    df = pd.DataFrame(
        [
            (u, f"i{i}", i, ts, (r[3] if len(r) > 3 else "view"))
            for r in rows
            for u, i, ts in [r[:3]]
        ],
        columns=[S.USER_ID, S.ITEM_ID, S.ITEM_IDX, S.TIMESTAMP, S.EVENT_TYPE],
    )
    df[S.EVENT_IDX] = np.int8(1)
    df[S.VALUE] = np.float32("nan")
    df[S.SOURCE_FILE] = 0
    df[S.SOURCE_ROW] = np.arange(len(df))
    df[S.ITEM_IDX] = df[S.ITEM_IDX].astype(np.int32)
    return df


def test_time_order_ties_by_file_order_and_duplicates_split_off():
    df = events([("a", 3, 20), ("a", 1, 10), ("a", 2, 20), ("a", 1, 10), ("a", 1, 10, "click")])
    kept, dups = order_and_dedupe(df)
    assert kept[S.ITEM_IDX].tolist() == [1, 1, 3, 2]  # ts 10 (view, click), then ties in file order
    assert dups[S.SOURCE_ROW].tolist() == [3]
    assert dups[S.REASON].tolist() == ["duplicate_event"]


def test_leave_last_out_and_min_interactions():
    df = events([("a", i, i) for i in range(1, 6)] + [("b", 1, 1), ("b", 2, 2)])
    kept, _ = order_and_dedupe(df)
    kept, filtered = assign_splits(kept, LLO)
    assert set(filtered[S.USER_ID]) == {"b"}
    assert kept[S.SPLIT].tolist() == ["train", "train", "train", "valid", "test"]
    rows = target_rows(kept, LLO)
    assert kept[S.ITEM_IDX].to_numpy()[rows["train"]].tolist() == [
        2,
        3,
    ]  # first event has no history
    assert kept[S.ITEM_IDX].to_numpy()[rows["valid"]].tolist() == [4]
    assert kept[S.ITEM_IDX].to_numpy()[rows["test"]].tolist() == [5]


def test_global_time_split_targets_first_event_after_cutoff():
    spec = SplitSpec(
        method="time", min_interactions=3, max_history=5, valid_start=10, test_start=20
    )
    df = events([("a", 1, 1), ("a", 2, 11), ("a", 3, 12), ("a", 4, 21), ("a", 5, 22)])
    kept, _ = assign_splits(order_and_dedupe(df)[0], spec)
    assert kept[S.SPLIT].tolist() == ["train", "valid", "valid", "test", "test"]
    rows = target_rows(kept, spec)
    assert kept[S.ITEM_IDX].to_numpy()[rows["valid"]].tolist() == [2]
    assert kept[S.ITEM_IDX].to_numpy()[rows["test"]].tolist() == [4]


def test_history_window_gaps_and_negatives():
    df = events([("a", i, 100 * i) for i in range(1, 6)] + [("b", i, 10 * i) for i in range(6, 10)])
    kept, _ = assign_splits(order_and_dedupe(df)[0], LLO)
    sampler = NegativeSampler(np.r_[0.0, np.ones(30)], seed=1)
    rows = target_rows(kept, LLO)
    (test,) = list(build_examples(kept, rows["test"], LLO, sampler, 5))
    ex = test.to_pylist()
    a = next(e for e in ex if e[S.USER_ID] == "a")
    assert a[S.TARGET_ITEM_IDX] == 5
    assert a[S.HIST_ITEM_IDX] == [3, 4]  # last max_history=2 events, oldest first
    assert a[S.HIST_GAP] == [200, 100]
    assert a[S.HIST_LEN] == 2
    for e in ex:
        own = set(kept[kept[S.USER_ID] == e[S.USER_ID]][S.ITEM_IDX])
        assert len(e[S.NEGATIVES]) == 5
        assert not own & set(e[S.NEGATIVES])
        assert 0 not in e[S.NEGATIVES]


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_negatives_reproducible_and_independent_of_partitioning(kind):
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", int(rng.integers(1, 50)), int(t)) for u in range(40) for t in range(8)]
    df = events(rows)
    kept, _ = assign_splits(order_and_dedupe(df)[0], LLO)
    counts = np.bincount(kept[S.ITEM_IDX], minlength=51)
    sampler = NegativeSampler.from_counts(counts, kind, 0.75, seed=3)

    def negs(frame):
        rows = target_rows(frame, LLO)["train"]
        t = next(build_examples(frame, rows, LLO, sampler, 8))
        return {
            (u, ts): n
            for u, ts, n in zip(
                t[S.USER_ID].to_pylist(),
                t[S.TARGET_TIMESTAMP].to_pylist(),
                t[S.NEGATIVES].to_pylist(),
                strict=True,
            )
        }

    whole = negs(kept)
    half = kept[kept[S.USER_ID].isin([f"u{u}" for u in range(0, 40, 2)])].reset_index(drop=True)
    part = negs(half)
    assert part == {k: v for k, v in whole.items() if k in part}  # same user -> same draws
    assert whole == negs(kept)  # same seed -> same draws
    other = NegativeSampler.from_counts(counts, kind, 0.75, seed=4)
    t = next(build_examples(kept, target_rows(kept, LLO)["train"], LLO, other, 8))
    assert t[S.NEGATIVES].to_pylist() != list(whole.values())


def test_popularity_sampler_prefers_popular_items():
    counts = np.r_[0, 1000, np.zeros(99)]
    s = NegativeSampler.from_counts(counts, "popularity", 1.0, seed=0)
    out = s.sample(
        np.zeros(2000, int), np.arange(2000, dtype=np.uint64), (np.array([0]), np.array([50])), 1
    )
    share = (out == 1).mean()
    assert share > 0.8  # weight 1001 against 99 items of weight 1
    assert not (out == 50).any()


def test_presplit_labels_come_from_the_files():
    spec = SplitSpec(
        method="presplit", min_interactions=3, max_history=5, file_splits=("train", "valid", "test")
    )
    df = events([("a", 1, 1), ("a", 2, 5), ("a", 3, 3), ("a", 4, 9), ("a", 5, 7)])
    df[S.SOURCE_FILE] = [0, 1, 0, 2, 1]  # per-row file -> split
    kept, _ = assign_splits(order_and_dedupe(df)[0], spec)
    # time order: 1(t1,train) 3(t3,train) 2(t5,valid) 5(t7,valid) 4(t9,test)
    assert kept[S.ITEM_IDX].tolist() == [1, 3, 2, 5, 4]
    assert kept[S.SPLIT].tolist() == ["train", "train", "valid", "valid", "test"]
    rows = target_rows(kept, spec)
    assert kept[S.ITEM_IDX].to_numpy()[rows["valid"]].tolist() == [2]  # first valid only
    assert kept[S.ITEM_IDX].to_numpy()[rows["test"]].tolist() == [4]
