"""The user tower and scorer as an ONNX graph: `/v1/rerank`'s forward pass on a CPU.

A request's forward pass is a few dozen small tensor operations (one user, 100
candidates, 50 history events), and PyTorch's eager dispatch of each costs more
than its arithmetic. ONNX Runtime runs the same graph with a fraction of that
overhead. The graph takes the history's item vectors as an input, so it holds
only the user tower's and scorer's weights, whatever the catalogue's size.
PyTorch stays the reference (the nightly job and evaluation score with it) and
the GPU path; `tests/test_ranker.py` holds the two to 1e-5.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ray_app.model.history import History
from ray_app.model.net import RerankerNet

FILE = "scorer.onnx"
"""The artifact's file of the graph."""
INPUTS = ("items", "events", "gaps", "history_vectors", "candidates")
OUTPUTS = ("scores", "attention")


class ScorerGraph(nn.Module):
    """(history item_idx, event_idx, gaps, history item vectors, candidate vectors per
    user) -> (B, C) scores and (B, C, L) attention: `RerankerNet.explain` for per-user
    candidates, with the history's vectors read from the item table by the caller.
    The attention is computed for the scores in any case; returning it costs one copy."""

    def __init__(self, net: RerankerNet) -> None:
        super().__init__()
        self.user, self.scorer = net.user, net.scorer

    def forward(
        self,
        items: torch.Tensor,
        events: torch.Tensor,
        gaps: torch.Tensor,
        history_vectors: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hist = History(items, events, gaps)
        user, states = self.user(hist, history_vectors)
        return self.scorer(user, states, items > 0, candidates, return_attention=True)


def export(net: RerankerNet, path: str | os.PathLike[str]) -> Path:
    """Write the graph (users, history length and candidates dynamic) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = net.cfg
    b, length, c = 2, max(2, min(4, cfg.max_history)), 3
    example = (
        torch.ones(b, length, dtype=torch.long),
        torch.ones(b, length, dtype=torch.long),
        torch.arange(length, 0, -1).repeat(b, 1),
        torch.zeros(b, length, cfg.dim),
        torch.zeros(b, c, cfg.dim),
    )
    users, hist, cands = (
        torch.export.Dim("users"),
        torch.export.Dim("history", max=max(cfg.max_history, 2)),
        torch.export.Dim("candidates"),
    )
    seq = {0: users, 1: hist}
    graph = ScorerGraph(net).cpu().eval()
    with torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes=(seq, seq, seq, seq, {0: users, 1: cands}),
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    return path


class OnnxScorer:
    """The graph in ONNX Runtime, called like `RerankerNet.predict` on per-user
    candidate vectors, with the item table the history's vectors come from; with
    `attention`, like `RerankerNet.explain`."""

    def __init__(self, graph: str | os.PathLike[str] | bytes, threads: int = 1) -> None:
        from ray_app.model.onnx_text import session

        self.session = session(graph, threads)
        # A graph exported before explanations has the scores only.
        self.explains = [o.name for o in self.session.get_outputs()] == list(OUTPUTS)

    def __call__(
        self,
        hist: History,
        table: torch.Tensor,
        candidates: torch.Tensor,
        attention: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        feed = {
            "items": hist.items.numpy(),
            "events": hist.events.numpy(),
            "gaps": hist.gaps.numpy(),
            "history_vectors": table[hist.items].numpy(),
            "candidates": candidates.numpy(),
        }
        if attention:
            if not self.explains:
                raise ValueError("this scorer graph has no attention output")
            scores, att = self.session.run(list(OUTPUTS), feed)
            return scores, att
        return self.session.run(["scores"], feed)[0]
