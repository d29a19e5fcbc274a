"""The model artifact: everything serving, evaluation and the nightly job load.

Layout (all plain files, nothing pickled):

- `config.json`: the model config, catalogue size, version id, encoder name,
  event types (position + 1 = the event_idx the model was trained with),
  the token budget item text was truncated to, how item text was rendered
  (`text`: prepare's template), which backend computed the item table
  (`item_vectors`) and which ONNX text towers the folder holds;
- `model.safetensors`: weights (LoRA merged into the encoder);
- `encoder/`: the encoder's transformers config and tokenizer files;
- `item_embeddings.safetensors`: `item_vectors` (items x dim, the item
  tower's output, row = item_idx) and `text` (pooled text per item);
- `text_tower.onnx`, `text_tower.int8.onnx`: the text tower (encoder, pooling,
  projection) for ONNX Runtime, when the model reads text (`onnx_text.FILES`);
- `scorer.onnx`: the user tower and scorer for ONNX Runtime (`onnx_scorer`),
  named by `scorer_graph` in config.json;
- `items.parquet`: item_idx, item_id, title, text, known (seen in training);
- `metrics.json`: training history and the chosen epoch;
- `manifest.json`, `_SUCCESS`: written by the staged, atomic publication.

`load_artifact` is the one loader the other stages use.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ray_app.data import schema
from ray_app.model.config import ModelConfig
from ray_app.model.encoder import TextEncoder, from_saved
from ray_app.model.net import RerankerNet
from ray_app.storage import local_copy, published, require_complete

logger = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ENCODER = "encoder"
EMBEDDINGS = "item_embeddings.safetensors"
ITEMS = "items.parquet"
METRICS = "metrics.json"
FORMAT_VERSION = 1


@dataclass
class Artifact:
    model: RerankerNet
    config: dict[str, Any]
    item_vectors: torch.Tensor  # (items + 1, dim), row 0 = padding
    items: pd.DataFrame  # by item_idx (row 0 = padding)
    item_index: dict[str, int]  # item_id -> item_idx
    tokenizer: Any
    metrics: dict[str, Any]
    onnx: dict[str, bytes] = field(default_factory=dict)  # backend -> the graph's bytes
    scorer_onnx: bytes | None = None  # the user tower and scorer (`onnx_scorer`)

    @property
    def version(self) -> str:
        return self.config["version"]

    @property
    def event_index(self) -> dict[str, int]:
        """Event type name -> event_idx, as `prepare` numbered them for training."""
        return {e: i + 1 for i, e in enumerate(self.config.get("event_types", []))}


def save_artifact(
    folder: Path,
    model: RerankerNet,
    tokenizer: Any,
    items: pd.DataFrame,
    metrics: dict[str, Any],
    version: str,
    encoder_name: str,
    held_out: np.ndarray | None = None,
    event_types: list[str] | None = None,
    text_max_length: int = 32,
    text: dict[str, Any] | None = None,
    export_onnx: bool = False,
) -> None:
    """Write an artifact into a local folder (the caller publishes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    vectors = model.item_table().float().cpu().contiguous()
    tensors = {"item_vectors": vectors}
    if model.text is not None:
        tensors["text"] = model.text_table.float().cpu().contiguous()
        model.text.bert.config.save_pretrained(folder / ENCODER)
        tokenizer.save_pretrained(folder / ENCODER)
    save_file(tensors, str(folder / EMBEDDINGS))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS))
    config = {
        "format": FORMAT_VERSION,
        "version": version,
        "encoder": encoder_name,
        "event_types": list(event_types or []),
        "text_max_length": text_max_length,
        "text": text or {},
        "item_vectors": "torch",
        "text_towers": {},
        "num_items": model.num_items,
        "model": model.cfg.model_dump(mode="json"),
    }
    if export_onnx and model.text is not None:
        from ray_app.model.onnx_text import TextTower, export_all

        files = export_all(TextTower(model.text, model.items), folder, text_max_length)
        config["text_towers"] = {backend: path.name for backend, path in files.items()}
    if export_onnx:
        from ray_app.model.onnx_scorer import FILE, export

        config["scorer_graph"] = export(model, folder / FILE).name
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    known = model.items.known.cpu().numpy()
    out = items[[schema.ITEM_IDX, schema.ITEM_ID, schema.TITLE, schema.TEXT]].copy()
    out["known"] = known[out[schema.ITEM_IDX].to_numpy()]
    # Items removed from training on purpose (cold-start measurement).
    out["held_out"] = False if held_out is None else held_out[out[schema.ITEM_IDX].to_numpy()]
    out.to_parquet(folder / ITEMS, index=False)
    (folder / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def _from_prepared(local: Path) -> dict[str, Any]:
    """Event types and text budget of artifacts written before config.json had them,
    read from the prepare output their manifest names."""
    source = json.loads((local / "manifest.json").read_text())["prepared"]
    logger.warning("artifact predates event_types in config.json: read from %s", source)
    return from_prepare_manifest(require_complete(source))


def from_prepare_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What an artifact takes from the prepare run it was trained on (the
    `event_types` and `text_max_length` arguments of `save_artifact`)."""
    text = manifest["config"]["text"]
    return {
        "event_types": manifest["resolved"]["event_types"],
        "text_max_length": text["max_length"],
        "text": {k: text[k] for k in ("template", "separator", "list_delimiter") if k in text},
    }


def load_artifact(path: str, device: str | torch.device = "cpu") -> Artifact:
    """Rebuild the model from an artifact (local or URI), ready to `predict`."""
    root, _ = published(path)
    with tempfile.TemporaryDirectory(prefix="rerank-artifact-") as tmp:
        return _load_local(path, Path(local_copy(root, tmp)), device)


def _load_local(path: str, local: Path, device: str | torch.device) -> Artifact:
    """Everything is read into memory here, so a remote artifact's temporary copy
    can go as soon as this returns."""
    config = json.loads((local / CONFIG).read_text())
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: artifact format {config.get('format')} is not supported")
    if "event_types" not in config:
        config.update(_from_prepared(local))
    # Written before `time_input` existed: every gap was measured to the moment of scoring.
    config["model"].setdefault("time_input", "to_scoring")
    mcfg = ModelConfig.model_validate(config["model"])
    text, tokenizer = None, None
    if mcfg.use_text:
        bert, tokenizer = from_saved(local / ENCODER)
        text = TextEncoder(bert, 0, mcfg.pooling)
    model = RerankerNet(mcfg, config["num_items"], text)
    weights = load_file(str(local / WEIGHTS))
    if model.items.unknown is not None and "items.unknown" not in weights:
        # Written before the new-item vector: unknown items had no ID part at all.
        weights["items.unknown"] = torch.zeros_like(model.items.unknown)
    model.load_state_dict(weights)
    tables = load_file(str(local / EMBEDDINGS))
    if text is not None:
        model.set_text_table(tables["text"])
    model.to(device).eval()
    items = pd.read_parquet(local / ITEMS).sort_values(schema.ITEM_IDX).reset_index(drop=True)
    pad = pd.DataFrame(
        {schema.ITEM_IDX: [0], schema.ITEM_ID: [""], schema.TITLE: [""], schema.TEXT: [""]}
    )
    items = pd.concat([pad, items], ignore_index=True)
    metrics = json.loads((local / METRICS).read_text())
    onnx = {
        backend: (local / name).read_bytes()
        for backend, name in config.get("text_towers", {}).items()
        if (local / name).exists()
    }
    graph = config.get("scorer_graph")
    return Artifact(
        model=model,
        config=config,
        item_vectors=tables["item_vectors"].to(device),
        items=items,
        item_index=schema.item_index(items),
        tokenizer=tokenizer,
        metrics=metrics,
        onnx=onnx,
        scorer_onnx=(local / graph).read_bytes() if graph and (local / graph).exists() else None,
    )
