"""Config of the `nightly` stage."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator

from ray_app.config import PathLike, StrictModel
from ray_app.model.catalogue import CatalogueConfig
from ray_app.model.ranker import TextEncoderChoice
from ray_app.runtime import RayConfig


class NightlyConfig(StrictModel):
    """Config of the `nightly` stage: every user's top-K from the whole catalogue."""

    model: PathLike
    """The model artifact (as served); its item table is the retrieval index."""
    prepared: PathLike
    """A prepare output: every user's events come from its interactions."""
    output: PathLike
    """The top-K root: lists go to <output>/dt=<date>/part-*.parquet, and <output>/LATEST names the
    newest published partition.
    """
    date: str | None = None
    """YYYY-MM-DD (UTC) the lists are for; default: today. Recency is measured to the end of that
    day, so a re-run of the same date gives the same lists.
    """
    k: int = Field(default=100, ge=1)
    """Items per user's list."""
    num_candidates: int = Field(default=200, ge=0)
    """Candidates per user from the user vector against the item table (exact), re-ranked by the
    full model; 0 = the whole catalogue (exact top-K, slower).
    """
    as_of: Literal["now", "valid", "test"] = "now"
    """Backtest: `valid`/`test` ranks each user as of their valid/test target (history before it,
    recency to its time), which the evaluate stage then scores with its full-ranking protocol.
    `now` uses every event.
    """
    diversity: float = Field(default=0.0, ge=0, lt=1)
    """Maximal marginal relevance: 0 = off; w in (0, 1) trades relevance for dissimilarity (cosine
    of item vectors) to the items already listed.
    """
    explain_top: int = Field(default=0, ge=0, le=50)
    """>0: a `because` list column, per listed item the history items its score attended to most
    (item_id, weight; largest first, as `/v1/rerank`'s `explain`); 0 = no such column.
    """
    long_tail_boost: float = Field(default=0.0, ge=0)
    """Added to a candidate's score times (1 - its popularity percentile): 0 = off."""
    batch_size: int = Field(default=256, ge=1)
    """Users per forward pass of an actor."""
    concurrency: int | None = Field(default=None, ge=1)
    """Actors holding the model (default: one per CPU, or per GPU)."""
    cpus_per_actor: float = Field(default=1.0, gt=0)
    """CPUs each actor reserves."""
    use_gpu: bool | Literal["auto"] = "auto"
    """`auto` puts the actors on GPUs when the cluster has them."""
    torch_threads: int = Field(default=1, ge=1)
    """PyTorch threads per actor."""
    items: CatalogueConfig | None = None
    """The store of items registered through the service (PUT /v1/items), to rank them with the
    catalogue: the serving app's event store kind (`actor` when the job runs on the serving Ray
    cluster, or `redis` with its URL). Their stored vectors of this model version are used;
    those it has none of are encoded from their text and stored. null = the artifact's items only.
    """
    text_encoder: TextEncoderChoice = "auto"
    """What encodes registered items the store has no vectors of for this model version (as the
    serving app's `text_encoder`)."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""

    @field_validator("date", mode="before")
    @classmethod
    def _day(cls, v: Any) -> str | None:
        import datetime as dt

        if isinstance(v, dt.date):  # YAML reads an unquoted 2026-11-24 as a date
            v = v.isoformat()
        if v is None:
            return None
        if not isinstance(v, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
            raise ValueError(f"date must be YYYY-MM-DD, got {v!r}")
        try:
            dt.date.fromisoformat(v)
        except ValueError as e:
            raise ValueError(f"date {v!r}: {e}") from None
        return v
