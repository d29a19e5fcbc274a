"""The re-ranker as a service object: one model artifact, many (history, candidates) queries.

Serving (`/v1/rerank`) and the nightly job both score through `Ranker.score`,
so an online ranking and a precomputed list for the same user and candidates
carry the same scores. Known items read the artifact's item table; an item
the catalogue does not know is encoded from the text the caller sends (and
kept in a bounded LRU cache); an unknown item without text gets a per-item
error instead of a made-up score. Items registered through the catalogue
(`model/catalogue.py`) are an overlay of vectors on top of the item table, kept
by the process's `Catalogue`.

New items' text is encoded by PyTorch or by the ONNX export of the text tower
(`text_encoder`); the item table itself is always PyTorch's (the artifact's).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ray_app.data import schema
from ray_app.model.artifact import Artifact, load_artifact
from ray_app.model.history import History, make_history

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """One thing a user did: the item, the event type (None = the first type the
    model was trained with) and when (seconds since the epoch)."""

    item_id: str
    timestamp: int
    event_type: str | None = None


@dataclass(frozen=True)
class Candidate:
    """An item to rank; `text` lets an item the model never saw be scored."""

    item_id: str
    text: str | None = None


@dataclass
class Query:
    """A user's events (any order) and the candidates to order; `now` defaults to the
    wall clock and is the moment the history's recency is measured to. With
    `drop_later`, events after `now` are left out and counted as dropped (a replay
    of a past moment); without it they count as just now (a client's clock ahead of
    the server's)."""

    history: Sequence[Event]
    candidates: Sequence[Candidate]
    k: int | None = None
    now: int | None = None
    drop_later: bool = False
    explain: int = 0  # history items to name per returned candidate (0: none)


@dataclass
class Ranked:
    """Scores of a query's scorable candidates, best first and cut to `k`, and why the
    others were not scored."""

    items: list[tuple[str, float]]
    errors: list[tuple[str, str]] = field(default_factory=list)
    history_used: int = 0
    history_dropped: int = 0
    # Per returned item, when the query asked: (history item_id, attention weight), largest
    # first (`Ranker.explanations`).
    because: list[list[tuple[str, float]]] | None = None

    def as_dicts(self) -> list[dict[str, Any]]:
        if self.because is None:
            return [{"item_id": i, "score": s} for i, s in self.items]
        return [
            {
                "item_id": i,
                "score": s,
                "because": [{"item_id": h, "weight": w} for h, w in why],
            }
            for (i, s), why in zip(self.items, self.because, strict=True)
        ]


class UnknownEventType(ValueError):
    pass


TextEncoderChoice = Literal["auto", "torch", "onnx", "onnx-int8"]
ScorerChoice = Literal["auto", "torch", "onnx"]


@dataclass(frozen=True)
class Overlay:
    """Registered items' vectors over the item table: `rows[item_id]` is a row of
    `table`. Replaced as a whole (never changed in place), so a batch being scored
    keeps the one it started with."""

    rows: dict[str, int] = field(default_factory=dict)
    table: torch.Tensor | None = None


class Ranker:
    """Loaded once per process (a Serve replica, a `map_batches` actor) and reused."""

    def __init__(
        self,
        artifact: Artifact,
        cache_size: int = 10_000,
        device: str | torch.device = "cpu",
        text_encoder: TextEncoderChoice = "torch",
        scorer: ScorerChoice = "torch",
    ) -> None:
        self.artifact = artifact
        self.device = torch.device(device)
        self.model = artifact.model.to(self.device).eval()
        self.vectors = artifact.item_vectors.to(self.device)
        self.index = artifact.item_index
        self.item_ids = artifact.items[schema.ITEM_ID].to_numpy()  # by item_idx
        self.events = artifact.event_index
        self.default_event = next(iter(self.events.values()), 1)
        self.max_length = int(artifact.config.get("text_max_length", 32))
        self.cache_size = cache_size
        self._cold: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.cold_encoded = 0  # new items' texts encoded, and found in the cache (metrics)
        self.cold_hits = 0
        self.overlay = Overlay()
        self.text_backend = self._choose_backend(text_encoder)
        self._onnx = self._onnx_tower() if self.text_backend != "torch" else None
        self.scorer_backend = (
            ("onnx" if self.device.type == "cpu" else "torch") if scorer == "auto" else scorer
        )
        self._onnx_scorer = self._scorer_graph() if self.scorer_backend == "onnx" else None

    @classmethod
    def from_path(
        cls,
        path: str,
        cache_size: int = 10_000,
        device: str = "cpu",
        text_encoder: TextEncoderChoice = "torch",
        scorer: ScorerChoice = "torch",
    ) -> Ranker:
        return cls(load_artifact(path, device), cache_size, device, text_encoder, scorer)

    def _choose_backend(self, choice: TextEncoderChoice) -> str:
        """`auto`: ONNX float32 on a CPU (the same vectors as PyTorch's, faster; int8 is
        faster still but moves rankings, see the README), PyTorch on a GPU and for a
        model without text."""
        if self.model.text is None:
            return "torch"
        if choice == "auto":
            return "onnx" if self.device.type == "cpu" else "torch"
        return choice

    def _onnx_tower(self) -> Any:
        """The artifact's ONNX text tower of `text_backend`, exported now if the artifact
        was written without it (older artifacts, `train.export_onnx: false`)."""
        import tempfile

        from ray_app.model.onnx_text import OnnxTextTower, TextTower, build

        threads = torch.get_num_threads()
        graph = self.artifact.onnx.get(self.text_backend)
        if graph is not None:
            return OnnxTextTower(graph, threads)
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="rerank-onnx-") as tmp:
            tower = TextTower(self.model.text, self.model.items).cpu()
            out = build(tower, self.text_backend, tmp, self.max_length, threads)
            self.model.to(self.device)
        logger.warning(
            "artifact %s has no %s text tower: exported it in %.1fs",
            self.version,
            self.text_backend,
            time.time() - t0,
        )
        return out

    def _scorer_graph(self) -> Any:
        """`score`'s forward pass in ONNX Runtime (CPU only): the artifact's graph, or
        exported now if the artifact was written without it."""
        import tempfile

        from ray_app.model.onnx_scorer import FILE, OnnxScorer, export

        if self.device.type != "cpu":
            raise ValueError("scorer: onnx runs on a CPU; use torch (or auto) on a GPU")
        threads = torch.get_num_threads()
        if self.artifact.scorer_onnx is not None:
            return OnnxScorer(self.artifact.scorer_onnx, threads)
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="rerank-onnx-") as tmp:
            out = OnnxScorer(export(self.model, Path(tmp) / FILE), threads)
        logger.warning(
            "artifact %s has no scorer graph: exported it in %.1fs", self.version, time.time() - t0
        )
        return out

    @property
    def space(self) -> str:
        """What a new item's vector depends on: the model version and the text backend."""
        return f"{self.version}/{self.text_backend}"

    def knows(self, item_id: str) -> bool:
        """Whether the artifact's item table has `item_id` (trained or catalogue item)."""
        return item_id in self.index

    @functools.cached_property
    def renderer(self) -> Any:
        """Item text from fields (title, genres, ...), as prepare rendered it for training."""
        from ray_app.data.config import TextConfig
        from ray_app.data.text import TextRenderer

        return TextRenderer(TextConfig.model_validate(self.artifact.config.get("text") or {}))

    def set_overlay(self, vectors: dict[str, np.ndarray]) -> None:
        """Score these items from these vectors (registered items; a trained item listed
        here is scored from its new vector instead of its table row)."""
        if not vectors:
            self.overlay = Overlay()
            return
        table = torch.from_numpy(np.stack(list(vectors.values())).astype(np.float32))
        self.overlay = Overlay(
            {item_id: i for i, item_id in enumerate(vectors)}, table.to(self.device)
        )

    def extend(self, vectors: dict[str, np.ndarray]) -> None:
        """Add these items to the item table itself (a trained item's row is replaced):
        for the nightly job, whose retrieval reads the table, not an overlay."""
        if not vectors:
            return
        table = self.vectors.clone()
        item_ids, index = list(self.item_ids), dict(self.index)
        new = []
        for item_id, v in vectors.items():
            row = index.get(item_id)
            if row is None:
                index[item_id] = len(item_ids)
                item_ids.append(item_id)
                new.append(v)
            else:
                table[row] = torch.from_numpy(np.asarray(v, np.float32)).to(self.device)
        if new:
            added = torch.from_numpy(np.stack(new).astype(np.float32)).to(self.device)
            table = torch.cat([table, added])
        self.vectors, self.index = table, index
        self.item_ids = np.asarray(item_ids, dtype=object)
        self.__dict__.pop("vector_mean", None)

    @functools.cached_property
    def vector_mean(self) -> torch.Tensor:
        """The catalogue's mean item vector (padding row 0 left out)."""
        return self.vectors[1:].mean(0)

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def max_history(self) -> int:
        return self.model.cfg.max_history

    def event_idx(self, name: str | None, strict: bool = True) -> int:
        """Event type name -> the model's event_idx. Unknown names raise when `strict`
        (a caller's typo should be told), else fall back to the default type."""
        if name is None:
            return self.default_event
        idx = self.events.get(name)
        if idx is None:
            if strict:
                known = ", ".join(self.events) or "(none recorded)"
                raise UnknownEventType(f"unknown event_type {name!r}; the model knows: {known}")
            return self.default_event
        return idx

    def _tokens(self, texts: Sequence[str], tensors: str) -> Any:
        return self.artifact.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors=tensors,
        )

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Item vectors (n, d) of new items from their text alone (their IDs never trained)."""
        if self.model.text is None:
            raise ValueError("this model has no text tower: it cannot score items it never saw")
        if self._onnx is not None:
            tok = self._tokens(texts, "np")
            out = self._onnx(tok["input_ids"], tok["attention_mask"])
            return torch.from_numpy(out).to(self.device)
        tok = self._tokens(texts, "pt")
        pooled = self.model.text(
            tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        )
        return self.model.items.from_text(pooled)

    def _cold_vectors(self, wanted: dict[tuple[str, str], None]) -> dict:
        """Vectors of (item_id, text) pairs, encoding the ones not in the LRU cache."""
        with self._lock:
            found = {key: self._cold[key] for key in wanted if key in self._cold}
            for key in found:
                self._cold.move_to_end(key)
            self.cold_hits += len(found)
        missing = [key for key in wanted if key not in found]
        if missing:
            vecs = self.encode_texts([text for _, text in missing])
            with self._lock:
                for key, v in zip(missing, vecs, strict=True):
                    v = v.clone()  # a row of its own, not a view pinning the whole batch
                    found[key] = v
                    self._cold[key] = v
                    self._cold.move_to_end(key)
                while len(self._cold) > self.cache_size:
                    self._cold.popitem(last=False)
                self.cold_encoded += len(missing)
        return found

    def _query_events(
        self, q: Query, strict: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        events = sorted(q.history, key=lambda e: e.timestamp)
        cutoff = q.now if q.drop_later and q.now is not None else None
        items, kinds, times, dropped = [], [], [], 0
        for e in events:
            idx = self.index.get(e.item_id)
            if idx is None or (cutoff is not None and e.timestamp > cutoff):
                dropped += 1  # an item the model cannot embed, or a later event
                continue
            items.append(idx)
            kinds.append(self.event_idx(e.event_type, strict))
            times.append(e.timestamp)
        return (
            np.asarray(items, dtype=np.int64),
            np.asarray(kinds, dtype=np.int64),
            np.asarray(times, dtype=np.int64),
            dropped,
        )

    def history_input(
        self,
        items: Sequence[np.ndarray],
        events: Sequence[np.ndarray],
        times: Sequence[np.ndarray],
        now: np.ndarray,
    ) -> History:
        """Per-user item_idx / event_idx / time arrays (oldest first) -> the model's input,
        cut to the model's history length, recency measured to `now` (one per user)."""
        return make_history(items, events, times, now, self.max_history).to(self.device)

    @torch.no_grad()
    def score_rows(
        self, hist: History, rows: torch.Tensor, table: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C) scores of each user's candidates, given as rows of `table` (default:
        the item table, row = item_idx). `/v1/rerank` scores through `score` and this,
        the nightly lists through `retrieve` + this, or `score_catalogue` for all items."""
        table = self.vectors if table is None else table
        return self.model.predict(hist, table[rows.to(self.device)])

    def _gather(self, rows: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
        """Vectors of `rows`: the item table's rows, then those of the `extra` tables
        after it (without copying the item table)."""
        if not extra:
            return self.vectors[rows]
        n = len(self.vectors)
        out = self.vectors[rows.clamp(max=n - 1)]
        beyond = rows >= n
        if beyond.any():
            out[beyond] = torch.cat(extra)[rows[beyond] - n]
        return out

    @torch.no_grad()
    def score_catalogue(self, hist: History) -> torch.Tensor:
        """(B, N + 1) scores of every item (column = item_idx; column 0 is padding): the
        scores `score_rows` gives for those items, computed with the candidates shared
        by the batch, as the evaluation's full ranking does."""
        return self.model.predict(hist, self.vectors)

    @torch.no_grad()
    def retrieve(
        self, hist: History, n: int, exclude: Sequence[np.ndarray], block: int = 65_536
    ) -> torch.Tensor:
        """(B, n) item_idx with the highest user-vector . item-vector, `exclude`d items
        (per user) and padding left out; exact, over blocks of the item table so that
        memory stays at B x block whatever the catalogue size. Slots a user has no
        item left for hold 0."""
        user, _ = self.model.encode_user(hist)
        total = len(self.vectors) - 1
        n = min(n, total)
        best_s = torch.full((len(user), 0), -torch.inf, device=self.device)
        best_i = torch.zeros((len(user), 0), dtype=torch.long, device=self.device)
        for lo in range(1, total + 1, block):
            hi = min(lo + block, total + 1)
            s = user @ self.vectors[lo:hi].T
            for b, ex in enumerate(exclude):
                local = ex[(ex >= lo) & (ex < hi)] - lo
                if len(local):
                    s[b, torch.from_numpy(local).to(self.device)] = -torch.inf
            s = torch.cat([best_s, s], 1)
            ids = torch.arange(lo, hi, device=self.device).expand(len(user), -1)
            best_s, top = s.topk(min(n, s.shape[1]), dim=1)
            best_i = torch.cat([best_i, ids], 1).gather(1, top)
        return best_i.masked_fill(best_s == -torch.inf, 0)

    @torch.inference_mode()
    def score(self, queries: Sequence[Query], strict_events: bool = True) -> list[Ranked]:
        """Rank every query's candidates in one forward pass (dynamic batching feeds this).

        A candidate the catalogue knows uses the item table even if text is sent
        (the table is what the model was selected with); an unknown one with
        text is encoded; an unknown one without text is reported in `errors`.
        Histories keep their last `max_history` events; items in them the
        catalogue does not know are skipped and counted.
        """
        if not queries:
            return []
        clock = int(time.time())
        overlay = self.overlay
        n_table = len(self.vectors)
        n_overlay = 0 if overlay.table is None else len(overlay.table)
        hists = [self._query_events(q, strict_events) for q in queries]
        cold_keys: dict[tuple[str, str], None] = {}
        for q in queries:
            for c in q.candidates:
                if c.item_id not in overlay.rows and c.item_id not in self.index and c.text:
                    cold_keys[(c.item_id, c.text)] = None
        cold = self._cold_vectors(cold_keys) if cold_keys else {}
        extra = [] if overlay.table is None else [overlay.table]
        cold_rows = {}
        if cold:
            keys = list(cold)
            extra.append(torch.stack([cold[key] for key in keys]))
            cold_rows = {key: n_table + n_overlay + i for i, key in enumerate(keys)}
        # Rows per query and candidate slot: the item table's, then the overlay's and
        # the new items' after it; 0 (the padding item) fills the slots of short
        # queries and of candidates that cannot be scored.
        rows = np.zeros((len(queries), max(1, max(len(q.candidates) for q in queries))), np.int64)
        plans: list[tuple[list[int], list[str], list[tuple[str, str]]]] = []
        for b, q in enumerate(queries):
            cols, ids, errors = [], [], []
            for j, c in enumerate(q.candidates):
                idx = overlay.rows.get(c.item_id)
                if idx is not None:
                    idx += n_table
                else:
                    idx = self.index.get(c.item_id)
                if idx is None and c.text:
                    idx = cold_rows[(c.item_id, c.text)]
                elif idx is None:
                    errors.append((c.item_id, "unknown item_id and no text to encode it from"))
                    continue
                rows[b, j] = idx
                cols.append(j)
                ids.append(c.item_id)
            plans.append((cols, ids, errors))
        hist = self.history_input(
            [h[0] for h in hists],
            [h[1] for h in hists],
            [h[2] for h in hists],
            np.asarray([q.now if q.now is not None else clock for q in queries]),
        )
        cand = self._gather(torch.from_numpy(rows).to(self.device), extra)
        asks = np.asarray([q.explain > 0 for q in queries])
        att = None
        if not asks.any():
            scores = self._scores(hist, cand)
        elif self._onnx_scorer is not None and self._onnx_scorer.explains:
            scores, att = self._onnx_scorer(hist, self.vectors, cand, attention=True)
        else:
            # The rows that did not ask keep the scores they get alone, byte for byte.
            scores = np.zeros(rows.shape, np.float32)
            if not asks.all():
                plain = torch.from_numpy(np.flatnonzero(~asks)).to(self.device)
                scores[~asks] = self._scores(hist[plain], cand[plain])
            why = torch.from_numpy(np.flatnonzero(asks)).to(self.device)
            s, a = self.model.explain(hist[why], cand[why])
            scores[asks] = s.float().cpu().numpy()
            att = np.zeros((*rows.shape, hist.items.shape[1]), np.float32)
            att[asks] = a.float().cpu().numpy()
        hist_items = hist.items.cpu().numpy() if att is not None else None
        out = []
        for b, (q, (cols, ids, errors)) in enumerate(zip(queries, plans, strict=True)):
            s = scores[b, cols]
            order = np.argsort(-s, kind="stable")
            if q.k is not None:
                order = order[: q.k]
            because = None
            if q.explain and att is not None:
                picked = np.asarray(cols, dtype=np.int64)[order]
                because = self.explanations(hist_items[b], att[b, picked], q.explain)
            out.append(
                Ranked(
                    items=[(ids[i], float(s[i])) for i in order],
                    errors=errors,
                    history_used=min(len(hists[b][0]), self.max_history),
                    history_dropped=hists[b][3],
                    because=because,
                )
            )
        return out

    def _scores(self, hist: History, cand: torch.Tensor) -> np.ndarray:
        if self._onnx_scorer is not None:
            return self._onnx_scorer(hist, self.vectors, cand)
        return self.model.predict(hist, cand).float().cpu().numpy()

    def explanations(
        self, hist_items: np.ndarray, att: np.ndarray, top: int
    ) -> list[list[tuple[str, float]]]:
        """`attention_by_item` with item_ids (built from whole arrays: a request explains
        up to every candidate, and per-pair Python would cost more than the scoring)."""
        items, weights = top_by_item(hist_items, att, top)
        names = self.item_ids[items].tolist()
        shares = np.round(weights.astype(np.float64), WEIGHT_DECIMALS).tolist()
        return [list(zip(n, w, strict=True)) for n, w in zip(names, shares, strict=True)]


