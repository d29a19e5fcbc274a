"""What each Ray Train worker runs: pure step functions and a thin loop around them.

`train_step` and `validate` take everything they touch as arguments, so the
benchmark's plain PyTorch loop calls the very same code without Ray Train.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ray_app.data import schema as S
from ray_app.data.negatives import NegativeSampler, user_hash
from ray_app.model.config import ModelConfig
from ray_app.model.encoder import TextEncoder, load_pretrained, tokenizer_source
from ray_app.model.history import time_resolution
from ray_app.model.reranker import Reranker
from ray_app.protocol import metrics as M
from ray_app.protocol.data import EvalData, SplitTargets, load_prepared
from ray_app.protocol.scorer import RerankerScorer
from ray_app.protocol.scoring import sampled_candidates, score_split
from ray_app.times import parse_duration
from ray_app.training.batches import (
    ExampleBatch,
    ItemText,
    redraw_since_last,
    step_candidates,
    to_examples,
)
from ray_app.training.checkpoint import (
    BEST,
    MODEL,
    Progress,
    load_optimizer,
    load_weights,
    read_state,
    state_dict,
    write_checkpoint,
)
from ray_app.training.config import TrainConfig

logger = logging.getLogger(__name__)

# Steps of each epoch left out of `samples_per_s_steady`: the first ones also pay
# for one-off work (Ray Data starting its read and shuffle tasks, processes
# spawning), which a benchmark of a few minutes would otherwise be dominated by.
STEADY_AFTER = 20
LOG_EVERY = 50  # steps between progress lines from rank 0
RETURNING = "_returning"  # select-metric suffix: valid users scored at drawn moments
VALID_PROBE = 128  # valid users timed before training to foresee a validation's cost


@dataclass
class TrainData:
    """What every worker loads once: item text, popularity, validation targets."""

    num_items: int
    num_event_types: int
    item_ids: list[np.ndarray]  # token ids per item_idx (row 0 = padding)
    pos_prob: torch.Tensor  # (N+1,) chance of an item to be a target
    neg_prob: torch.Tensor  # (N+1,) the prepare sampler's negative distribution
    known: torch.Tensor  # (N+1,) bool: has train events and is not held out
    hidden: np.ndarray | None  # (N+1,) bool: held out for cold start
    time_resolution_s: int  # the coarsest unit dividing every training timestamp
    valid: SplitTargets
    valid_cands: np.ndarray
    eval_data: EvalData


def cold_start_items(item_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic share of items (by a hash of their ids) held out of training.

    `item_ids` is indexed by item_idx, so row 0 is padding and never held out.
    """
    if fraction <= 0:
        return np.zeros(len(item_ids), dtype=bool)
    h = user_hash(np.asarray(item_ids).astype(str)) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    hidden = (h % np.uint64(1_000_000)) < np.uint64(int(fraction * 1_000_000))
    hidden[0] = False
    return hidden


def item_token_ids(data: EvalData, manifest: dict, encoder: str) -> list[np.ndarray]:
    """Token ids per item for `encoder`; re-tokenised only if prepare used another tokenizer."""
    text_cfg = manifest["config"]["text"]
    from ray_app.data.text import load_tokenizer, resolve_encoder

    ids = list(data.items["input_ids"])
    if resolve_encoder(text_cfg["tokenizer"]) == tokenizer_source(encoder):
        return [np.asarray(x, dtype=np.int64) for x in ids]
    logger.info("re-tokenising item text for encoder %s", encoder)
    tok = load_tokenizer(tokenizer_source(encoder))
    enc = tok(
        list(data.items["text"].fillna("")), truncation=True, max_length=text_cfg["max_length"]
    )
    out = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    out[0] = np.zeros(0, dtype=np.int64)
    return out


def load_train_data(cfg: TrainConfig) -> TrainData:
    data = load_prepared(cfg.prepared)
    manifest = data.manifest
    n = data.num_items
    hidden = cold_start_items(data.items["item_id"].to_numpy(), cfg.cold_start_fraction, cfg.seed)
    counts = data.train_counts.astype(np.float64)
    counts[hidden] = 0
    neg_cfg = manifest["config"]["negatives"]
    sampler = NegativeSampler.from_counts(
        data.train_counts, neg_cfg["sampler"], neg_cfg["popularity_alpha"], neg_cfg["seed"]
    )
    neg = np.diff(sampler.cdf, prepend=0.0)
    valid = data.splits["valid"]
    if cfg.valid_users is not None and cfg.valid_users < len(valid):
        pick = np.random.default_rng(0).choice(len(valid), cfg.valid_users, replace=False)
        valid = valid.subset(np.sort(pick))
    if cfg.select_metric.endswith(RETURNING):
        valid = returning_moments(valid, [parse_duration(d) for d in cfg.select_deltas])
    return TrainData(
        num_items=n,
        num_event_types=len(manifest["resolved"]["event_types"]) + 1,
        item_ids=item_token_ids(data, manifest, cfg.model.encoder),
        pos_prob=torch.from_numpy(counts / max(counts.sum(), 1.0)).float(),
        neg_prob=torch.from_numpy(neg / neg.sum()).float(),
        known=torch.from_numpy((counts > 0) & ~hidden),
        hidden=hidden if hidden.any() else None,
        time_resolution_s=time_resolution(data.train[S.TIMESTAMP].to_numpy()),
        valid=valid,
        valid_cands=sampled_candidates(data, "valid", cfg.valid_negatives, 0, valid),
        eval_data=data,
    )


