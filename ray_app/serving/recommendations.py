"""Reading the nightly top-K lists that `LATEST` points at, one user at a time."""

from __future__ import annotations

import logging
import threading

import pyarrow.compute as pc
import pyarrow.dataset as pads

from ray_app.data import schema
from ray_app.storage import exists, join, live, parquet_dataset, read_text

logger = logging.getLogger(__name__)


class NoRecommendations(LookupError):
    """Nothing published yet, or nothing for this user: the message says which."""


class TopKReader:
    """Follows `<root>/LATEST` (re-read on every call, so a new night's publication is
    picked up without a restart) and filters its partition by user.

    Partitions are sorted by user_id, so Parquet row-group statistics let the
    filter skip most of the data.
    """

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._open: tuple[str, pads.Dataset] | None = None

    def _dataset(self) -> tuple[str, pads.Dataset]:
        if not self.root:
            raise NoRecommendations("this deployment has no nightly top-K configured (topk)")
        latest = join(self.root, schema.TOPK_LATEST)
        if not exists(latest):
            raise NoRecommendations(f"no nightly top-K has been published under {self.root} yet")
        partition = read_text(latest).strip()
        where = live(join(self.root, partition))
        with self._lock:
            if self._open is None or self._open[0] != where:
                self._open = (where, parquet_dataset(where))
            return partition, self._open[1]

    def get(self, user_id: str, k: int | None = None) -> dict:
        partition, ds = self._dataset()
        table = ds.to_table(filter=pc.field(schema.USER_ID) == user_id)
        if table.num_rows == 0:
            raise NoRecommendations(
                f"user {user_id!r} has no list in the latest nightly top-K ({partition})"
            )
        table = table.sort_by(schema.RANK)
        if k is not None:
            table = table.slice(0, k)
        rows = table.to_pylist()
        return {
            "user_id": user_id,
            "partition": partition,
            "model_version": rows[0][schema.MODEL_VERSION],
            "items": [{"item_id": r[schema.ITEM_ID], "score": r[schema.SCORE]} for r in rows],
        }
