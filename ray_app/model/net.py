"""The re-ranker: item tower, user tower and scorer, each a short module.

Training calls `forward(batch) -> (scores, loss)` on a batch of examples and a
shared candidate set; serving, evaluation and the nightly job call
`predict(history, candidate vectors)` against the precomputed item table, so
an item's text is encoded once, not once per request.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ray_app.model.config import ModelConfig
from ray_app.model.dropout import cheap_dropout
from ray_app.model.encoder import TextBatch, TextEncoder
from ray_app.model.history import History, recency_bucket

NEG_INF = -1e9
# (user, candidate) pairs scored per block when a catalogue is ranked (see `predict`).
SCORE_CELLS = 1 << 15


class ItemTower(nn.Module):
    """Projected pooled text plus an ID embedding that training hides at random.

    `known` marks items seen in training: an unknown item's ID row never
    learned anything, so it gets the text part plus the learned new-item
    vector, which training also gives every candidate that was new at its
    example's moment (`ModelConfig.new_item_days`, `as_new`).
    """

    def __init__(self, cfg: ModelConfig, num_items: int, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(text_dim, cfg.dim) if cfg.use_text else None
        self.ids = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0) if cfg.use_ids else None
        self.unknown = None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02)
            with torch.no_grad():
                self.ids.weight[0].zero_()
            if self.proj is not None:
                self.unknown = nn.Parameter(torch.zeros(cfg.dim))
        self.register_buffer("known", torch.ones(num_items + 1, dtype=torch.bool))

    def forward(self, items: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        out = 0
        if self.proj is not None:
            out = self.proj(text)
        if self.ids is not None:
            known = self.known[items]
            keep = known
            if self.training and self.cfg.use_text and self.cfg.id_dropout > 0:
                keep = keep & (torch.rand(items.shape, device=items.device) >= self.cfg.id_dropout)
            ids = self.ids(items) * keep.unsqueeze(-1).to(self.ids.weight.dtype)
            if self.unknown is not None:
                ids = torch.where(known.unsqueeze(-1), ids, self.unknown.to(ids.dtype))
            out = out + ids
        return out * (items > 0).unsqueeze(-1)

    def from_text(self, text: torch.Tensor) -> torch.Tensor:
        """Vectors of items the model never saw, from pooled text alone (no ID row)."""
        if self.proj is None:
            raise ValueError("this model has no text tower")
        out = self.proj(text)
        return out if self.unknown is None else out + self.unknown

    def as_new(self, items: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Vectors of `items` as if none had training events (`from_text`), padding zero."""
        return self.from_text(text) * (items > 0).unsqueeze(-1)


