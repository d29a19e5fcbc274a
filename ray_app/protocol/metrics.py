"""Ranking metrics as pure functions.

Everything is computed from the rank of each held-out item, and ranks are
*expected* ranks under random tie-breaking: with `g` candidates scored
strictly higher than the held-out item and `t` scored equal, its rank is
uniform on g+1 .. g+t+1. A model that scores every candidate the same
therefore gets exactly the metrics of a random ranking; ties never flatter.
One function (`rank_stats`) serves the sampled candidate lists and the full
ranking over the catalogue, so both protocols share their arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RankStats:
    """Per held-out item: candidates scored above it, equal to it, and below it."""

    greater: np.ndarray
    ties: np.ndarray
    less: np.ndarray

    def __len__(self) -> int:
        return len(self.greater)

    def subset(self, rows: np.ndarray | slice) -> RankStats:
        """The statistics of the chosen rows (an index, a boolean mask or a slice)."""
        return RankStats(self.greater[rows], self.ties[rows], self.less[rows])


def rank_stats(
    scores: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None
) -> RankStats:
    """Rank statistics of `scores[i, target[i]]` among row i's valid entries.

    scores: (n, c) float; target: (n,) column of the held-out item; valid:
    optional (n, c) bool mask of entries that compete (e.g. unseen items).
    The target entry itself is never counted.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    rows = np.arange(n)
    s = scores[rows, target][:, None]
    competing = np.ones_like(scores, dtype=bool) if valid is None else valid.copy()
    competing[rows, target] = False
    greater = ((scores > s) & competing).sum(axis=1)
    ties = ((scores == s) & competing).sum(axis=1)
    less = competing.sum(axis=1) - greater - ties
    return RankStats(greater, ties, less)


def _expected(stats: RankStats, k: int | None, gain) -> np.ndarray:
    """E[gain(rank)] over the uniform rank g+1..g+t+1, with gain 0 beyond k."""
    g, t = stats.greater, stats.ties
    out = np.zeros(len(g))
    max_t = int(t.max()) if len(t) else 0
    if max_t <= 64:
        for j in range(max_t + 1):  # vectorised over users, looped over tie offsets
            rank = g + 1 + j
            val = gain(rank)
            if k is not None:
                val = np.where(rank <= k, val, 0.0)
            out += np.where(j <= t, val, 0.0)
        return out / (t + 1)
    for i in range(len(g)):  # huge tie groups (e.g. a constant model over a catalogue)
        rank = np.arange(g[i] + 1, g[i] + t[i] + 2)
        val = gain(rank)
        if k is not None:
            val = np.where(rank <= k, val, 0.0)
        out[i] = val.mean()
    return out


def hit_rate(stats: RankStats, k: int) -> np.ndarray:
    """Per user: probability the held-out item is in the top k (= Recall@k for one item)."""
    return _expected(stats, k, lambda r: np.ones_like(r, dtype=np.float64))


def ndcg(stats: RankStats, k: int) -> np.ndarray:
    """Per user NDCG@k with one relevant item: 1/log2(rank+1) inside the top k."""
    return _expected(stats, k, lambda r: 1.0 / np.log2(r + 1.0))


def mrr(stats: RankStats) -> np.ndarray:
    """Per user reciprocal rank (no cut-off)."""
    return _expected(stats, None, lambda r: 1.0 / r)


def auc(stats: RankStats) -> np.ndarray:
    """Per user AUC of the held-out item against the other candidates (ties count half)."""
    n = stats.greater + stats.ties + stats.less
    return np.where(n > 0, (stats.less + 0.5 * stats.ties) / np.maximum(n, 1), np.nan)


def gauc(per_user_auc: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Group AUC: per-user AUC averaged with weights (default: one per user with a target)."""
    a = np.asarray(per_user_auc, dtype=np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    ok = ~np.isnan(a)
    return float((a[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


def recall_at_k(topk: list[np.ndarray], relevant: list[np.ndarray], k: int) -> np.ndarray:
    """Per user |top-k ∩ relevant| / |relevant| for explicit lists (NaN with nothing relevant)."""
    out = np.full(len(topk), np.nan)
    for i, (rec, rel) in enumerate(zip(topk, relevant, strict=True)):
        if len(rel):
            out[i] = len(np.intersect1d(rec[:k], rel)) / len(rel)
    return out


def ndcg_lists(topk: list[np.ndarray], relevant: list[np.ndarray], k: int) -> np.ndarray:
    """Per user NDCG@k of explicit ranked lists against a set of relevant items."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    out = np.full(len(topk), np.nan)
    for i, (rec, rel) in enumerate(zip(topk, relevant, strict=True)):
        if len(rel):
            hits = np.isin(rec[:k], rel)
            idcg = disc[: min(len(rel), k)].sum()
            out[i] = (disc[: len(hits)][hits]).sum() / idcg
    return out


def coverage(topk: list[np.ndarray], num_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one top-k list."""
    if not topk:
        return 0.0
    seen = np.unique(np.concatenate([np.asarray(t[:k]) for t in topk]))
    return len(seen) / num_items


def long_tail_share(
    topk: list[np.ndarray], popularity: np.ndarray, k: int, head_fraction: float = 0.2
) -> float:
    """Share of top-k slots held by items outside the most popular `head_fraction` of items.

    popularity: train interaction count per item index (index 0 = padding, ignored).
    """
    counts = np.asarray(popularity[1:], dtype=np.float64)
    n_head = int(np.ceil(head_fraction * len(counts)))
    head = np.zeros(len(popularity), dtype=bool)
    head[1 + np.argsort(-counts, kind="stable")[:n_head]] = True
    slots = np.concatenate([np.asarray(t[:k]) for t in topk]) if topk else np.zeros(0, int)
    return float((~head[slots]).mean()) if len(slots) else float("nan")


def intra_list_diversity(topk: list[np.ndarray], vectors: Any, k: int) -> float:
    """Mean pairwise cosine distance inside each top-k list, averaged over lists.

    `vectors` rows describe items by item index, dense (item-tower output, multi-hot
    genres) or a scipy sparse matrix (bags of text tokens); rows need not be normalised.
    """
    if hasattr(vectors, "multiply"):  # sparse: scale the rows without densifying them
        norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
        e = vectors.multiply(1.0 / np.maximum(norms, 1e-12)[:, None]).tocsr()
    else:
        e = np.asarray(vectors, dtype=np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    vals = []
    for t in topk:
        t = np.asarray(t[:k])
        if len(t) < 2:
            continue
        sim = e[t] @ e[t].T
        sim = sim.toarray() if hasattr(sim, "toarray") else sim
        m = len(t)
        vals.append(1.0 - (sim.sum() - np.trace(sim)) / (m * (m - 1)))
    return float(np.mean(vals)) if vals else float("nan")


def mean_defined(x: np.ndarray) -> float:
    """Mean over users that have a held-out item (NaN entries are users without one)."""
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Mean, standard error and 95% interval (± 1.96 se) of a - b over the users both
    define (same users, same lists).

    Pairing removes the between-user variance that dominates a comparison of
    two means; an interval that holds zero is noise.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need the same users: {a.shape} vs {b.shape}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    n = len(d)
    diff = float(d.mean()) if n else float("nan")
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"diff": diff, "se": se, "ci95": [diff - 1.96 * se, diff + 1.96 * se], "users": n}
