"""Turning prepared examples and item text into tensors for a training step.

Rows arrive from Ray Data as Arrow batches; list columns are padded per batch
with vectorised offset arithmetic (no Python loop per row). Item text goes
through the encoder once per unique item per step, padded to the longest of
those items, not to the global maximum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ray_app.data import schema
from ray_app.model.encoder import TextBatch, TextEncoder
from ray_app.model.history import History, left_pad
from ray_app.times import day_start

logger = logging.getLogger(__name__)


@dataclass
class ExampleBatch:
    hist: History
    targets: torch.Tensor  # (B,)
    negatives: torch.Tensor  # (B, m)
    times: torch.Tensor | None = None  # (B,) target timestamps


def to_examples(
    batch: pa.Table,
    max_history: int,
    negatives: int,
    hidden: np.ndarray | None = None,
    nightly: np.ndarray | None = None,
) -> ExampleBatch:
    """An Arrow batch of the examples table -> tensors; `hidden` items (cold-start
    hold-out) are removed from histories as if never seen, and the `nightly` rows (bool
    per row) are cut as the nightly run of the day before their target sees them."""
    if nightly is not None and nightly.any():
        batch = as_of_previous_day(batch, nightly)
    items = left_pad(batch.column(schema.HIST_ITEM_IDX), max_history)
    events = left_pad(batch.column(schema.HIST_EVENT_IDX), max_history)
    gaps = left_pad(batch.column(schema.HIST_GAP), max_history)
    if hidden is not None:
        items = np.where(hidden[items], 0, items)
    negs = left_pad(batch.column(schema.NEGATIVES), negatives)
    return ExampleBatch(
        hist=History(torch.from_numpy(items), torch.from_numpy(events), torch.from_numpy(gaps)),
        targets=torch.from_numpy(batch.column(schema.TARGET_ITEM_IDX).to_numpy().astype(np.int64)),
        negatives=torch.from_numpy(negs),
        times=torch.from_numpy(batch.column(schema.TARGET_TIMESTAMP).to_numpy().astype(np.int64)),
    )


def as_of_previous_day(batch: pa.Table, rows: np.ndarray) -> pa.Table:
    """The examples of `rows` (bool per row) as the nightly run of the UTC day before the
    target sees them, the moment the nightly lists are scored at (the evaluation's
    `SplitTargets.as_of_previous_day`): events on the target's day dropped, every gap
    measured to the end of the day before. A history may become empty, the case of a
    user whose first day it is, which the model otherwise never trains on."""
    target = batch.column(schema.TARGET_TIMESTAMP).to_numpy().astype(np.int64)
    offset = np.where(rows, target - (day_start(target) - 1), 0)
    gaps = batch.column(schema.HIST_GAP).combine_chunks()
    lens = np.diff(gaps.offsets.to_numpy())
    owner = np.repeat(np.arange(len(lens)), lens)
    values = gaps.flatten().to_numpy().astype(np.int64)
    shift = offset[owner]
    keep = values >= shift
    new_offsets = pa.array(np.r_[0, np.cumsum(np.bincount(owner[keep], minlength=len(lens)))])
    new_offsets = new_offsets.cast(pa.int32())

    def cut(column: pa.ChunkedArray, vals: np.ndarray | None = None) -> pa.ListArray:
        col = column.combine_chunks()
        flat = col.flatten() if vals is None else pa.array(vals, col.type.value_type)
        return pa.ListArray.from_arrays(new_offsets, flat.filter(pa.array(keep)))

    out = batch
    for name, vals in (
        (schema.HIST_ITEM_IDX, None),
        (schema.HIST_EVENT_IDX, None),
        (schema.HIST_GAP, values - shift),
    ):
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(i), cut(batch.column(name), vals))
    i = out.schema.get_field_index(schema.HIST_LEN)
    if i < 0:
        return out
    new_lens = pa.array(np.diff(new_offsets.to_numpy()), out.schema.field(i).type)
    return out.set_column(i, out.schema.field(i), new_lens)


def redraw_since_last(
    hist: History,
    fraction: float,
    lo_s: int,
    hi_s: int,
    gen: torch.Generator,
    exclude: torch.Tensor | None = None,
) -> History:
    """`fraction` of the rows scored later or sooner: every gap to the moment of scoring
    shifted so that the time since the last event is log-uniform in [lo_s, hi_s]. The
    gaps between the history's own events do not change. `exclude`d rows stay."""
    valid = hist.items > 0
    since = torch.where(valid, hist.gaps, hist.gaps.amax() + 1).amin(1)
    u = torch.rand(len(hist), generator=gen, dtype=torch.float64)
    new = torch.exp(math.log(lo_s) + u * (math.log(hi_s) - math.log(lo_s))).long()
    pick = (torch.rand(len(hist), generator=gen) < fraction) & valid.any(1)
    if exclude is not None:
        pick &= ~exclude
    shift = torch.where(pick, new - since, torch.zeros_like(since))
    gaps = torch.where(valid, hist.gaps + shift[:, None], hist.gaps)
    return History(hist.items, hist.events, gaps)


