"""Config of the Serve application (`AppArgs`) and of `rerank serve` (`ServeConfig`)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_app.config import PathLike, StrictModel
from ray_app.model.catalogue import CatalogueConfig
from ray_app.model.ranker import ScorerChoice, TextEncoderChoice
from ray_app.runtime import RayConfig
from ray_app.times import parse_time


class ServeLimits(StrictModel):
    """What one request may carry. Larger requests get 413 naming the field."""

    max_candidates: int = Field(default=1000, ge=1)
    """Candidates per /v1/rerank request."""
    max_history: int = Field(default=500, ge=0)
    """History events per request."""
    max_events: int = Field(default=1000, ge=1)
    """Events per /v1/events request."""
    max_text_chars: int = Field(default=4000, ge=1)
    """Characters of a new candidate's text."""
    max_k: int = Field(default=1000, ge=1)
    """Largest `k`."""
    max_items: int = Field(default=1000, ge=1)
    """Items per PUT /v1/items request."""
    max_explain_top: int = Field(default=10, ge=1)
    """Largest `explain_top` of /v1/rerank (history items named per returned item)."""
    max_body_bytes: int = Field(default=2_000_000, ge=1024)
    """Largest request body."""
    min_timestamp: int | str = "1990-01-01T00:00:00Z"
    """Earliest accepted `scored_at` (epoch seconds or ISO-8601), as prepare's
    validation.min_timestamp.
    """
    max_timestamp: int | str | None = None
    """Latest accepted `scored_at`; null = the request's arrival + 1 day, as prepare's
    validation.max_timestamp.
    """

    @field_validator("min_timestamp", "max_timestamp")
    @classmethod
    def _time(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_time(v)
        return v


class AutoscalingSettings(StrictModel):
    """Ray Serve `autoscaling_config` of the re-ranker deployment."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas (0 scales to zero when idle)."""
    max_replicas: int = Field(default=4, ge=1)
    """Most replicas."""
    initial_replicas: int | None = Field(default=None, ge=0)
    """Replicas at deploy time (default: min_replicas)."""
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    """Requests in flight per replica the autoscaler aims for (queued + running)."""
    upscale_delay_s: float = Field(default=10.0, ge=0)
    """Load must stay above target this long before a replica is added."""
    downscale_delay_s: float = Field(default=60.0, ge=0)
    """Load must stay below target this long before a replica is removed."""
    metrics_interval_s: float = Field(default=2.0, gt=0)
    """How often replicas report their load, and the window it is averaged over (Serve wants the
    window longer than the interval).
    """
    look_back_period_s: float = Field(default=10.0, gt=0)
    """Window the load is averaged over."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})"
            )
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s}) must exceed "
                f"metrics_interval_s ({self.metrics_interval_s})"
            )
        return self


class EventStoreConfig(StrictModel):
    """Where users' recent events live between requests.

    `actor`: one named Ray actor (one machine, lost with the cluster);
    `redis`: a Redis server (clusters; survives replica and cluster restarts).
    """

    kind: Literal["actor", "redis"] = "actor"
    """`actor` (one named Ray actor) or `redis`."""
    redis_url: str | None = None
    """redis://host:port/db; default: the RERANK_REDIS_URL environment variable."""
    max_events_per_user: int = Field(default=200, ge=1)
    """Most recent events kept per user."""
    key_prefix: str = "rerank:events:"
    """Redis key prefix of the users' event lists."""
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    """Longest wait for the store on each call (connect, then answer). Past it the store
    counts as unavailable: /v1/rerank scores from the request's own history and says so
    (`stored_history: unavailable`); /v1/events answers 503 with Retry-After.
    """
    retry_after_s: int = Field(default=5, ge=1)
    """Retry-After of /v1/events' 503 while the store is unavailable."""

    @model_validator(mode="after")
    def _redis_has_url(self) -> EventStoreConfig:
        if self.kind == "redis" and not (self.redis_url or os.environ.get("RERANK_REDIS_URL")):
            raise ValueError("events.kind 'redis' needs events.redis_url or RERANK_REDIS_URL")
        return self


class ItemsSettings(StrictModel):
    """Registered items (`PUT /v1/items`): kept in the event store's kind of store (the
    named actor, or the same Redis), vectors per model version and text encoder."""

    key_prefix: str = "rerank:items:"
    """Prefix of the Redis keys."""
    sync_s: float = Field(default=1.0, gt=0)
    """How often a replica pulls the items other replicas registered or retired. A request
    naming an item its replica does not know pulls them at once, so a new item is scored
    everywhere as soon as its PUT is answered; a replaced or retired item's change reaches
    the other replicas within this time.
    """
    grace_s: float = Field(default=300.0, ge=0)
    """Vectors of a model version no replica serves any more are deleted this long after the
    last replica swapped away from it (replicas swap one after another).
    """
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Longest wait for the store on each call (a PUT answers 503 past it)."""


class AppArgs(StrictModel):
    """Arguments of the Serve application (`serve run/deploy ray_app.serving.app:build_app`)."""

    model: PathLike = "runs/demo/model"
    """The model artifact to serve; a new value in user_config swaps it live."""
    topk: str | None = None
    """The nightly top-K root (holding LATEST); null = no recommendations endpoint data."""
    events: EventStoreConfig = Field(default_factory=EventStoreConfig)
    """Where users' recent events are stored between requests."""
    limits: ServeLimits = Field(default_factory=ServeLimits)
    """What one request may carry (413 beyond)."""
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    """Serve's autoscaling_config of the deployment."""
    max_batch_size: int = Field(default=16, ge=1)
    """Dynamic batching across requests (@serve.batch)."""
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    """How long a request waits for others to join its batch. 0: a batch is whatever is queued
    when the replica is ready to score, so a lone request is scored at once and the requests
    that arrive while a batch is being scored form the next one.
    """
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests a replica holds at once (Serve queues the rest)."""
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs per replica."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs per replica (0 = CPU)."""
    torch_threads: int = Field(default=1, ge=1)
    """PyTorch threads per replica."""
    cold_cache_size: int = Field(default=10_000, ge=0)
    """New items (sent with text) whose vectors are kept per replica."""
    text_encoder: TextEncoderChoice = "auto"
    """What encodes new items' text (requests with text, PUT /v1/items): `torch`, `onnx`
    (ONNX Runtime, float32: PyTorch's vectors, faster), `onnx-int8` (dynamic int8: faster still,
    vectors within 0.99 cosine, rankings moved); `auto` = onnx on a CPU, torch on a GPU. The
    artifact's item table is PyTorch's whatever this says.
    """
    scorer: ScorerChoice = "auto"
    """What runs a request's forward pass (user tower and scorer): `torch`, or `onnx` (ONNX
    Runtime on a CPU: the same scores within 1e-5, a fraction of PyTorch's per-operation cost,
    which dominates a request's small tensors); `auto` = onnx on a CPU, torch on a GPU. The
    nightly job and evaluation score with PyTorch.
    """
    items: ItemsSettings = Field(default_factory=ItemsSettings)
    """Registered items (PUT /v1/items, DELETE /v1/items/{id})."""
    memory_trim_s: float = Field(default=30.0, ge=0)
    """At most this often, after a batch, the replica hands freed heap memory back to
    the OS (glibc's malloc_trim; 0 = never). Requests of varying sizes otherwise leave
    the heap fragmented and the replica's RSS creeping up for hours."""
    auth_token_env: str | None = None
    """Name of an environment variable holding a bearer token; when it is set, /v1/* requires
    `Authorization: Bearer <token>`.
    """

    def catalogue(self) -> CatalogueConfig:
        """The item store: the event store's kind and Redis, the items' own keys."""
        return CatalogueConfig(
            kind=self.events.kind,
            redis_url=self.events.redis_url,
            key_prefix=self.items.key_prefix,
            timeout_s=self.items.timeout_s,
        )


class ServeConfig(AppArgs):
    """`rerank serve`: the app's arguments plus where it listens and which Ray it runs on."""

    host: str = "127.0.0.1"
    """Address Serve's HTTP proxy binds to (0.0.0.0 to listen beyond this machine)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port."""
    app_name: str = "rerank"
    """Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the app."""
    seed_histories: str | None = None
    """A prepare output whose users' events seed the event store at start-up."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""

    def app_args(self) -> AppArgs:
        return AppArgs.model_validate(self.model_dump(include=set(AppArgs.model_fields)))
