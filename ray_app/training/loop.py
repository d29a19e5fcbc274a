"""What each Ray Train worker runs: set up once, then `run_epoch` and `end_epoch` per epoch.

The step functions are in `steps.py`, the meters (throughput, time budget, early
stopping) in `meters.py`; this module wires them to Ray Train: the dataset
shard, DDP, checkpoints reported from rank 0, and resuming from the last one.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ray_app.model.config import ModelConfig
from ray_app.model.net import RerankerNet
from ray_app.protocol.data import SplitTargets
from ray_app.times import parse_duration
from ray_app.training.batches import ItemText, redraw_since_last, to_examples
from ray_app.training.checkpoint import (
    Progress,
    Saved,
    read_checkpoint,
    state_dict,
    write_checkpoint,
)
from ray_app.training.config import TrainConfig
from ray_app.training.inputs import TrainData, load_train_data
from ray_app.training.meters import EarlyStopping, Throughput, TimeBudget
from ray_app.training.steps import (
    Precision,
    build_model,
    lr_factor,
    make_optimizer,
    prepare_text,
    probe_validation_s,
    refresh_text,
    set_lr,
    train_step,
    validate,
)

logger = logging.getLogger(__name__)

LOG_EVERY = 50  # steps between progress lines from rank 0


class StepCallback(Protocol):
    """Called by every worker after each optimizer step (`run_train(cfg, callbacks=...)`),
    e.g. to watch a run or, in the tests, to make a worker fail at a given step."""

    def on_step(self, step: int, rank: int) -> None: ...


@dataclass
class Worker:
    """Everything one Ray Train worker sets up once, before its first epoch."""

    cfg: TrainConfig
    mcfg: ModelConfig  # the model config with what the data decides filled in
    rank: int
    world: int
    device: torch.device
    precision: Precision
    data: TrainData
    model: RerankerNet
    ddp: torch.nn.Module
    opt: torch.optim.Optimizer
    text: ItemText | None
    valid: SplitTargets  # this worker's share of the validation users
    valid_cands: np.ndarray
    shard: Any
    steps_per_epoch: int
    callbacks: Sequence[StepCallback] = ()
    resolved: dict[str, Any] = field(default_factory=dict)  # what the checkpoint records

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def warmup(self) -> int:
        return int(self.cfg.warmup_fraction * self.total_steps)


def _resume() -> Saved | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return read_checkpoint(Path(d))


def setup_worker(config: dict[str, Any]) -> tuple[Worker, EarlyStopping]:
    """The worker's model, optimizer, data and validation share, resumed from the last
    checkpoint when Ray Train hands one over."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.torch_threads or cfg.cpus_per_worker)
    data = load_train_data(cfg)
    mcfg = cfg.model.model_copy(
        update={
            "num_event_types": data.num_event_types,
            "time_resolution_s": data.time_resolution_s,
        }
    )
    model, _ = build_model(mcfg, data.num_items, cfg.seed)
    model.items.known.copy_(data.known)
    saved = _resume()
    progress, best = Progress(), None
    if saved is not None:
        model.load_state_dict(saved.weights)
        progress, best = saved.progress, saved.best
        logger.info("rank %d resumed at epoch %d step %d", rank, progress.epoch, progress.step)
    model.to(device)
    text = prepare_text(model, data.item_ids, device)
    ddp = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"broadcast_buffers": False}
    )
    opt = make_optimizer(model, cfg)
    if saved is not None:
        opt.load_state_dict(saved.optimizer)
    worker = Worker(
        cfg=cfg,
        mcfg=mcfg,
        rank=rank,
        world=world,
        device=device,
        precision=Precision(cfg.precision, device),
        data=data,
        model=model,
        ddp=ddp,
        opt=opt,
        text=text,
        valid=data.valid.subset(slice(rank, None, world)),
        valid_cands=data.valid_cands[rank::world],
        shard=ray.train.get_dataset_shard("train"),
        steps_per_epoch=config["steps_per_epoch"],
        callbacks=config.get("callbacks", ()),
        resolved=cfg.model_copy(update={"model": mcfg}).model_dump(mode="json"),
    )
    if best is None:
        best = state_dict(model)
    return worker, EarlyStopping(cfg.patience, progress, best)