@dataclass
class StepCandidates:
    items: torch.Tensor  # (C,) unique item_idx
    labels: torch.Tensor  # (B,) position of each target in `items`
    negatives: torch.Tensor  # (B, m) positions of each example's negatives
    logq: torch.Tensor  # (C,)


def step_candidates(
    ex: ExampleBatch, pos_prob: torch.Tensor, neg_prob: torch.Tensor
) -> StepCandidates:
    """Targets and sampled negatives of the batch, deduplicated, shared by every example.

    A candidate's log-expected-count in the set (targets drawn by popularity,
    negatives by the prepare sampler's weights) is subtracted from its logit,
    the logQ correction that keeps popular items from being over-penalised.
    """
    b, m = ex.negatives.shape
    allc = torch.cat([ex.targets, ex.negatives.reshape(-1)])
    items, inverse = torch.unique(allc, return_inverse=True)
    expected = b * pos_prob[items] + b * m * neg_prob[items]
    return StepCandidates(
        items=items,
        labels=inverse[:b],
        negatives=inverse[b:].view(b, m),
        logq=torch.log(expected.clamp(min=1e-12)),
    )


def not_yet_seen(
    items: torch.Tensor, times: torch.Tensor | None, first_seen: torch.Tensor
) -> torch.Tensor | None:
    """(B, C) which of `items` have their first training event after each example's moment:
    items the user could not have met then (released later, as far as the logs tell), which
    the loss must not count as items the user passed over. None when the batch has no
    moments."""
    if times is None:
        return None
    return first_seen[items][None, :] > times[:, None]


def new_at_moment(
    items: torch.Tensor, times: torch.Tensor | None, first_seen: torch.Tensor, days: float
) -> torch.Tensor | None:
    """(B, C) which of `items` each example meets as a new item: first seen in training less
    than `days` before the example's moment, or after it (never-seen items are unknown
    anyway). None when off or when the batch has no moments."""
    if days <= 0 or times is None:
        return None
    return not_yet_seen(items, times - int(days * 86_400), first_seen)


class ItemText:
    """Every item's token ids, and the encoder's frozen lower output once computed.

    `cache` holds the lower layers' output of every item in float16 (about
    items x tokens x hidden x 2 bytes), so each step runs only the trained top
    layers.
    """

    def __init__(self, input_ids: list[np.ndarray]) -> None:
        self.lengths = torch.tensor([len(x) for x in input_ids], dtype=torch.long)
        width = max(1, int(self.lengths.max()))
        self.ids = torch.from_numpy(pad_right(input_ids, width))
        self.cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _trim(self, idx: torch.Tensor) -> tuple[int, torch.Tensor]:
        width = max(1, int(self.lengths[idx].max()))
        att = (torch.arange(width)[None, :] < self.lengths[idx][:, None]).long()
        return width, att

    def inputs(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """What `TextEncoder.upper` takes for items `idx`: cached lower output, or ids."""
        idx = idx.cpu()
        width, att = self._trim(idx)
        if self.cache is not None:
            x = self.cache[idx, :width].to(device=device, dtype=torch.float32)
        else:
            x = self.ids[idx, :width].to(device)
        return x, att.to(device)

    def chunked_inputs(self, idx: torch.Tensor, device: torch.device, chunks: int) -> TextBatch:
        """`inputs` for items `idx` in `chunks` groups of similar length, each padded
        to its own longest."""
        idx = idx.cpu()
        order = torch.argsort(self.lengths[idx], stable=True)
        parts = [self.inputs(idx[o], device) for o in torch.tensor_split(order, chunks) if len(o)]
        return TextBatch(parts, torch.argsort(order).to(device))

    @torch.no_grad()
    def build_cache(self, encoder: TextEncoder, device: torch.device, chunk: int = 256) -> None:
        hidden = encoder.out_dim
        cache = torch.zeros(len(self), self.ids.shape[1], hidden, dtype=torch.float16)
        for idx in self._length_chunks(chunk):
            width, att = self._trim(idx)
            out = encoder.lower(self.ids[idx, :width].to(device), att.to(device))
            cache[idx, :width] = out.to("cpu", torch.float16)
        self.cache = cache

    @torch.no_grad()
    def pooled(self, encoder: TextEncoder, device: torch.device, chunk: int = 256) -> torch.Tensor:
        """(items, hidden) pooled text of every item with the current weights."""
        table = torch.zeros(len(self), encoder.out_dim)
        was_training = encoder.training
        encoder.eval()
        for idx in self._length_chunks(chunk):
            if self.cache is not None:
                x, att = self.inputs(idx, device)
                out = encoder.upper(x, att)
            else:
                width, att = self._trim(idx)
                out = encoder(self.ids[idx, :width].to(device), att.to(device))
            table[idx] = out.float().cpu()
        encoder.train(was_training)
        table[self.lengths == 0] = 0
        return table

    def _length_chunks(self, chunk: int) -> list[torch.Tensor]:
        order = torch.argsort(self.lengths, stable=True)
        return [order[lo : lo + chunk] for lo in range(0, len(order), chunk)]


def pad_right(seqs: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s)[:width]
        out[i, : len(s)] = s
    return out
