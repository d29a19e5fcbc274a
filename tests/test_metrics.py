"""Ranking metrics against hand-computed values, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_app.protocol import metrics as M


def test_single_list_hand_computed():
    # Held-out item (column 0) scored 0.5; two candidates above it, one below.
    st = M.rank_stats(np.array([[0.5, 0.9, 0.7, 0.1]]), np.array([0]))
    assert (st.greater[0], st.ties[0], st.less[0]) == (2, 0, 1)
    assert M.hit_rate(st, 3)[0] == 1.0 and M.hit_rate(st, 2)[0] == 0.0
    assert M.ndcg(st, 3)[0] == pytest.approx(1 / math.log2(4))  # rank 3
    assert M.ndcg(st, 2)[0] == 0.0
    assert M.mrr(st)[0] == pytest.approx(1 / 3)
    assert M.auc(st)[0] == pytest.approx(1 / 3)


def test_ties_are_expected_over_random_order():
    # Target ties with one other candidate, one candidate above: rank 2 or 3 with p=1/2.
    st = M.rank_stats(np.array([[1.0, 1.0, 2.0, 0.0]]), np.array([0]))
    assert M.hit_rate(st, 2)[0] == pytest.approx(0.5)
    assert M.ndcg(st, 10)[0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    assert M.mrr(st)[0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert M.auc(st)[0] == pytest.approx((1 + 0.5) / 3)


@pytest.mark.parametrize("n_candidates", [10, 100, 1000])
def test_constant_model_scores_like_random(n_candidates):
    k = 10
    st = M.rank_stats(np.zeros((3, n_candidates)), np.array([0, 4, 9]))
    expected_hr = min(k, n_candidates) / n_candidates
    expected_ndcg = (
        sum(1 / math.log2(r + 1) for r in range(1, min(k, n_candidates) + 1)) / n_candidates
    )
    assert M.hit_rate(st, k) == pytest.approx([expected_hr] * 3)
    assert M.ndcg(st, k) == pytest.approx([expected_ndcg] * 3)
    assert M.auc(st) == pytest.approx([0.5] * 3)
    rng = np.random.default_rng(0)
    rand = M.rank_stats(rng.random((20_000, n_candidates)), np.zeros(20_000, dtype=int))
    vals = M.ndcg(rand, k)
    assert abs(vals.mean() - expected_ndcg) < 4 * vals.std() / math.sqrt(len(vals))


def test_valid_mask_excludes_seen_items():
    scores = np.array([[0.2, 0.9, 0.8, 0.1]])
    unseen = np.array([[True, True, False, True]])  # item 2 was seen: it does not compete
    st = M.rank_stats(scores, np.array([0]), valid=unseen)
    assert (st.greater[0], st.ties[0], st.less[0]) == (1, 0, 1)


def test_gauc_and_users_without_a_target():
    per_user = np.array([1.0, 0.5, np.nan])  # third user has no test item
    assert M.gauc(per_user) == pytest.approx(0.75)
    assert M.gauc(per_user, weights=np.array([3, 1, 5])) == pytest.approx((3 + 0.5) / 4)
    assert M.mean_defined(np.array([1.0, np.nan, 0.0])) == 0.5


def test_list_metrics_hand_computed():
    top = [np.array([5, 3, 9]), np.array([1, 2, 4]), np.array([7, 8, 6])]
    rel = [np.array([3]), np.array([2, 4]), np.array([], dtype=int)]
    rec = M.recall_at_k(top, rel, 3)
    assert rec[:2].tolist() == [1.0, 1.0] and np.isnan(rec[2])
    nd = M.ndcg_lists(top, rel, 3)
    assert nd[0] == pytest.approx(1 / math.log2(3))
    idcg = 1 + 1 / math.log2(3)
    assert nd[1] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / idcg)
    assert M.coverage(top, num_items=20, k=2) == pytest.approx(6 / 20)


def test_long_tail_share_and_diversity():
    popularity = np.array([0, 100, 90, 5, 4, 3, 2, 1, 1, 1, 1])  # 10 items; head = top 2
    top = [np.array([1, 2, 3]), np.array([4, 5, 1])]
    assert M.long_tail_share(top, popularity, k=3) == pytest.approx(3 / 6)
    emb = np.array([[0, 0], [1, 0], [1, 0], [0, 1]], dtype=float)
    assert M.intra_list_diversity([np.array([1, 2])], emb, 2) == pytest.approx(0.0)
    assert M.intra_list_diversity([np.array([1, 3])], emb, 2) == pytest.approx(1.0)


def test_paired_difference_skips_undefined_users_and_needs_equal_users():
    a = np.array([0.5, 1.0, np.nan, 0.0])
    b = np.array([0.25, 0.5, 0.3, np.nan])
    r = M.paired_difference(a, b)
    assert r["users"] == 2
    assert r["diff"] == pytest.approx(0.375)
    assert r["se"] == pytest.approx(np.std([0.25, 0.5], ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="same users"):
        M.paired_difference(a, b[:3])