def next_valid_gap(gaps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L) gap to the moment of scoring of each column's next valid event, -1 if none.

    Histories are oldest first, so a later event's gap is never larger and the
    next valid one is the largest of the later ones (holes are items hidden for
    cold start).
    """
    g = gaps.masked_fill(~valid, -1)
    later = torch.cat([g[:, 1:], torch.full_like(g[:, :1], -1)], 1)
    # The max over each column's suffix, as one masked (B, L, L) max rather than a
    # cummax, which ONNX has no operator for (`onnx_scorer` exports this).
    cols = torch.arange(later.shape[1], device=later.device)
    before = cols[None, :] < cols[:, None]
    return later[:, None, :].masked_fill(before, -1).amax(-1)


class UserTower(nn.Module):
    """History vectors + event type + recency rank + time, through a Transformer.

    A learned summary token sits after the most recent event; its output is
    the user vector, so an empty history still yields a defined vector.
    With `time_input: to_last` (or `intervals`) the history's tokens carry only
    gaps between its own events (to the next one, and to the last one), and the
    summary token the time since the last event: moving the moment of scoring
    changes that one input, not the whole history. The time tables start at
    zero, so a gap bucket that training never fills adds nothing, not noise.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.event = nn.Embedding(cfg.num_event_types + 1, d, padding_idx=0)
        self.position = nn.Embedding(cfg.max_history + 1, d)
        self.recency = nn.Embedding(cfg.recency_buckets, d, padding_idx=0)
        self.since_last = self.to_last = None
        if cfg.time_input != "to_scoring":
            self.since_last = nn.Embedding(cfg.recency_buckets, d, padding_idx=0)
            nn.init.zeros_(self.recency.weight)
            nn.init.zeros_(self.since_last.weight)
        if cfg.time_input == "to_last":
            self.to_last = nn.Embedding(cfg.recency_buckets, d, padding_idx=0)
            nn.init.zeros_(self.to_last.weight)
        self.summary = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(
            d, cfg.heads, 2 * d, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.user_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        cheap_dropout(self)

    def _bucket(self, gaps: torch.Tensor) -> torch.Tensor:
        return recency_bucket(gaps, self.cfg.recency_buckets, self.cfg.time_resolution_s)

    def forward(self, hist: History, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, d) history item vectors -> user (B, d), states (B, L, d)."""
        b, length = hist.items.shape
        valid = hist.items > 0
        rank = torch.arange(length, 0, -1, device=vectors.device).clamp(max=self.cfg.max_history)
        summary = (self.summary + self.position.weight[0]).expand(b, 1, -1)
        if self.since_last is None:
            time = self.recency(self._bucket(hist.gaps) * valid)
        else:
            gaps = self._floored(hist.gaps)
            nxt = next_valid_gap(gaps, valid)
            time = self.recency(self._bucket(gaps - nxt) * (valid & (nxt >= 0)))
            last = torch.where(valid, gaps, gaps.flatten().amax(0) + 1).amin(1)
            if self.to_last is not None:
                time = time + self.to_last(self._bucket(gaps - last[:, None]) * valid)
            since = self._bucket(last) * valid.any(1)
            summary = summary + self.since_last(since).unsqueeze(1)
        x = vectors + self.event(hist.events.long() * valid) + self.position(rank)[None] + time
        x = self.drop(x) * valid.unsqueeze(-1)
        x = torch.cat([x, summary], 1)
        pad = torch.cat([~valid, torch.zeros(b, 1, dtype=torch.bool, device=valid.device)], 1)
        h = self.norm(self.encoder(x, src_key_padding_mask=pad))
        return h[:, -1], h[:, :-1]

    def _floored(self, gaps: torch.Tensor) -> torch.Tensor:
        """Gaps to the moment of scoring floored to the time resolution, so that the
        intervals between events are whole units of it."""
        gaps = gaps.clamp(min=0)
        res = self.cfg.time_resolution_s
        return torch.div(gaps, res, rounding_mode="floor") * res if res > 1 else gaps


class Scorer(nn.Module):
    """Dot product of user and candidate plus an MLP over candidate-aware attention.

    Each candidate attends over the user's history states (which past items
    matter depends on what is being scored), and the MLP sees both the
    user-candidate and context-candidate interactions.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.query = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, cfg.scorer_hidden), nn.GELU(), nn.Linear(cfg.scorer_hidden, 1)
        )
        self.scale = 1.0 / math.sqrt(d)

    def forward(
        self,
        user: torch.Tensor,
        states: torch.Tensor,
        valid: torch.Tensor,
        cand_vectors: torch.Tensor,
        alt: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """user (B, d), states (B, L, d), valid (B, L), cand_vectors (C, d) shared or
        (B, C, d); alt = (vectors (C, d), use (B, C)): example b scores candidate c
        with the alternative vector where use[b, c] (training's items new at the
        example's moment). Its query is projected once per candidate, not per pair.
        `return_attention` also returns each candidate's attention over the history
        states (B, C, L): what feeds the context term, and nothing else of the score."""
        shared = cand_vectors.dim() == 2
        q = self.query(cand_vectors)
        if alt is not None:
            vecs, use = alt
            use = use.unsqueeze(-1)
            q = torch.where(use, self.query(vecs), q)
            cand_vectors = torch.where(use, vecs, cand_vectors)
            shared = False
        att = (
            torch.einsum("cd,bld->bcl", q, states)
            if shared
            else torch.einsum("bcd,bld->bcl", q, states)
        ) * self.scale
        att = att.masked_fill(~valid[:, None, :], NEG_INF).softmax(-1) * valid[:, None, :].any(
            -1, keepdim=True
        )
        ctx = torch.einsum("bcl,bld->bcd", att, states)
        c = cand_vectors.unsqueeze(0) if shared else cand_vectors
        dot = (user.unsqueeze(1) * c).sum(-1)
        feats = torch.cat([user.unsqueeze(1) * c, ctx * c], -1)
        scores = dot + self.mlp(feats).squeeze(-1)
        return (scores, att) if return_attention else scores


class RerankerNet(nn.Module):
    """Item tower (text encoder + IDs), user tower, scorer."""

    def __init__(self, cfg: ModelConfig, num_items: int, text: TextEncoder | None) -> None:
        super().__init__()
        if cfg.use_text and text is None:
            raise ValueError("model.use_text needs a text encoder")
        self.cfg = cfg
        self.num_items = num_items
        self.text = text if cfg.use_text else None
        text_dim = self.text.out_dim if self.text is not None else 1
        self.items = ItemTower(cfg, num_items, text_dim)
        self.user = UserTower(cfg)
        self.scorer = Scorer(cfg)
        # Pooled text of every item (row = item_idx). Exact after
        # `set_text_table`; during training it is refreshed now and then and
        # serves history items, while candidates go through the live encoder.
        self.register_buffer("text_table", torch.zeros(num_items + 1, text_dim), persistent=False)

    def set_text_table(self, table: torch.Tensor) -> None:
        self.text_table = table.to(self.text_table.device, self.text_table.dtype)

    def item_vectors(self, items: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if self.text is not None and text is None:
            text = self.text_table[items]
        return self.items(items, text)

    def encode_user(self, hist: History) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user(hist, self.item_vectors(hist.items))

    def forward(
        self,
        hist: History,
        cand_items: torch.Tensor,
        labels: torch.Tensor,
        cand_logq: torch.Tensor,
        cand_text: TextBatch | None = None,
        loss: str = "softmax",
        negatives: torch.Tensor | None = None,
        cand_new: torch.Tensor | None = None,
        cand_later: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every example against the shared candidates, and the loss.

        cand_items (C,) item_idx shared by the batch; labels (B,) index of each
        example's target in `cand_items`; cand_logq (C,) log of each candidate's
        chance to be in the set (popularity correction for `softmax`);
        negatives (B, n) indices into `cand_items` of each example's own sampled
        negatives (for `bce`); cand_text the text encoder's inputs for every
        candidate when it is being fine-tuned (else the text table serves);
        cand_new (B, C) the candidates each example scores as new items; cand_later (B, C)
        those whose first training event is after the example's moment.
        All candidates must go through the same path: a model that sees some
        candidates' vectors fresh and others' from the table learns to tell
        them apart instead of ranking.
        Candidates the user already has are masked, and so are those not yet seen at the
        example's moment: counted as items passed over, they taught the model that items
        scored as new (every not-yet-seen candidate is) are rarely picked, where at
        scoring time every new item in the catalogue is one a user can pick.
        """
        user, states = self.encode_user(hist)
        text = cand_text.encode(self.text) if cand_text is not None else None
        vecs = self.item_vectors(cand_items, text)
        alt = None
        if cand_new is not None and self.items.unknown is not None:
            if text is None:
                text = self.text_table[cand_items]
            alt = (self.items.as_new(cand_items, text), cand_new)
        scores = self.scorer(user, states, hist.items > 0, vecs, alt)
        seen = (hist.items.unsqueeze(-1) == cand_items.view(1, 1, -1)).any(1)
        target = F.one_hot(labels, len(cand_items)).bool()
        seen = seen & ~target
        if cand_later is not None:
            seen = seen | (cand_later & ~target)
        if loss == "softmax":
            logits = (scores - cand_logq).masked_fill(seen, NEG_INF)
            out = F.cross_entropy(logits, labels)
        else:
            pos = scores.gather(1, labels[:, None])
            neg = scores.gather(1, negatives)
            neg_ok = ~seen.gather(1, negatives)
            out = F.softplus(-pos).mean() + (F.softplus(neg) * neg_ok).sum() / neg_ok.sum().clamp(
                min=1
            )
        return scores, out

    @torch.no_grad()
    def predict(
        self, hist: History, cand_vectors: torch.Tensor, cells: int = SCORE_CELLS
    ) -> torch.Tensor:
        """Scores (B, C) for histories against candidate vectors, shared (C, d) or (B, C, d).

        Shared candidates are scored in blocks of about `cells` (user, candidate)
        pairs: the scorer's elementwise passes over its (B, C, L) and (B, C, d)
        tensors are bound by memory, and blocks that stay in the CPU's cache ranked
        a whole catalogue twice as fast as 2,048-item blocks for 64 users.
        """
        user, states = self.encode_user(hist)
        valid = hist.items > 0
        if cand_vectors.dim() == 3:
            return self.scorer(user, states, valid, cand_vectors)
        chunk = max(64, cells // max(1, len(user)))
        parts = [
            self.scorer(user, states, valid, cand_vectors[lo : lo + chunk])
            for lo in range(0, len(cand_vectors), chunk)
        ]
        return torch.cat(parts, 1)

    @torch.no_grad()
    def explain(
        self, hist: History, cand_vectors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, C) as `predict` gives them, and each candidate's attention over the
        history positions (B, C, L), summing to 1 over a non-empty history."""
        user, states = self.encode_user(hist)
        return self.scorer(user, states, hist.items > 0, cand_vectors, return_attention=True)

    @torch.no_grad()
    def item_table(self) -> torch.Tensor:
        """Vectors of every item (row = item_idx) from the current weights."""
        idx = torch.arange(self.num_items + 1, device=self.text_table.device)
        return self.item_vectors(idx)