def returning_moments(targets: SplitTargets, deltas: list[int], seed: int = 0) -> SplitTargets:
    """Each user scored at one moment drawn from its target's time and its last event + each
    of `deltas` (the same draw every epoch and run)."""
    pick = np.random.default_rng(seed).integers(0, len(deltas) + 1, len(targets))
    after = targets.last_event_times() + np.r_[0, deltas][pick]
    at = np.where((pick > 0) & targets.has_history, after, targets.target_times)
    return replace(targets, scored_at=at)


def build_model(cfg: ModelConfig, num_items: int, seed: int) -> tuple[Reranker, Any]:
    """A fresh re-ranker (pretrained encoder weights, random heads) and its tokenizer."""
    text, tokenizer = None, None
    if cfg.use_text:
        bert, tokenizer = load_pretrained(cfg.encoder, seed)
        text = TextEncoder(bert, cfg.trainable_layers, cfg.pooling, cfg.lora_rank, cfg.lora_alpha)
    torch.manual_seed(seed)
    return Reranker(cfg, num_items, text), tokenizer


def make_optimizer(model: Reranker, cfg: TrainConfig) -> torch.optim.AdamW:
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


def unwrap(model: torch.nn.Module) -> Reranker:
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
    cands = step_candidates(ex, data.pos_prob, data.neg_prob)
    cand_text = None
    if text is not None:
        cand_text = text.chunked_inputs(cands.items, device, cfg.text_chunks)
    with precision.autocast():
        _, loss = model(
            ex.hist.to(device),
            cands.items.to(device),
            cands.labels.to(device),
            cands.logq.to(device),
            cand_text,
            cfg.loss,
            cands.negatives.to(device),
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


def refresh_text(model: Reranker, text: ItemText | None, device: torch.device) -> None:
    if model.text is not None and text is not None:
        model.set_text_table(text.pooled(model.text, device))


@torch.no_grad()
def validate(
    model: Reranker,
    targets: SplitTargets,
    cands: np.ndarray,
    k: int,
) -> dict[str, float]:
    """Sums (not means) of NDCG@k / HR@k under both protocols, so ranks can add them."""
    model.eval()
    scorer = RerankerScorer(model, model.item_table())
    res = score_split(scorer, targets, cands, k, lists=False)
    model.train()
    suffix = RETURNING if targets.scored_at is not None else ""
    return {
        "users": float(len(targets)),
        f"ndcg_full{suffix}": float(M.ndcg(res["full"], k).sum()),
        f"ndcg_sampled{suffix}": float(M.ndcg(res["sampled"], k).sum()),
        f"hr_sampled{suffix}": float(M.hit_rate(res["sampled"], k).sum()),
    }


def probe_validation_s(model: Reranker, targets: SplitTargets, cands: np.ndarray, k: int) -> float:
    """Seconds a whole validation should take, from timing it on a few users."""
    n = min(len(targets), VALID_PROBE)
    if n == 0:
        return 0.0
    t0 = time.time()
    validate(model, targets.subset(slice(0, n)), cands[:n], k)
    return (time.time() - t0) * len(targets) / n


def _all_sum(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def _any(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: resume, train epochs, validate, checkpoint from rank 0."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.torch_threads or cfg.cpus_per_worker)
    precision = Precision(cfg.precision, device)
    data = load_train_data(cfg)
    mcfg = cfg.model.model_copy(
        update={
            "num_event_types": data.num_event_types,
            "time_resolution_s": data.time_resolution_s,
        }
    )
    model, _ = build_model(mcfg, data.num_items, cfg.seed)
    model.items.known.copy_(data.known)
    progress, best = Progress(), None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_weights(Path(d) / MODEL))
            best = load_weights(Path(d) / BEST)
            progress, _ = read_state(Path(d))
        logger.info("rank %d resumed at epoch %d step %d", rank, progress.epoch, progress.step)
    model.to(device)
    text = ItemText(data.item_ids) if model.text is not None else None
    if text is not None and model.text.trainable and model.text.caches_lower:
        text.build_cache(model.text, device)
    refresh_text(model, text, device)
    ddp = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    opt = make_optimizer(model, cfg)
    total = cfg.epochs * config["steps_per_epoch"]
    warmup = int(cfg.warmup_fraction * total)
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_optimizer(opt, Path(d))
    if best is None:
        best = state_dict(model)
    valid = data.valid.subset(slice(rank, None, world))
    valid_cands = data.valid_cands[rank::world]
    shard = ray.train.get_dataset_shard("train")
    trains_text = model.text is not None and model.text.trainable
    fail_marker = Path(cfg.storage_path) / f".{cfg.run_name}.failed-once"
    resolved = cfg.model_copy(update={"model": mcfg}).model_dump(mode="json")

    def report(metrics: dict[str, Any]) -> None:
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), state_dict(model), best, opt, progress, resolved)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    done_s = progress.history[-1]["train_s"] if progress.history else 0.0
    start = time.time() - done_s
    stop = ""
    budget = cfg.max_minutes * 60 if cfg.max_minutes else float("inf")
    # The budget holds validation too: an epoch's steps stop early enough for it to fit.
    valid_s = probe_validation_s(model, valid, valid_cands, cfg.k) if cfg.max_minutes else 0.0
    if progress.history:
        valid_s = progress.history[-1].get("valid_s", valid_s)
    since_lo, since_hi = 60, parse_duration(cfg.returning_max)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + progress.step)
    for _ in range(progress.epoch, cfg.epochs):
        t0, n, losses = time.time(), 0, []
        t_steady, n_steady = None, 0
        tuning = trains_text and progress.epoch >= cfg.encoder_frozen_epochs
        batches = shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="pyarrow",
            drop_last=True,
            prefetch_batches=cfg.prefetch_batches,
        )
        for i, batch in enumerate(batches):
            if i < progress.epoch_step:
                continue
            nightly = None
            if cfg.nightly_fraction > 0:
                nightly = torch.rand(batch.num_rows, generator=gen) < cfg.nightly_fraction
            ex = to_examples(
                batch,
                mcfg.max_history,
                cfg.negatives_per_example,
                data.hidden,
                None if nightly is None else nightly.numpy(),
            )
            if cfg.returning_fraction > 0:
                ex.hist = redraw_since_last(
                    ex.hist, cfg.returning_fraction, since_lo, since_hi, gen, nightly
                )
            since = progress.step - cfg.encoder_frozen_epochs * config["steps_per_epoch"]
            set_lr(
                opt,
                lr_factor(progress.step, total, warmup, (time.time() - start) / budget),
                min(1.0, (since + 1) / max(1, warmup)),
            )
            live = text if tuning else None
            losses.append(train_step(ddp, opt, ex, live, data, cfg, device, precision))
            n += len(ex.targets)
            progress.step += 1
            progress.epoch_step += 1
            if t_steady is not None:
                n_steady += len(ex.targets)
            elif progress.epoch_step == STEADY_AFTER:
                t_steady = time.time()
            if tuning and progress.step % cfg.refresh_text_every == 0:
                refresh_text(model, text, device)
            if cfg.fail_at_step == progress.step and rank == 0 and not fail_marker.exists():
                fail_marker.parent.mkdir(parents=True, exist_ok=True)
                fail_marker.write_text("injected failure\n")
                raise RuntimeError(f"injected failure at step {progress.step} (fail_at_step)")
            if rank == 0 and progress.epoch_step % LOG_EVERY == 0:
                logger.info(
                    "epoch %d step %d/%d loss %.4f %.1f samples/s",
                    progress.epoch + 1,
                    progress.epoch_step,
                    config["steps_per_epoch"],
                    float(np.mean(losses[-LOG_EVERY:])),
                    n * world / max(time.time() - t0, 1e-9),
                )
            if cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0:
                report({"epoch": progress.epoch, "step": progress.step, "loss": losses[-1]})
            over = time.time() - start + valid_s > budget
            if _any(over, world):
                stop = (
                    f"time budget of {cfg.max_minutes} min reached "
                    f"({valid_s:.0f} s kept for validation)"
                )
                break
        train_elapsed = time.time() - t0
        steady = n_steady * world / (time.time() - t_steady) if n_steady else float("nan")
        if tuning:
            refresh_text(model, text, device)
        v0 = time.time()
        sums = _all_sum(validate(model, valid, valid_cands, cfg.k), world)
        valid_s = time.time() - v0
        users = max(sums.pop("users"), 1.0)
        scores = {f"valid_{key}@{cfg.k}": v / users for key, v in sums.items()}
        metric = scores[f"valid_{cfg.select_metric}@{cfg.k}"]
        elapsed = time.time() - t0
        progress.epoch += 1
        progress.epoch_step = 0
        if metric > progress.best:
            progress.best, progress.best_epoch, progress.bad_epochs = metric, progress.epoch, 0
            best = state_dict(model)
        else:
            progress.bad_epochs += 1
        row = {
            "epoch": progress.epoch,
            "step": progress.step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            **scores,
            "samples_per_s": round(n * world / max(train_elapsed, 1e-9), 1),
            "samples_per_s_steady": round(steady, 1),
            "epoch_s": round(elapsed, 1),
            "valid_s": round(valid_s, 1),
            "train_s": round(time.time() - start, 1),
            "best_epoch": progress.best_epoch,
        }
        if progress.bad_epochs >= cfg.patience:
            stop = f"no better valid {cfg.select_metric}@{cfg.k} for {cfg.patience} epochs"
        progress.stopped = stop
        progress.history.append(row)
        report(row)
        if rank == 0:
            logger.info("epoch %s", row)
        if stop:
            break
