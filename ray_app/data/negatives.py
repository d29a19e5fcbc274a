"""Negative sampling that never returns one of the user's own items.

Draws are a pure function of (seed, user, target position, draw number)
through a counter-based hash, so the same seed gives the same negatives no
matter how users are partitioned across buckets or workers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer, vectorized (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def user_hash(user_ids: np.ndarray | pd.Series) -> np.ndarray:
    """Stable 64-bit hash of user ids (same on every machine and run)."""
    return pd.util.hash_array(np.asarray(user_ids, dtype=object), categorize=True)


def uniforms(seed: int, keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats, one per uint64 key."""
    with np.errstate(over="ignore"):
        h = splitmix64(keys ^ splitmix64(np.array([seed], dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class NegativeSampler:
    """Samples item indices from `weights` (index 0, padding, has weight 0)."""

    def __init__(self, weights: np.ndarray, seed: int, max_rounds: int = 16) -> None:
        w = np.asarray(weights, dtype=np.float64).copy()
        w[0] = 0.0
        if w.sum() <= 0:
            raise ValueError("negative sampling: all item weights are zero")
        self.cdf = np.cumsum(w) / w.sum()
        self.n = len(w)
        self.seed = seed
        self.max_rounds = max_rounds

    @classmethod
    def from_counts(cls, counts: np.ndarray, kind: str, alpha: float, seed: int) -> NegativeSampler:
        """`uniform`, or `popularity`: weight (count + 1) ** alpha (unseen items stay possible)."""
        if kind == "uniform":
            w = np.ones(len(counts))
        else:
            w = (np.asarray(counts, dtype=np.float64) + 1.0) ** alpha
        return cls(w, seed)

    def sample(
        self,
        row_user: np.ndarray,
        row_key: np.ndarray,
        user_items: dict[int, np.ndarray] | tuple[np.ndarray, np.ndarray],
        k: int,
    ) -> np.ndarray:
        """`k` negatives per row, shape (rows, k), int32.

        row_user: small int code of each row's user; row_key: uint64 per row
        (user hash mixed with target position); user_items: (codes, items)
        pairs of every item each user touched.
        """
        rows = len(row_user)
        out = np.zeros((rows, k), dtype=np.int32)
        if k == 0 or rows == 0:
            return out
        codes, items = user_items  # type: ignore[misc]
        stride = np.int64(self.n)
        owned = np.unique(codes.astype(np.int64) * stride + items.astype(np.int64))
        filled = np.zeros(rows, dtype=np.int64)
        todo = np.arange(rows)
        m = k + k // 4 + 2
        for rnd in range(self.max_rounds):
            if len(todo) == 0:
                break
            draw = (np.uint64(rnd) * np.uint64(m) + np.arange(m, dtype=np.uint64))[None, :]
            with np.errstate(over="ignore"):
                keys = splitmix64(row_key[todo][:, None] ^ (draw * _GOLD))
            cand = np.searchsorted(self.cdf, uniforms(self.seed, keys), side="right")
            cand = np.minimum(cand, self.n - 1)
            q = row_user[todo][:, None].astype(np.int64) * stride + cand
            pos = np.minimum(np.searchsorted(owned, q), len(owned) - 1)
            good = owned[pos] != q
            rank = np.cumsum(good, axis=1)
            need = k - filled[todo]
            ri, ci = np.nonzero(good & (rank <= need[:, None]))
            out[todo[ri], filled[todo][ri] + rank[ri, ci] - 1] = cand[ri, ci]
            filled[todo] += np.minimum(rank[:, -1], need)
            todo = todo[filled[todo] < k]
        for r in todo:  # users who own most of the catalogue: draw from the complement
            mine = items[codes == row_user[r]]
            allowed = np.setdiff1d(
                np.flatnonzero(np.diff(np.concatenate([[0.0], self.cdf])) > 0), mine
            )
            if len(allowed) == 0:
                raise ValueError("negative sampling: a user has interacted with every item")
            u = uniforms(self.seed, row_key[r] ^ np.arange(1, k + 1, dtype=np.uint64) * _M1)
            rest = k - filled[r]
            out[r, filled[r] :] = allowed[(u[:rest] * len(allowed)).astype(np.int64)]
        return out
