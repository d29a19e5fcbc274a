"""The small pieces of state a training loop keeps besides the model: how fast it goes,
how much of its time budget is left, and whether validation still improves."""

from __future__ import annotations

import time

import torch

from ray_app.training.checkpoint import Progress, state_dict

# Steps of each epoch left out of `samples_per_s_steady`: the first ones also pay
# for one-off work (Ray Data starting its read and shuffle tasks, processes
# spawning), which a benchmark of a few minutes would otherwise be dominated by.
STEADY_AFTER = 20


class Throughput:
    """Samples per second of one epoch over all workers: the whole epoch, and its steady
    state (after its first STEADY_AFTER steps)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.t0 = time.time()
        self.n = 0
        self.t_steady: float | None = None
        self.n_steady = 0

    def add(self, samples: int, epoch_step: int) -> None:
        """Count a finished step (`epoch_step`: its number within the epoch, from 1)."""
        self.n += samples
        if self.t_steady is not None:
            self.n_steady += samples
        elif epoch_step == STEADY_AFTER:
            self.t_steady = time.time()

    def samples_per_s(self, until: float | None = None) -> float:
        elapsed = (until or time.time()) - self.t0
        return self.n * self.world / max(elapsed, 1e-9)

    def steady_per_s(self) -> float:
        if not self.n_steady:
            return float("nan")
        return self.n_steady * self.world / (time.time() - self.t_steady)


class TimeBudget:
    """`max_minutes` of the whole run, validation included: a resumed run counts the time it
    had trained, and an epoch's steps stop early enough for its validation to fit."""

    def __init__(self, max_minutes: float | None, done_s: float, valid_s: float) -> None:
        self.start = time.time() - done_s
        self.seconds = max_minutes * 60 if max_minutes else float("inf")
        self.valid_s = valid_s

    def elapsed(self) -> float:
        return time.time() - self.start

    def done(self) -> float:
        """Share of the budget spent (0 without one): the schedule decays by it too."""
        return self.elapsed() / self.seconds

    def over(self) -> bool:
        return self.elapsed() + self.valid_s > self.seconds


class EarlyStopping:
    """Keeps the weights of the best epoch by the select metric, and says when `patience`
    epochs in a row brought no better one. Its counters live in `Progress`, so they
    survive a restart from a checkpoint."""

    def __init__(self, patience: int, progress: Progress, best: dict[str, torch.Tensor]) -> None:
        self.patience = patience
        self.progress = progress
        self.best = best

    def update(self, metric: float, model: torch.nn.Module) -> bool:
        """Record an epoch's metric (after `progress.epoch` counted it); True to stop."""
        p = self.progress
        if metric > p.best:
            p.best, p.best_epoch, p.bad_epochs = metric, p.epoch, 0
            self.best = state_dict(model)
        else:
            p.bad_epochs += 1
        return p.bad_epochs >= self.patience
