"""The BERT-family text encoder, split into a frozen lower part and a trained top.

Fine-tuning the whole encoder on a CPU is too slow for a useful budget, so the
encoder is cut after its frozen layers: the lower part runs once per item
(its output can be cached), only the top `trainable_layers` run per step. With
`trainable_layers=-1` (GPU clusters) the whole encoder, embeddings included,
trains and nothing is cached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

TINY = "tiny"


def _tiny_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def tokenizer_source(name: str) -> str:
    """Where the tokenizer of encoder `name` comes from (`tiny` uses the bundled one)."""
    from ray_app.data.text import resolve_encoder

    return resolve_encoder("default" if name == TINY else name)


def load_pretrained(name: str, seed: int = 0):
    """(BertModel-like, tokenizer) for `default`, `tiny`, a local folder or a hub id.

    Local folders load with `local_files_only`, so nothing reaches the network
    for the bundled default.
    """
    from transformers import AutoModel, AutoTokenizer

    from ray_app.data.text import resolve_encoder

    tok_src = tokenizer_source(name)
    tokenizer = AutoTokenizer.from_pretrained(tok_src, local_files_only=os.path.isdir(tok_src))
    if name == TINY:
        torch.manual_seed(seed)
        return AutoModel.from_config(_tiny_config(len(tokenizer))), tokenizer
    path = resolve_encoder(name)
    try:
        model = AutoModel.from_pretrained(path, local_files_only=os.path.isdir(path))
    except OSError as e:
        raise ValueError(
            f"model.encoder={name!r}: cannot load a transformers checkpoint from there ({e})"
        ) from e
    return model, tokenizer


def from_saved(folder: Path):
    """Encoder skeleton from a saved `config.json` (weights come from the artifact)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return AutoModel.from_config(config), tokenizer


@dataclass
class TextBatch:
    """Encoder inputs for some items in length-sorted chunks (each padded to its
    own longest); `restore` undoes the sort."""

    parts: list[tuple[torch.Tensor, torch.Tensor]]
    restore: torch.Tensor

    def encode(self, encoder: TextEncoder) -> torch.Tensor:
        pooled = torch.cat([encoder.upper(x, att) for x, att in self.parts])
        return pooled[self.restore]


class TextEncoder(nn.Module):
    """`lower(ids)` -> hidden states after the frozen layers; `upper(x)` -> pooled vector."""

    def __init__(
        self,
        bert: nn.Module,
        trainable_layers: int,
        pooling: str = "mean",
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
    ) -> None:
        super().__init__()
        self.bert = bert
        layers = bert.config.num_hidden_layers
        self.top = layers if trainable_layers < 0 else min(trainable_layers, layers)
        self.split = layers - self.top
        self.pooling = pooling
        self.out_dim = bert.config.hidden_size
        for p in self.bert.parameters():
            p.requires_grad = False
        if self.top and lora_rank:
            self._add_lora(lora_rank, lora_alpha)
        elif self.top:
            for layer in self.bert.encoder.layer[self.split :]:
                layer.requires_grad_(True)
            if self.split == 0:
                self.bert.embeddings.requires_grad_(True)

    def train(self, mode: bool = True) -> TextEncoder:
        """Dropout in the encoder stays off: fine-tuning a few layers at a small
        learning rate does not need it, and on CPUs it costs a tenth of a step."""
        super().train(mode)
        self.bert.eval()
        return self

    @property
    def trainable(self) -> bool:
        return self.top > 0

    @property
    def caches_lower(self) -> bool:
        """Whether `lower` is frozen, so its output may be computed once per item."""
        return self.split > 0

    def _add_lora(self, rank: int, alpha: float) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=["query", "value"],
            layers_to_transform=list(range(self.split, self.split + self.top)),
            layers_pattern="layer",
        )
        inject_adapter_in_model(cfg, self.bert)
        for name, p in self.bert.named_parameters():
            p.requires_grad = "lora_" in name

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the base weights, leaving a plain BERT."""
        from peft.tuners.lora import LoraLayer

        for parent in list(self.bert.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.merge()
                    setattr(parent, child_name, child.get_base_layer())

    def _mask(self, attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        m = attention[:, None, None, :].to(dtype)
        return (1.0 - m) * torch.finfo(dtype).min

    def _run(self, h: torch.Tensor, attention: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        mask = self._mask(attention, h.dtype)
        for layer in self.bert.encoder.layer[lo:hi]:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def lower(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Embeddings plus the frozen layers; (n, T) ids -> (n, T, H)."""
        h = self.bert.embeddings(input_ids=input_ids)
        return self._run(h, attention, 0, self.split)

    def upper(self, x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Trained layers plus pooling; `x` is `lower`'s output, or ids when nothing is frozen."""
        h = self.bert.embeddings(input_ids=x) if self.split == 0 else x
        h = self._run(h, attention, self.split, self.split + self.top)
        if self.pooling == "cls":
            return h[:, 0]
        m = attention.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        x = self.lower(input_ids, attention) if self.split else input_ids
        return self.upper(x, attention)
