"""An ID-only sequential Transformer in the style of SASRec (Kang & McAuley, 2018).

Item-ID embeddings plus learned positions, causal self-attention, trained
at every position of each user's train sequence: the same (history -> next
item) pairs as the prepared examples, computed once per sequence instead of
once per example. Two losses: `bce`, the original binary cross-entropy on
(next item, one sampled negative), and `ce`, full-softmax cross-entropy over
the whole catalogue ("SASRec+", Klenitskiy & Vasilev, RecSys 2023), which
on most public data sets is the strongest simple ID-only model. The
baselines the text model must beat on sequences alone.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from ray_app.data import schema
from ray_app.model.dropout import cheap_dropout
from ray_app.protocol.scorer import Scorer

logger = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 50
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    # Epochs between validations; None = 20 for bce, 5 for ce (which converges in
    # far fewer epochs: every position sees every item as a negative).
    eval_every: int | None = None
    patience: int = 3
    seed: int = 0
    loss: Literal["bce", "ce"] = "bce"
    # Training stops (validated once more) after this many minutes; None = no cap.
    max_minutes: float | None = None

    @property
    def validate_every(self) -> int:
        return self.eval_every or (20 if self.loss == "bce" else 5)


class SASRecModule(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, cfg.dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        cheap_dropout(self)
        # Small initial embeddings: N(0, 1) times sqrt(dim) saturates the BCE at the start.
        nn.init.xavier_normal_(self.item_emb.weight)
        nn.init.xavier_normal_(self.pos_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item indices -> (B, L, dim) states."""
        length = seq.shape[1]
        pos = torch.arange(length, device=seq.device)
        x = self.item_emb(seq) * self.cfg.dim**0.5 + self.pos_emb(pos)
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)
        h = self.encoder(x, mask=causal)
        return self.norm(h)

    def loss(self, seq: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        h = self(seq)
        pos_logit = (h * self.item_emb(pos)).sum(-1)
        neg_logit = (h * self.item_emb(neg)).sum(-1)
        mask = (pos > 0).float()
        bce = nn.functional.binary_cross_entropy_with_logits
        loss = bce(pos_logit, torch.ones_like(pos_logit), reduction="none") + bce(
            neg_logit, torch.zeros_like(neg_logit), reduction="none"
        )
        return (loss * mask).sum() / mask.sum()

    def ce_loss(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy of each position's next item over the whole catalogue;
        only real positions are scored (most of a short user's window is padding)."""
        h = self(seq)
        mask = pos > 0
        logits = h[mask] @ self.item_emb.weight.T
        logits[:, 0] = -torch.inf
        return nn.functional.cross_entropy(logits, pos[mask])


def _left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, -len(s) :] = s
    return out


def _owned(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


class SASRec(Scorer):
    def __init__(self, cfg: SASRecConfig | None = None) -> None:
        self.cfg = cfg or SASRecConfig()
        self.name = "sasrec" if self.cfg.loss == "bce" else "sasrec_ce"
        self.stopped_by_time = False

    @property
    def params(self) -> dict:
        return {
            **asdict(self.cfg),
            "epochs_trained": getattr(self, "epochs_trained", None),
            "stopped_by_time": self.stopped_by_time,
        }

    def __getstate__(self) -> dict:
        """The module's weights as plain bytes, so a fit can come back from another
        process (torch would otherwise pass tensors through shared memory that dies with it)."""
        state = dict(self.__dict__)
        if "model" in state:
            buf = io.BytesIO()
            torch.save(state.pop("model").state_dict(), buf)
            state["_weights"] = buf.getvalue()
        return state

    def __setstate__(self, state: dict) -> None:
        weights = state.pop("_weights", None)
        self.__dict__.update(state)
        if weights is not None:
            self.model = SASRecModule(self.num_items, self.cfg)
            self.model.load_state_dict(torch.load(io.BytesIO(weights)))

    def fit(
        self,
        train: pd.DataFrame,
        num_items: int,
        validate: Callable[[SASRec], float] | None = None,
    ) -> SASRec:
        """Train; with `validate` (higher is better), keep the best epoch and stop early."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.num_items = num_items
        seqs = [g.to_numpy() for _, g in train.groupby(schema.USER_ID, sort=True)[schema.ITEM_IDX]]
        seqs = [s for s in seqs if len(s) >= 2]
        full = _left_pad(seqs, cfg.max_len + 1)
        inp, pos = full[:, :-1], full[:, 1:]
        stride = num_items + 1
        owned = np.unique(
            np.concatenate([i * stride + np.asarray(q, dtype=np.int64) for i, q in enumerate(seqs)])
        )
        row_base = (np.arange(len(seqs), dtype=np.int64) * stride)[:, None]
        self.model = SASRecModule(num_items, cfg)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
        best, best_state, bad, t0 = -np.inf, None, 0, time.time()
        budget = cfg.max_minutes * 60 if cfg.max_minutes else np.inf
        for epoch in range(1, cfg.epochs + 1):
            self.model.train()
            if cfg.loss == "bce":
                neg = rng.integers(1, num_items + 1, size=pos.shape)
                hit = _owned(owned, row_base + neg)
                while hit.any():  # resample negatives that the user owns
                    neg[hit] = rng.integers(1, num_items + 1, size=int(hit.sum()))
                    hit = _owned(owned, row_base + neg)
            order = rng.permutation(len(seqs))
            for lo in range(0, len(order), cfg.batch_size):
                b = order[lo : lo + cfg.batch_size]
                if cfg.loss == "bce":
                    loss = self.model.loss(
                        torch.from_numpy(inp[b]), torch.from_numpy(pos[b]), torch.from_numpy(neg[b])
                    )
                else:
                    loss = self.model.ce_loss(torch.from_numpy(inp[b]), torch.from_numpy(pos[b]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            out_of_time = time.time() - t0 > budget
            self.stopped_by_time = out_of_time
            due = epoch % cfg.validate_every == 0 or epoch == cfg.epochs or out_of_time
            if validate is not None and due:
                score = validate(self)
                logger.info(
                    "%s epoch %d loss %.4f valid %.4f", self.name, epoch, loss.item(), score
                )
                if score > best:
                    best, bad, self.epochs_trained = score, 0, epoch
                    best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
                else:
                    bad += 1
                    if bad >= cfg.patience:
                        break
            if out_of_time:
                logger.info("%s: fit-time cap of %s min reached", self.name, cfg.max_minutes)
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            self.epochs_trained = epoch
        logger.info("%s trained %d epochs in %.1fs", self.name, epoch, time.time() - t0)
        return self

    @torch.no_grad()
    def score_all(self, histories: list[np.ndarray]) -> np.ndarray:
        self.model.eval()
        out = []
        for lo in range(0, len(histories), 512):
            seq = torch.from_numpy(_left_pad(histories[lo : lo + 512], self.cfg.max_len))
            h = self.model(seq)[:, -1]
            out.append((h @ self.model.item_emb.weight.T).double().numpy())
        scores = np.concatenate(out) if out else np.zeros((0, self.num_items + 1))
        scores[:, 0] = -np.inf
        return scores
