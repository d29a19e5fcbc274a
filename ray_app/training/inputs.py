"""What a training run reads from a prepare output, once per worker (and on the driver)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ray_app.data import schema
from ray_app.data.negatives import NegativeSampler, user_hash
from ray_app.model.encoder import tokenizer_source
from ray_app.model.history import time_resolution
from ray_app.protocol.data import EvalData, SplitTargets, load_prepared
from ray_app.protocol.scoring import sampled_candidates
from ray_app.times import parse_duration
from ray_app.training.config import TrainConfig

logger = logging.getLogger(__name__)
RETURNING = "_returning"  # select-metric suffix: valid users scored at drawn moments


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
    first_seen: torch.Tensor  # (N+1,) int64 time of each item's first training event
    time_resolution_s: int  # the coarsest unit dividing every training timestamp
    valid: SplitTargets
    valid_cands: np.ndarray


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
        first_seen=first_seen(data.train, n),
        time_resolution_s=time_resolution(data.train[schema.TIMESTAMP].to_numpy()),
        valid=valid,
        valid_cands=sampled_candidates(data, "valid", cfg.valid_negatives, 0, valid),
    )


def first_seen(train: pd.DataFrame, num_items: int) -> torch.Tensor:
    """(N+1,) time of each item's first training event; items without one get the largest
    int64, later than any moment."""
    out = np.full(num_items + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(out, train[schema.ITEM_IDX].to_numpy(), train[schema.TIMESTAMP].to_numpy())
    return torch.from_numpy(out)


def returning_moments(targets: SplitTargets, deltas: list[int], seed: int = 0) -> SplitTargets:
    """Each user scored at one moment drawn from its target's time and its last event + each
    of `deltas` (the same draw every epoch and run)."""
    pick = np.random.default_rng(seed).integers(0, len(deltas) + 1, len(targets))
    after = targets.last_event_times() + np.r_[0, deltas][pick]
    at = np.where((pick > 0) & targets.has_history, after, targets.target_times)
    return replace(targets, scored_at=at)
