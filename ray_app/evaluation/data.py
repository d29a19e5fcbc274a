"""Loading a published `prepare` output into the arrays evaluation needs.

`EvalData` holds, per split, one row per user with a target: the user's
history before the target (all earlier events, in time order), the target,
and the set of items the user touched before it (excluded from full ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ray_app.data import schema as S
from ray_app.data.sequences import SORT_KEYS
from ray_app.storage import join, read_parquet, require_complete


@dataclass
class SplitTargets:
    """Users with a held-out item in one split."""

    user_ids: np.ndarray  # (n,) str
    histories: list[np.ndarray]  # item_idx before the target, oldest first
    targets: np.ndarray  # (n,) item_idx
    history_events: list[np.ndarray]  # event_idx aligned with histories
    history_times: list[np.ndarray]  # timestamps (s) aligned with histories
    target_times: np.ndarray  # (n,) timestamp of each target

    def __len__(self) -> int:
        return len(self.targets)

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
        return np.bincount(self.train[S.ITEM_IDX].to_numpy(), minlength=self.num_items + 1)


def load_prepared(path: str) -> EvalData:
    """Read a complete prepare output (fails clearly on a half-written one)."""
    manifest = require_complete(path)
    items = read_parquet(join(path, "items")).sort_values(S.ITEM_IDX).reset_index(drop=True)
    num_items = int(items[S.ITEM_IDX].max())
    pad = pd.DataFrame(
        {
            S.ITEM_IDX: [0],
            S.ITEM_ID: [""],
            S.TITLE: [""],
            S.TEXT: [""],
            S.INPUT_IDS: [np.zeros(0, dtype=np.int32)],
        }
    )
    items = pd.concat([pad, items], ignore_index=True)
    ev = read_parquet(join(path, "interactions")).sort_values(SORT_KEYS, kind="stable")
    user_items = {u: g.to_numpy() for u, g in ev.groupby(S.USER_ID, sort=False)[S.ITEM_IDX]}
    groups = dict(tuple(ev.groupby(S.USER_ID, sort=False)))
    splits = {}
    for split in ("valid", "test"):
        ex = (
            read_parquet(join(path, "examples", split))
            .sort_values(S.USER_ID)
            .reset_index(drop=True)
        )
        hist, hist_ev, hist_t = [], [], []
        for u, pos in zip(ex[S.USER_ID], ex[S.TARGET_POS], strict=True):
            g = groups[u]
            hist.append(g[S.ITEM_IDX].to_numpy()[:pos])
            hist_ev.append(g[S.EVENT_IDX].to_numpy()[:pos])
            hist_t.append(g[S.TIMESTAMP].to_numpy()[:pos])
        splits[split] = SplitTargets(
            user_ids=ex[S.USER_ID].to_numpy(),
            histories=hist,
            targets=ex[S.TARGET_ITEM_IDX].to_numpy(np.int64),
            history_events=hist_ev,
            history_times=hist_t,
            target_times=ex[S.TARGET_TIMESTAMP].to_numpy(np.int64),
        )
    train = ev[ev[S.SPLIT] == "train"].reset_index(drop=True)
    return EvalData(manifest, items, train, num_items, splits, user_items)
