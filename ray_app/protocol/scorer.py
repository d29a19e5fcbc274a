"""The interface every scored method implements, and the trained re-ranker behind it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ray_app.model.history import make_history
from ray_app.model.net import RerankerNet
from ray_app.protocol.data import SplitTargets


class Scorer:
    """What the protocols score: every item for each target's user (`score_targets`), or
    only some candidates. The baselines and the trained re-ranker implement it."""

    name = "scorer"
    # Whether scores depend on when a history is scored (its events' times); those
    # that do not score the same at every moment and are scored once.
    uses_time = False

    @property
    def params(self) -> dict:
        return {}

    def fit(self, train: pd.DataFrame, num_items: int) -> Scorer:
        raise NotImplementedError

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def score_targets(self, targets: SplitTargets) -> np.ndarray:
        """Scores of every item for each target's user; models that use event
        types and times (the re-ranker) override this, the baselines need only
        the item histories."""
        return self.score_all(targets.histories)

    def score_candidates(self, targets: SplitTargets, candidates: np.ndarray) -> np.ndarray:
        """(n, c) scores of each target's user for the item indices `candidates` only."""
        return np.take_along_axis(self.score_targets(targets), candidates, axis=1)

    def score(self, histories: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        full = self.score_all(histories)
        return np.take_along_axis(full, candidates, axis=1)


class NetScorer(Scorer):
    """Scores every catalogue item with the full model (user tower + scorer).

    Histories carry event types and time gaps to each target's moment of
    scoring (`SplitTargets.moments`: the target's own time, as in training,
    unless the protocol moves it). `item_vectors` is the item table of the
    same weights.
    """

    uses_time = True

    def __init__(
        self,
        model: RerankerNet,
        item_vectors: torch.Tensor,
        name: str = "reranker",
        params: dict | None = None,
        users_per_chunk: int = 64,
    ) -> None:
        self.model = model
        self.item_vectors = item_vectors
        self.name = name
        self._params = params or {}
        self.users_per_chunk = users_per_chunk
        self.device = item_vectors.device

    @property
    def params(self) -> dict:
        return self._params

    def fit(self, train, num_items):
        return self

    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        raise TypeError("the re-ranker needs event types and times: use score_targets")

    def _histories(self, t: SplitTargets):
        return make_history(
            t.histories,
            t.history_events,
            t.history_times,
            t.moments,
            self.model.cfg.max_history,
        ).to(self.device)

    def _groups(self, targets: SplitTargets) -> list[np.ndarray]:
        """Rows in chunks of `users_per_chunk` users with similar history lengths, so that
        a chunk's histories are padded only to about their own length."""
        cap = self.model.cfg.max_history
        lengths = np.minimum([len(h) for h in targets.histories], cap)
        order = np.argsort(lengths, kind="stable")
        n = self.users_per_chunk
        return [order[lo : lo + n] for lo in range(0, len(order), n)]

    @torch.no_grad()
    def score_targets(self, targets: SplitTargets) -> np.ndarray:
        self.model.eval()
        scores = np.zeros((len(targets), len(self.item_vectors)))
        for rows in self._groups(targets):
            hist = self._histories(targets.subset(rows))
            scores[rows] = self.model.predict(hist, self.item_vectors).double().cpu().numpy()
        scores[:, 0] = -np.inf
        return scores

    @torch.no_grad()
    def score_candidates(self, targets: SplitTargets, candidates: np.ndarray) -> np.ndarray:
        """Only the candidates' columns, without scoring the whole catalogue."""
        self.model.eval()
        out = np.zeros(candidates.shape)
        for rows in self._groups(targets):
            hist = self._histories(targets.subset(rows))
            idx = torch.from_numpy(candidates[rows]).to(self.device)
            out[rows] = self.model.predict(hist, self.item_vectors[idx]).double().cpu().numpy()
        return out
