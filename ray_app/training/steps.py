"""The pure pieces of training: model and optimizer, the learning-rate schedule, one
step, validation. Each takes everything it touches as arguments, so the Ray Train
loop and the benchmark's plain PyTorch loop call the very same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch

from ray_app.model.config import ModelConfig
from ray_app.model.encoder import TextEncoder, load_pretrained
from ray_app.model.net import RerankerNet
from ray_app.protocol import metrics
from ray_app.protocol.data import SplitTargets
from ray_app.protocol.scorer import NetScorer
from ray_app.protocol.scoring import score_split
from ray_app.training.batches import (
    ExampleBatch,
    ItemText,
    new_at_moment,
    not_yet_seen,
    step_candidates,
)
from ray_app.training.config import TrainConfig
from ray_app.training.inputs import RETURNING, TrainData

VALID_PROBE = 128  # valid users timed before training to foresee a validation's cost


def build_model(cfg: ModelConfig, num_items: int, seed: int) -> tuple[RerankerNet, Any]:
    """A fresh re-ranker (pretrained encoder weights, random heads) and its tokenizer."""
    text, tokenizer = None, None
    if cfg.use_text:
        bert, tokenizer = load_pretrained(cfg.encoder, seed)
        text = TextEncoder(bert, cfg.trainable_layers, cfg.pooling, cfg.lora_rank, cfg.lora_alpha)
    torch.manual_seed(seed)
    return RerankerNet(cfg, num_items, text), tokenizer


def make_optimizer(model: RerankerNet, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the encoder gets its own (small) learning rate, no decay on biases/norms."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.dim() < 2 or "norm" in name.lower() else cfg.weight_decay
        groups.setdefault((name.startswith("text."), decay), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": ps,
                "lr": cfg.encoder_lr if enc else cfg.lr,
                "base_lr": cfg.encoder_lr if enc else cfg.lr,
                "encoder": enc,
                "weight_decay": wd,
            }
            for (enc, wd), ps in groups.items()
        ]
    )


def lr_factor(step: int, total: int, warmup: int, done: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak.

    `done` (0..1) is progress by another clock, the time budget: the decay
    follows whichever is further along, so a run cut by `max_minutes` still
    ends at a low learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(done, (step - warmup) / max(1, total - warmup)))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float, encoder_factor: float = 1.0) -> None:
    """Scale every group's base rate; encoder groups also by their own warm-up."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor * (encoder_factor if g.get("encoder") else 1.0)


class Precision:
    """bf16 (or fp16 with loss scaling) autocast on GPUs; fp32 on CPUs."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.dtype = None
        if device.type == "cuda" and name != "fp32":
            bf16_ok = torch.cuda.is_bf16_supported()
            if name == "bf16" or (name == "auto" and bf16_ok):
                self.dtype = torch.bfloat16
            else:
                self.dtype = torch.float16
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def unwrap(model: torch.nn.Module) -> RerankerNet:
    return model.module if hasattr(model, "module") else model


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ex: ExampleBatch,
    text: ItemText | None,
    data: TrainData,
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
) -> float:
    """One optimizer step on a batch; returns the loss. `text` (item text inputs)
    is given while the encoder is being fine-tuned, else the text table serves."""
    core = unwrap(model)
    shared = step_candidates(ex, data.pos_prob, data.neg_prob)
    new = new_at_moment(shared.items, ex.times, data.first_seen, core.cfg.new_item_days)
    later = not_yet_seen(shared.items, ex.times, data.first_seen)
    cand_text = None
    if text is not None:
        cand_text = text.chunked_inputs(shared.items, device, cfg.text_chunks)
    with precision.autocast():
        _, loss = model(
            ex.hist.to(device),
            shared.items.to(device),
            shared.labels.to(device),
            shared.logq.to(device),
            cand_text,
            cfg.loss,
            shared.negatives.to(device),
            None if new is None else new.to(device),
            None if later is None else later.to(device),
        )
    opt.zero_grad(set_to_none=True)
    if precision.scaler is not None:
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
        precision.scaler.step(opt)
        precision.scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
        opt.step()
    return float(loss.detach())


def refresh_text(model: RerankerNet, text: ItemText | None, device: torch.device) -> None:
    if model.text is not None and text is not None:
        model.set_text_table(text.pooled(model.text, device))


def prepare_text(
    model: RerankerNet, item_ids: list[np.ndarray], device: torch.device
) -> ItemText | None:
    """The item text inputs (None for a model without text), the frozen lower encoder
    layers' output cached when only the top ones train, and the model's text table
    filled from them."""
    text = ItemText(item_ids) if model.text is not None else None
    if text is not None and model.text.trainable and model.text.caches_lower:
        text.build_cache(model.text, device)
    refresh_text(model, text, device)
    return text


@torch.no_grad()
def validate(
    model: RerankerNet,
    targets: SplitTargets,
    candidates: np.ndarray,
    k: int,
) -> dict[str, float]:
    """Sums (not means) of NDCG@k / HR@k under both protocols, so ranks can add them."""
    model.eval()
    scorer = NetScorer(model, model.item_table())
    res = score_split(scorer, targets, candidates, k, lists=False)
    model.train()
    suffix = RETURNING if targets.scored_at is not None else ""
    return {
        "users": float(len(targets)),
        f"ndcg_full{suffix}": float(metrics.ndcg(res["full"], k).sum()),
        f"ndcg_sampled{suffix}": float(metrics.ndcg(res["sampled"], k).sum()),
        f"hr_sampled{suffix}": float(metrics.hit_rate(res["sampled"], k).sum()),
    }


def probe_validation_s(
    model: RerankerNet, targets: SplitTargets, candidates: np.ndarray, k: int
) -> float:
    """Seconds a whole validation should take, from timing it on a few users."""
    n = min(len(targets), VALID_PROBE)
    if n == 0:
        return 0.0
    t0 = time.time()
    validate(model, targets.subset(slice(0, n)), candidates[:n], k)
    return (time.time() - t0) * len(targets) / n
