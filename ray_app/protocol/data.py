"""Loading a published `prepare` output into the arrays evaluation needs.

`EvalData` holds, per split, one row per user with a target: the user's
history before the target (all earlier events, in time order), the target,
and the set of items the user touched before it (excluded from full ranking).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from ray_app.data import schema
from ray_app.data.sequences import SORT_KEYS
from ray_app.storage import join, published, read_parquet
from ray_app.times import day_start


@dataclass
class SplitTargets:
    """Users with a held-out item in one split."""

    user_ids: np.ndarray  # (n,) str
    histories: list[np.ndarray]  # item_idx before the target, oldest first
    targets: np.ndarray  # (n,) item_idx
    history_events: list[np.ndarray]  # event_idx aligned with histories
    history_times: list[np.ndarray]  # timestamps (s) aligned with histories
    target_times: np.ndarray  # (n,) timestamp of each target
    # (n,) the moment each history's recency is measured to; None = the target's time.
    scored_at: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def moments(self) -> np.ndarray:
        """When each target is scored: `scored_at`, or the target's own time."""
        return self.target_times if self.scored_at is None else self.scored_at

    @property
    def has_history(self) -> np.ndarray:
        return np.array([len(h) > 0 for h in self.histories], dtype=bool)

    def last_event_times(self) -> np.ndarray:
        """(n,) time of each history's last event (ties share it); the target's own time
        where the history is empty."""
        return np.array(
            [
                h[-1] if len(h) else t
                for h, t in zip(self.history_times, self.target_times, strict=True)
            ],
            dtype=np.int64,
        )

    def after_last_event(self, delta_s: int) -> SplitTargets:
        """The same targets scored `delta_s` after their history's last event: a user who
        comes back later with the same history. Every gap to the moment of scoring is then
        >= 0. A target without an earlier event is scored at its own time."""
        at = np.where(self.has_history, self.last_event_times() + int(delta_s), self.target_times)
        return replace(self, scored_at=at)

    def as_of_previous_day(self) -> SplitTargets:
        """What the nightly run of the UTC day before each target knows: the events
        before 00:00 UTC of the target's day, recency measured to the end of the day
        before. A history may become empty (every earlier event on the target's day)."""
        midnight = day_start(self.target_times)
        keep = [
            int(np.searchsorted(t, m, side="left"))
            for t, m in zip(self.history_times, midnight, strict=True)
        ]
        return SplitTargets(
            user_ids=self.user_ids,
            histories=[h[:n] for h, n in zip(self.histories, keep, strict=True)],
            targets=self.targets,
            history_events=[e[:n] for e, n in zip(self.history_events, keep, strict=True)],
            history_times=[t[:n] for t, n in zip(self.history_times, keep, strict=True)],
            target_times=self.target_times,
            scored_at=midnight - 1,
        )

    def subset(self, rows: np.ndarray | slice) -> SplitTargets:
        """The same targets restricted to `rows` (a rank's share, a user group)."""
        idx = np.arange(len(self))[rows]
        pick = [int(i) for i in idx]
        return SplitTargets(
            user_ids=self.user_ids[idx],
            histories=[self.histories[i] for i in pick],
            targets=self.targets[idx],
            history_events=[self.history_events[i] for i in pick],
            history_times=[self.history_times[i] for i in pick],
            target_times=self.target_times[idx],
            scored_at=None if self.scored_at is None else self.scored_at[idx],
        )


@dataclass
class EvalData:
    manifest: dict
    items: pd.DataFrame  # by item_idx, row i = item i (row 0 = padding)
    train: pd.DataFrame  # train-split events, time-ordered per user
    num_items: int  # real items; indices 1..num_items
    splits: dict[str, SplitTargets]
    user_items: dict[str, np.ndarray]  # every item each user touched, all splits

    @property
    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train[schema.ITEM_IDX].to_numpy(), minlength=self.num_items + 1)


def sample_users(data: EvalData, max_users: int | None, seed: int) -> EvalData:
    """The same data with its splits cut to a seeded sample of `max_users` users drawn from
    every split's users, so that a user sampled in valid is in test too; training events stay
    whole. Unchanged when there are no more users than that."""
    users = np.unique(np.concatenate([t.user_ids for t in data.splits.values()]))
    if max_users is None or len(users) <= max_users:
        return data
    keep = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    return replace(
        data,
        splits={
            name: t.subset(np.flatnonzero(np.isin(t.user_ids, keep)))
            for name, t in data.splits.items()
        },
    )


def load_prepared(path: str) -> EvalData:
    """Read a complete prepare output (fails clearly on a half-written one)."""
    path, manifest = published(path)
    items = read_parquet(join(path, "items")).sort_values(schema.ITEM_IDX).reset_index(drop=True)
    num_items = int(items[schema.ITEM_IDX].max())
    pad = pd.DataFrame(
        {
            schema.ITEM_IDX: [0],
            schema.ITEM_ID: [""],
            schema.TITLE: [""],
            schema.TEXT: [""],
            schema.INPUT_IDS: [np.zeros(0, dtype=np.int32)],
        }
    )
    items = pd.concat([pad, items], ignore_index=True)
    ev = read_parquet(join(path, "interactions")).sort_values(SORT_KEYS, kind="stable")
    user_items = {
        u: g.to_numpy() for u, g in ev.groupby(schema.USER_ID, sort=False)[schema.ITEM_IDX]
    }
    groups = dict(tuple(ev.groupby(schema.USER_ID, sort=False)))
    splits = {}
    for split in ("valid", "test"):
        ex = (
            read_parquet(join(path, "examples", split))
            .sort_values(schema.USER_ID)
            .reset_index(drop=True)
        )
        hist, hist_ev, hist_t = [], [], []
        for u, pos in zip(ex[schema.USER_ID], ex[schema.TARGET_POS], strict=True):
            g = groups[u]
            hist.append(g[schema.ITEM_IDX].to_numpy()[:pos])
            hist_ev.append(g[schema.EVENT_IDX].to_numpy()[:pos])
            hist_t.append(g[schema.TIMESTAMP].to_numpy()[:pos])
        splits[split] = SplitTargets(
            user_ids=ex[schema.USER_ID].to_numpy(),
            histories=hist,
            targets=ex[schema.TARGET_ITEM_IDX].to_numpy(np.int64),
            history_events=hist_ev,
            history_times=hist_t,
            target_times=ex[schema.TARGET_TIMESTAMP].to_numpy(np.int64),
        )
    train = ev[ev[schema.SPLIT] == "train"].reset_index(drop=True)
    return EvalData(manifest, items, train, num_items, splits, user_items)
