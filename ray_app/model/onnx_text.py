"""The text tower (encoder, pooling and projection) as an ONNX graph for CPUs.

Encoding a new item's text is the one model call whose cost grows with the
catalogue's churn, and PyTorch's eager BERT on a CPU thread spends much of its time
outside the matrix products. ONNX Runtime runs the same graph fused, and dynamic
int8 quantisation of its linear layers cuts the remaining time again; PyTorch stays
the reference, the fallback and the GPU path (`jobs/bench_encode.py` has the figures
and the parity of the vectors).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

Backend = Literal["torch", "onnx", "onnx-int8"]
INPUTS = ("input_ids", "attention_mask")
FILES: dict[str, str] = {"onnx": "text_tower.onnx", "onnx-int8": "text_tower.int8.onnx"}
"""The artifact's file of each ONNX backend."""


class TextTower(nn.Module):
    """(input_ids, attention_mask) -> item vectors of items known by their text alone:
    the encoder, its pooling and the item tower's projection (`RerankerNet.text` and
    `RerankerNet.items.from_text`)."""

    def __init__(self, text: nn.Module, items: nn.Module) -> None:
        super().__init__()
        self.text, self.items = text, items

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.items.from_text(self.text(input_ids, attention_mask))


def export(tower: TextTower, path: str | os.PathLike[str], max_length: int) -> Path:
    """Write the tower as ONNX (batch and length dynamic) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, min(8, max_length), dtype=torch.long)
    n, t = torch.export.Dim("n"), torch.export.Dim("t", max=max(max_length, 8))
    with torch.no_grad():
        torch.onnx.export(
            tower.eval(),
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=list(INPUTS),
            output_names=["vectors"],
            dynamic_shapes=({0: n, 1: t}, {0: n, 1: t}),
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    return path


def float_matmuls(graph) -> list[str]:
    """The matrix products int8 would hurt most, kept in float32: every one fed by a
    GELU (the feed-forward outputs, whose inputs have the heavy-tailed activations
    that one int8 scale per batch flattens) and every weight product of the first
    encoder layer (its errors pass through all the layers above). Found by measuring
    each choice on ml-latest-small's titles: with them all quantised the worst item's
    cosine to PyTorch fell to 0.98."""
    produced_by = {out: node for node in graph.node for out in node.output}
    weights = {init.name for init in graph.initializer}
    keep: list[str] = []
    first_layer = True
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        src = produced_by.get(node.input[0])
        after_gelu = src is not None and src.op_type == "Gelu"
        if after_gelu or (first_layer and node.input[1] in weights):
            keep.append(node.name)
        if after_gelu:
            first_layer = False
    return keep


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Dynamic int8 quantisation of the graph's matrix products (weights int8 with a scale
    per output channel, activations quantised per batch at run time), no calibration
    data needed, but for the products `float_matmuls` keeps in float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = float_matmuls(onnx.load(str(src)).graph)
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep
    )
    return Path(dst)


def session(graph: str | os.PathLike[str] | bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session of `graph` (a file or its bytes) on `threads`
    intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OnnxTextTower:
    """The exported tower in ONNX Runtime, on `threads` intra-op threads."""

    def __init__(self, path: str | os.PathLike[str] | bytes, threads: int = 1) -> None:
        self.session = session(path, threads)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        return self.session.run(None, feed)[0]


def export_all(
    tower: TextTower, folder: str | os.PathLike[str], max_length: int
) -> dict[str, Path]:
    """Both ONNX backends' files (`FILES`) written into `folder`."""
    folder = Path(folder)
    fp32 = export(tower, folder / FILES["onnx"], max_length)
    return {"onnx": fp32, "onnx-int8": quantize_int8(fp32, folder / FILES["onnx-int8"])}


def build(
    tower: TextTower,
    backend: Backend,
    folder: str | os.PathLike[str],
    max_length: int,
    threads: int,
) -> OnnxTextTower:
    """The ONNX tower of `backend` (exported, and quantised for int8, into `folder`)."""
    folder = Path(folder)
    fp32 = export(tower, folder / FILES["onnx"], max_length)
    if backend == "onnx-int8":
        return OnnxTextTower(quantize_int8(fp32, folder / FILES["onnx-int8"]), threads)
    return OnnxTextTower(fp32, threads)