def report(w: Worker, stopping: EarlyStopping, metrics: dict[str, Any]) -> None:
    """Report `metrics` to Ray Train, with a checkpoint from rank 0."""
    import ray.train

    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(
            Path(tmp), state_dict(w.model), stopping.best, w.opt, stopping.progress, w.resolved
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _any(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _all_sum(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


@dataclass
class Epoch:
    """What `run_epoch` hands to `end_epoch`."""

    losses: list[float]
    speed: Throughput
    tuning: bool  # the encoder's trainable layers were updated
    stop: str = ""  # why training ends after this epoch ("" = it goes on)


def run_epoch(
    w: Worker, stopping: EarlyStopping, budget: TimeBudget, gen: torch.Generator
) -> Epoch:
    """One pass over the worker's shard (from `progress.epoch_step` when resumed mid-epoch)."""
    cfg, progress = w.cfg, stopping.progress
    trains_text = w.model.text is not None and w.model.text.trainable
    tuning = trains_text and progress.epoch >= cfg.encoder_frozen_epochs
    epoch = Epoch([], Throughput(w.world), tuning)
    since_lo, since_hi = 60, parse_duration(cfg.returning_max)
    batches = w.shard.iter_batches(
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
            w.mcfg.max_history,
            cfg.negatives_per_example,
            w.data.hidden,
            None if nightly is None else nightly.numpy(),
        )
        if cfg.returning_fraction > 0:
            ex.hist = redraw_since_last(
                ex.hist, cfg.returning_fraction, since_lo, since_hi, gen, nightly
            )
        since = progress.step - cfg.encoder_frozen_epochs * w.steps_per_epoch
        set_lr(
            w.opt,
            lr_factor(progress.step, w.total_steps, w.warmup, budget.done()),
            min(1.0, (since + 1) / max(1, w.warmup)),
        )
        live = w.text if epoch.tuning else None
        loss = train_step(w.ddp, w.opt, ex, live, w.data, cfg, w.device, w.precision)
        epoch.losses.append(loss)
        progress.step += 1
        progress.epoch_step += 1
        epoch.speed.add(len(ex.targets), progress.epoch_step)
        if epoch.tuning and progress.step % cfg.refresh_text_every == 0:
            refresh_text(w.model, w.text, w.device)
        for callback in w.callbacks:
            callback.on_step(progress.step, w.rank)
        if w.rank == 0 and progress.epoch_step % LOG_EVERY == 0:
            logger.info(
                "epoch %d step %d/%d loss %.4f %.1f samples/s",
                progress.epoch + 1,
                progress.epoch_step,
                w.steps_per_epoch,
                float(np.mean(epoch.losses[-LOG_EVERY:])),
                epoch.speed.samples_per_s(),
            )
        if cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0:
            report(w, stopping, {"epoch": progress.epoch, "step": progress.step, "loss": loss})
        if _any(budget.over(), w.world):
            epoch.stop = (
                f"time budget of {cfg.max_minutes} min reached "
                f"({budget.valid_s:.0f} s kept for validation)"
            )
            break
    return epoch


def end_epoch(w: Worker, stopping: EarlyStopping, budget: TimeBudget, epoch: Epoch) -> str:
    """Validate, keep the best weights, record and report the epoch; returns why training
    stops now ("" = it goes on)."""
    cfg, progress = w.cfg, stopping.progress
    train_end = time.time()
    steady = epoch.speed.steady_per_s()
    if epoch.tuning:
        refresh_text(w.model, w.text, w.device)
    v0 = time.time()
    sums = _all_sum(validate(w.model, w.valid, w.valid_cands, cfg.k), w.world)
    budget.valid_s = time.time() - v0
    users = max(sums.pop("users"), 1.0)
    scores = {f"valid_{key}@{cfg.k}": v / users for key, v in sums.items()}
    progress.epoch += 1
    progress.epoch_step = 0
    stop = epoch.stop
    if stopping.update(scores[f"valid_{cfg.select_metric}@{cfg.k}"], w.model):
        stop = f"no better valid {cfg.select_metric}@{cfg.k} for {cfg.patience} epochs"
    row = {
        "epoch": progress.epoch,
        "step": progress.step,
        "loss": float(np.mean(epoch.losses)) if epoch.losses else float("nan"),
        **scores,
        "samples_per_s": round(epoch.speed.samples_per_s(until=train_end), 1),
        "samples_per_s_steady": round(steady, 1),
        "epoch_s": round(time.time() - epoch.speed.t0, 1),
        "valid_s": round(budget.valid_s, 1),
        "train_s": round(budget.elapsed(), 1),
        "best_epoch": progress.best_epoch,
    }
    progress.stopped = stop
    progress.history.append(row)
    report(w, stopping, row)
    if w.rank == 0:
        logger.info("epoch %s", row)
    return stop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: set up (or resume), then train and validate epoch by epoch
    until the epochs, the patience or the time budget run out."""
    w, stopping = setup_worker(config)
    cfg, progress = w.cfg, stopping.progress
    done_s = progress.history[-1]["train_s"] if progress.history else 0.0
    budget = TimeBudget(cfg.max_minutes, done_s, valid_s=0.0)
    if cfg.max_minutes:  # the budget keeps room for validation, so foresee what it costs
        budget.valid_s = probe_validation_s(w.model, w.valid, w.valid_cands, cfg.k)
    if progress.history:
        budget.valid_s = progress.history[-1].get("valid_s", budget.valid_s)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + w.rank + progress.step)
    for _ in range(progress.epoch, cfg.epochs):
        if end_epoch(w, stopping, budget, run_epoch(w, stopping, budget, gen)):
            break
