"""HTTP request and response bodies of the re-ranking service (its OpenAPI schema).

Shapes only: limits that depend on the deployment's config (how many
candidates, how long a text, which timestamps) are checked by the service,
which answers 413 or 422 naming the field. Every error, whatever its status,
has one shape: `ErrorResponse`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ray_app.times import parse_time


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("item_id is blank")
    return v


ItemId = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_not_blank)]
UserId = Annotated[str, Field(min_length=1, max_length=512)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        """JSON can carry a lone surrogate (`"\\ud800"`), which no UTF-8 text holds:
        refused here, before it reaches the tokenizer, the store or a response."""
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"not valid Unicode: a lone surrogate at character {e.start}"
                ) from None
        return v


class EventIn(_Body):
    item_id: ItemId
    # Seconds since the epoch or ISO-8601; default: when the request arrives. The
    # deployment's limits.min_timestamp .. max_timestamp bound it (422 otherwise).
    timestamp: int | str | None = None
    # One of the event types the model was trained with; default: the first.
    event_type: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("timestamp")
    @classmethod
    def _time(cls, v: int | str | None) -> int | None:
        if v is None:
            return None
        t = parse_time(v)
        if t < 0:
            raise ValueError("timestamp before 1970")
        return t


class CandidateIn(_Body):
    item_id: ItemId
    # Item text for an item the model has never seen (ignored for known items).
    text: str | None = None


class RerankRequest(_Body):
    user_id: UserId | None = None
    # Merged with the user's stored events (when user_id is given).
    history: list[EventIn] = Field(default_factory=list)
    candidates: list[CandidateIn] = Field(min_length=1)
    k: int | None = Field(default=None, ge=1)
    scored_at: int | str | None = Field(
        default=None,
        description="The moment of scoring (epoch seconds or ISO-8601; default: the wall "
        "clock): recency is measured to it, events later than it (sent or stored) are "
        "ignored and counted in history_dropped, and events without a timestamp take it. "
        "Replays logged traffic as it was.",
    )

    explain: bool = Field(
        default=False,
        description="Name, for each returned item, the history items its score attended "
        "to most (`because`). The weights are the scorer's attention over the user "
        "tower's history states: they say what the context term of the score read, not "
        "what caused the score (README: Explanations).",
    )
    explain_top: int = Field(
        default=3,
        ge=1,
        description="History items named per returned item when `explain` is true (at "
        "most the deployment's limits.max_explain_top).",
    )

    @field_validator("scored_at")
    @classmethod
    def _moment(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_time(v)


class Because(BaseModel):
    item_id: str = Field(description="An item of the user's history, stored or sent.")
    weight: float = Field(
        ge=0,
        le=1,
        description="Its share of the candidate's attention over the history (summed over "
        "the item's events).",
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RankedItem(ScoredItem):
    because: list[Because] | None = Field(
        default=None,
        description="With `explain`: the history items weighed most, largest weight "
        "first (absent otherwise).",
    )


class ItemError(BaseModel):
    item_id: str
    error: str


class RerankResponse(BaseModel):
    user_id: str | None
    model_version: str
    items: list[RankedItem]
    # Candidates that could not be scored (unknown item without text).
    errors: list[ItemError] = Field(default_factory=list)
    history_used: int
    history_dropped: int = 0
    stored_history: Literal["used", "unavailable", "not_requested"] = Field(
        default="not_requested",
        description="The user's stored events: merged into the history (`used`), or the "
        "event store did not answer in time, so only the request's own history was used "
        "(`unavailable`), or no user_id was sent (`not_requested`).",
    )


TextField = Annotated[str | list[str], Field(description="Text, or a list (genres, tags)")]


def _addressable(v: str) -> str:
    """A registered id must be one `DELETE /v1/items/{item_id}` can name."""
    if v in (".", "..") or any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
        raise ValueError(
            "item_id must not be '.' or '..' or hold control characters: "
            "DELETE /v1/items/{item_id} could not name it"
        )
    return v


class ItemIn(_Body):
    item_id: Annotated[ItemId, AfterValidator(_addressable)]
    text: str | None = Field(
        default=None,
        min_length=1,
        description="The item's text as the model reads it. Or give its fields (title, "
        "genres, ...) instead: they are rendered with the template the model was "
        "trained with.",
    )
    title: TextField | None = None
    description: TextField | None = None
    genres: TextField | None = None
    tags: TextField | None = None
    categories: TextField | None = None

    def fields(self) -> dict[str, str | None]:
        """The text fields, lists joined by `|` (the template's list delimiter)."""
        out: dict[str, str | None] = {}
        for name in ("title", "description", "genres", "tags", "categories"):
            v = getattr(self, name)
            out[name] = "|".join(v) if isinstance(v, list) else v
        return out


class ItemsRequest(_Body):
    items: list[ItemIn] = Field(min_length=1)
    replace: bool = Field(
        default=False,
        description="Items the model was trained on get 409 unless this is true; then "
        "they are scored from the new text's vector.",
    )


class RegisteredItem(BaseModel):
    item_id: str
    replaced: bool = Field(description="A trained item, now scored from this text.")


class ItemsResponse(BaseModel):
    model_version: str
    registered: int
    items: list[RegisteredItem]


class RetiredResponse(BaseModel):
    item_id: str
    retired: bool


class EventsRequest(_Body):
    user_id: UserId
    events: list[EventIn] = Field(min_length=1)


class EventsResponse(BaseModel):
    user_id: str
    stored: int
    history_length: int


class RecommendationsResponse(BaseModel):
    user_id: str
    partition: str
    model_version: str
    items: list[ScoredItem]


class ErrorDetail(BaseModel):
    # Where the problem is: ["body", "candidates", 3, "item_id"], ["query", "k"],
    # ["header", "authorization"], ["path", "user_id"] ...
    loc: list[str | int]
    msg: str
    # Machine-readable kind: pydantic's error type, or "too_large", "unauthorized",
    # "not_found", "conflict", "unavailable".
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx and 503 answer of the service."""

    detail: list[ErrorDetail]