WEIGHT_DECIMALS = 4
"""Explanations' weights are shares of attention: 4 decimals say all they can, and a
response of 100 explained items serialises about a fifth faster than with the 17
digits of a float32 printed as a double."""


def top_by_item(hist_items: np.ndarray, att: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, the `top` history items its attention weighs most, the weights of
    an item met more than once summed: item_idx (C, k) and weights (C, k), largest
    first, k = min(top, distinct items). hist_items (L,) item_idx per history position
    (0 = padding); att (C, L)."""
    valid = hist_items > 0
    uniq, inverse = np.unique(hist_items[valid], return_inverse=True)
    onehot = np.zeros((len(inverse), len(uniq)), np.float32)
    onehot[np.arange(len(inverse)), inverse] = 1.0
    per_item = att[:, valid].astype(np.float32) @ onehot  # (C, U)
    best = np.argsort(-per_item, axis=1, kind="stable")[:, : min(top, len(uniq))]
    return uniq[best], np.take_along_axis(per_item, best, 1)


def attention_by_item(
    hist_items: np.ndarray, att: np.ndarray, top: int
) -> list[list[tuple[int, float]]]:
    """`top_by_item` as (item_idx, weight) lists, one per candidate."""
    items, weights = top_by_item(hist_items, att, top)
    return [
        list(zip(i, w, strict=True)) for i, w in zip(items.tolist(), weights.tolist(), strict=True)
    ]
