"""A user's recent events as the tensors the user tower reads.

Histories are left-padded (most recent event last, `items == 0` is padding)
and time gaps are measured to the moment of scoring: the target's time in
training and evaluation, "now" when serving, the end of the day before in the
nightly job. Every caller gives the same thing; what the model reads of it
(the intervals between events and the time since the last one, or every gap
as given) is the model config's `time_input`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch


@dataclass
class History:
    items: torch.Tensor  # (B, L) item_idx
    events: torch.Tensor  # (B, L) event_idx
    gaps: torch.Tensor  # (B, L) seconds between the event and the time of scoring

    def to(self, device: torch.device) -> History:
        return History(self.items.to(device), self.events.to(device), self.gaps.to(device))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, rows: slice | torch.Tensor) -> History:
        return History(self.items[rows], self.events[rows], self.gaps[rows])


def recency_bucket(gaps: torch.Tensor, buckets: int, resolution_s: int = 1) -> torch.Tensor:
    """Seconds -> 1 + floor(log2(1 + minutes)), capped; 0 is kept for padding.

    Gaps are first floored to whole multiples of `resolution_s`.
    """
    gaps = gaps.clamp(min=0)
    if resolution_s > 1:
        gaps = torch.div(gaps, resolution_s, rounding_mode="floor") * resolution_s
    minutes = gaps.to(torch.float32) / 60.0
    b = 1 + torch.floor(torch.log2(1.0 + minutes)).long()
    return b.clamp(max=buckets - 1)


def time_resolution(timestamps: np.ndarray) -> int:
    """The coarsest of day, hour, minute and second that divides every timestamp (s)."""
    ts = np.asarray(timestamps, dtype=np.int64)
    for unit in (86_400, 3_600, 60):
        if len(ts) and not (ts % unit).any():
            return unit
    return 1


def left_pad(column: pa.Array | pa.ChunkedArray, length: int, dtype=np.int64) -> np.ndarray:
    """List column -> (n, length) array holding each row's last `length` values, right-aligned."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    lens = np.diff(offsets)
    n = len(lens)
    out = np.zeros((n, length), dtype=dtype)
    if not len(values):
        return out
    rows = np.repeat(np.arange(n), lens)
    pos = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lens)
    col = length - np.repeat(lens, lens) + pos
    keep = col >= 0
    out[rows[keep], col[keep]] = values[keep]
    return out


def pad_sequences(seqs: Sequence[np.ndarray], length: int, dtype=np.int64) -> np.ndarray:
    """Python lists of arrays -> the same layout as `left_pad` (a request's few rows: a
    copy per row costs less than building an Arrow list array)."""
    out = np.zeros((len(seqs), length), dtype=dtype)
    for row, seq in zip(out, seqs, strict=True):
        tail = np.asarray(seq)[-length:]
        if len(tail):
            row[length - len(tail) :] = tail
    return out


def make_history(
    items: Sequence[np.ndarray],
    events: Sequence[np.ndarray],
    times: Sequence[np.ndarray],
    now: np.ndarray,
    length: int,
) -> History:
    """Per-user arrays (oldest first) -> History with gaps to `now` (one time per user).

    At most `length` events each, and no longer than the longest history given:
    leading columns that are padding for every user would only cost compute (the
    user tower counts positions from the most recent event, so nothing else changes).
    """
    length = max(1, min(length, max((len(s) for s in items), default=0)))
    t = pad_sequences(times, length)
    it = pad_sequences(items, length)
    gaps = np.where(it > 0, np.asarray(now, dtype=np.int64)[:, None] - t, 0)
    return History(
        torch.from_numpy(it),
        torch.from_numpy(pad_sequences(events, length)),
        torch.from_numpy(gaps),
    )
