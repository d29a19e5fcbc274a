"""Training checkpoints as plain files: safetensors for tensors, JSON for the rest.

Nothing is pickled, so a checkpoint can be read by any later code version
and inspected by hand. A checkpoint folder holds:

- `model.safetensors`: current weights (DDP unwrapped);
- `best.safetensors`: weights of the best validation epoch so far;
- `optimizer.safetensors` + `optimizer.json`: AdamW moments and groups;
- `state.json`: progress (epoch, step, best metric, history) and the config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL = "model.safetensors"
BEST = "best.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE = "state.json"


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps in total
    epoch_step: int = 0  # steps inside the current, unfinished epoch
    best: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


def state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    save_file(weights, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    save_file(tensors, str(folder / OPTIMIZER))
    (folder / OPTIMIZER_META).write_text(
        json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})
    )


def read_optimizer(folder: Path) -> dict[str, Any]:
    """The optimizer's state dict as `save_optimizer` wrote it."""
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / OPTIMIZER)).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = meta["param_groups"]
    for g in groups:  # JSON has no tuples
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    return {"state": state, "param_groups": groups}


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    opt.load_state_dict(read_optimizer(folder))


def write_checkpoint(
    folder: Path,
    weights: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor],
    opt: torch.optim.Optimizer,
    progress: Progress,
    config: dict[str, Any],
) -> None:
    save_weights(weights, folder / MODEL)
    save_weights(best, folder / BEST)
    save_optimizer(opt, folder)
    (folder / STATE).write_text(
        json.dumps({"progress": asdict(progress), "config": config}, indent=1, default=str)
    )


def read_state(folder: Path) -> tuple[Progress, dict[str, Any]]:
    data = json.loads((folder / STATE).read_text())
    return Progress(**data["progress"]), data["config"]


@dataclass
class Saved:
    """Everything a checkpoint holds, read in one pass over its folder."""

    weights: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    progress: Progress
    config: dict[str, Any]


def read_checkpoint(folder: Path) -> Saved:
    progress, config = read_state(folder)
    return Saved(
        load_weights(folder / MODEL),
        load_weights(folder / BEST),
        read_optimizer(folder),
        progress,
        config,
    )
