"""The text tower in ONNX Runtime gives the vectors PyTorch gives, float32 and int8."""

from __future__ import annotations

import numpy as np
import torch

from ray_app.model.config import ModelConfig
from ray_app.model.encoder import TextEncoder, load_pretrained
from ray_app.model.net import ItemTower
from ray_app.model.onnx_text import OnnxTextTower, TextTower, export, quantize_int8


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_vectors_match_pytorch_for_any_batch_and_length(tmp_path):
    bert, tokenizer = load_pretrained("tiny", seed=1)
    torch.manual_seed(1)
    text = TextEncoder(bert, trainable_layers=0)
    items = ItemTower(ModelConfig(use_ids=False, dim=16), 0, text.out_dim)
    tower = TextTower(text, items).eval()
    fp32 = export(tower, tmp_path / "tower.onnx", max_length=32)
    int8 = quantize_int8(fp32, tmp_path / "tower.int8.onnx")
    # Batch sizes and lengths other than the export's example: the axes are dynamic.
    for texts in (["a red bicycle"], [f"item {i} " + "word " * i for i in range(1, 20)]):
        tok = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="np")
        with torch.no_grad():
            want = tower(
                torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])
            ).numpy()
        got = OnnxTextTower(fp32)(tok["input_ids"], tok["attention_mask"])
        assert got.shape == want.shape
        assert _cos(got, want).min() > 0.9999
        quantized = OnnxTextTower(int8)(tok["input_ids"], tok["attention_mask"])
        assert _cos(quantized, want).min() > 0.99
