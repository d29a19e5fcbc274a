"""Baselines the language-model re-ranker must beat: each has `fit` and `score_all`.

`score_all(histories)` returns scores for every item index (column 0 is
padding) given each user's time-ordered history; `score(histories,
candidates)` gathers the candidates' columns. All are fitted on the train
split only; their few hyper-parameters are tuned on the validation split by
`evaluate.tune`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ray_app.data import schema
from ray_app.protocol.scorer import Scorer

logger = logging.getLogger(__name__)


def _user_item_matrix(train: pd.DataFrame, num_items: int) -> sp.csr_matrix:
    users, codes = np.unique(train[schema.USER_ID].to_numpy(), return_inverse=True)
    x = sp.csr_matrix(
        (np.ones(len(train), np.float32), (codes, train[schema.ITEM_IDX].to_numpy())),
        shape=(len(users), num_items + 1),
    )
    x.data[:] = 1.0  # implicit feedback: repeats count once
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def _history_matrix(histories: list[np.ndarray], num_items: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if histories else np.zeros(0, int)
    x = sp.csr_matrix(
        (np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), num_items + 1)
    )
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


@dataclass
class Popularity(Scorer):
    """Train interaction count; the same list for everyone."""

    name: str = "popularity"

    def fit(self, train: pd.DataFrame, num_items: int) -> Popularity:
        self.counts = np.bincount(train[schema.ITEM_IDX].to_numpy(), minlength=num_items + 1)
        self.counts = self.counts.astype(np.float64)
        self.counts[0] = -np.inf
        return self

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()


@dataclass
class ItemKNN(Scorer):
    """Item-based kNN: cosine similarity of item co-occurrence, top-`k` neighbours per item."""

    k: int = 100
    shrink: float = 10.0
    name: str = "item_knn"

    @property
    def params(self) -> dict:
        return {"k": self.k, "shrink": self.shrink}

    def fit(self, train: pd.DataFrame, num_items: int) -> ItemKNN:
        x = _user_item_matrix(train, num_items)
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co))
        self.full_sim = co / (np.outer(norms, norms) + self.shrink + 1e-9)
        np.fill_diagonal(self.full_sim, 0.0)
        self.num_items = num_items
        return self._prune()

    def with_k(self, k: int) -> ItemKNN:
        """Another neighbourhood size from the cached similarities."""
        other = ItemKNN(k=k, shrink=self.shrink)
        other.full_sim, other.num_items = self.full_sim, self.num_items
        return other._prune()

    def _prune(self) -> ItemKNN:
        sim = self.full_sim.copy()
        if self.k < sim.shape[0]:
            cut = np.argpartition(-sim, self.k, axis=0)[self.k :]
            np.put_along_axis(sim, cut, 0.0, axis=0)
        self.sim = sim
        return self

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        out = np.asarray(_history_matrix(histories, self.num_items) @ self.sim, dtype=np.float64)
        out[:, 0] = -np.inf
        return out


@dataclass
class EASE(Scorer):
    """EASE (Steck 2019): closed-form item-item weights, L2 strength `lam`."""

    lam: float = 500.0
    name: str = "ease"

    @property
    def params(self) -> dict:
        return {"lam": self.lam}

    def fit(self, train: pd.DataFrame, num_items: int) -> EASE:
        x = _user_item_matrix(train, num_items)
        self.gram = (x.T @ x).toarray().astype(np.float64)
        self.num_items = num_items
        return self._solve()

    def with_lambda(self, lam: float) -> EASE:
        """Refit for another `lam` from the cached Gram matrix (cheap hyper-parameter search)."""
        other = EASE(lam=lam)
        other.gram, other.num_items = self.gram, self.num_items
        return other._solve()

    def _solve(self) -> EASE:
        from scipy.linalg import lapack

        t = time.time()
        g = self.gram.astype(np.float32)
        g[np.diag_indices_from(g)] += self.lam
        # Cholesky inverse of the SPD matrix: about a third of a general inverse's work.
        c, info = lapack.spotrf(g, lower=False, overwrite_a=True)
        if info != 0:
            raise np.linalg.LinAlgError(
                f"EASE: Gram matrix + {self.lam} I is not positive definite"
            )
        p, info = lapack.spotri(c, lower=False, overwrite_c=True)
        p = np.triu(p) + np.triu(p, 1).T
        b = p / (-np.diag(p))
        np.fill_diagonal(b, 0.0)
        self.b = b.astype(np.float32)
        logger.debug("EASE lam=%s solved in %.1fs", self.lam, time.time() - t)
        return self

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        out = np.asarray(_history_matrix(histories, self.num_items) @ self.b, dtype=np.float64)
        out[:, 0] = -np.inf
        return out


@dataclass
class TextSimilarity(Scorer):
    """Text only: cosine of TF-IDF vectors (over the items' text tokens) between each item
    and the user's recent history, the last `recent` items, newer ones weighing more.

    The ID-based baselines give an item nobody has met in training no score at all;
    this one ranks it from its text like any other, so a lead on new items is
    measured against it. `bags` is (items + 1, vocabulary) token counts, row = item_idx.
    """

    bags: sp.csr_matrix | None = None
    recent: int = 10
    decay: float = 0.8
    name: str = "text_tfidf"

    @property
    def params(self) -> dict:
        return {"recent": self.recent, "decay": self.decay}

    def fit(self, train: pd.DataFrame, num_items: int) -> TextSimilarity:
        if self.bags is None:
            raise ValueError("text_tfidf needs the items' token bags")
        bags = sp.csr_matrix(self.bags, dtype=np.float32)
        df = np.asarray((bags[1:] > 0).sum(0)).ravel()
        idf = np.log((1 + num_items) / (1 + df)).astype(np.float32)
        x = sp.csr_matrix(bags.multiply(idf[None, :]))
        norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
        self.vectors = sp.csr_matrix(sp.diags(1.0 / np.maximum(norms, 1e-9)) @ x)
        self.num_items = num_items
        return self

    def with_recent(self, recent: int) -> TextSimilarity:
        """Another history window on the same vectors (cheap hyper-parameter search)."""
        other = TextSimilarity(bags=self.bags, recent=recent, decay=self.decay)
        other.vectors, other.num_items = self.vectors, self.num_items
        return other

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        lasts = [np.asarray(h[-self.recent :], dtype=np.int64) for h in histories]
        lens = [len(x) for x in lasts]
        rows = np.repeat(np.arange(len(histories)), lens)
        cols = np.concatenate(lasts) if lasts else np.zeros(0, np.int64)
        vals = np.concatenate([self.decay ** np.arange(n)[::-1] for n in lens] or [np.zeros(0)])
        weights = sp.csr_matrix((vals, (rows, cols)), shape=(len(histories), self.num_items + 1))
        profile = weights @ self.vectors
        out = np.asarray((profile @ self.vectors.T).todense(), dtype=np.float64)
        out[:, 0] = -np.inf
        return out
