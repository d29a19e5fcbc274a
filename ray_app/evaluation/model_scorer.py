"""The trained re-ranker behind the same scoring interface as the baselines."""

from __future__ import annotations

import numpy as np
import torch

from ray_app.evaluation.baselines import Baseline
from ray_app.evaluation.data import SplitTargets
from ray_app.model.history import make_history
from ray_app.model.reranker import Reranker


class RerankerScorer(Baseline):
    """Scores every catalogue item with the full model (user tower + scorer).

    Histories carry event types and time gaps to each target's moment of
    scoring (`SplitTargets.moments`: the target's own time, as in training,
    unless the protocol moves it). `item_vectors` is the item table of the
    same weights.
    """

    uses_time = True

    def __init__(
        self,
        model: Reranker,
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

    @torch.no_grad()
    def score_targets(self, targets: SplitTargets) -> np.ndarray:
        self.model.eval()
        out = []
        n = self.users_per_chunk
        for lo in range(0, len(targets), n):
            hist = self._histories(targets.subset(slice(lo, lo + n)))
            out.append(self.model.predict(hist, self.item_vectors).double().cpu().numpy())
        scores = np.concatenate(out) if out else np.zeros((0, len(self.item_vectors)))
        scores[:, 0] = -np.inf
        return scores

    @torch.no_grad()
    def score_candidates(self, targets: SplitTargets, candidates: np.ndarray) -> np.ndarray:
        """Only the candidates' columns, without scoring the whole catalogue."""
        self.model.eval()
        out = []
        n = self.users_per_chunk
        for lo in range(0, len(targets), n):
            hist = self._histories(targets.subset(slice(lo, lo + n)))
            idx = torch.from_numpy(candidates[lo : lo + n]).to(self.device)
            out.append(self.model.predict(hist, self.item_vectors[idx]).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(candidates.shape)
