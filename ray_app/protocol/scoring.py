"""How a method is scored: the evaluation protocols, apart from the stage that runs them.

Every protocol ranks each held-out target among candidates with the
method's scores for the target's user, and differs in what the user's
history is, when it is scored, and against what:

- *sampled*: the target among `num_negatives` never-touched items; *full*:
  against the whole catalogue minus the items of the history. Both at the
  target's own time (the moment right after the last click), or
- *returning*: at the history's last event + Δ, the same history and
  candidates, which is when a user who comes back later is scored;
- *backtest*: as the nightly job of the UTC day before the target listed the
  user: the events before the target's day, recency to the end of the day
  before, the whole catalogue minus those events' items.

Training's per-epoch validation uses `sampled_candidates` and `score_split`
from here too, so a Ray Train worker imports no part of the evaluate stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ray_app.protocol import metrics
from ray_app.protocol.data import EvalData, SplitTargets
from ray_app.protocol.scorer import Scorer

CHUNK = 1024
TARGET_TIME = "target"  # the moment label of scoring at the target's own time
# Real gaps between a history's last event and its target: (label, lower edge in seconds).
GAP_BUCKETS = (("< 1 h", 0), ("1 h - 1 d", 3_600), ("1 - 7 d", 86_400), ("> 7 d", 604_800))
NO_EARLIER_EVENT = "no earlier event"


def sampled_candidates(
    data: EvalData,
    split: str,
    n_neg: int,
    seed: int,
    targets: SplitTargets | None = None,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """(users, 1 + n_neg) item indices: the target first, then never-touched items.

    `pool` (item indices) restricts the negatives, e.g. to cold-start items.
    """
    targets = targets if targets is not None else data.splits[split]
    pool = np.arange(1, data.num_items + 1) if pool is None else np.asarray(pool)
    rng = np.random.default_rng([seed, 0 if split == "valid" else 1])
    out = np.zeros((len(targets), 1 + n_neg), dtype=np.int64)
    for i, (u, t) in enumerate(zip(targets.user_ids, targets.targets, strict=True)):
        owned = data.user_items[u]
        free = len(pool) - np.isin(pool, owned).sum()
        if free < n_neg:
            raise ValueError(
                f"user {u!r}: only {free} of the {len(pool)} items to sample from are untouched; "
                f"cannot sample num_negatives={n_neg} (lower it)"
            )
        picked: list[int] = []
        while len(picked) < n_neg:
            draw = pool[rng.integers(0, len(pool), size=2 * n_neg)]
            draw = draw[~np.isin(draw, owned)]
            picked.extend(x for x in dict.fromkeys(draw.tolist()) if x not in set(picked))
        out[i, 0] = t
        out[i, 1:] = picked[:n_neg]
    return out


def concat_stats(stats: list[metrics.RankStats]) -> metrics.RankStats:
    return metrics.RankStats(
        *(np.concatenate([getattr(s, f) for s in stats]) for f in ("greater", "ties", "less"))
    )


def score_split(
    model: Scorer,
    targets: SplitTargets,
    cand: np.ndarray | None,
    k: int,
    seed: int = 0,
    lists: bool = True,
) -> dict[str, Any]:
    """Per-user rank statistics for both protocols plus each user's top-k list.

    The full ranking excludes the items of each target's history; `cand` None
    skips the sampled protocol, `lists` False the top-k lists.
    """
    rng = np.random.default_rng(seed)
    full, samp, tops = [], [], []
    for lo in range(0, len(targets), CHUNK):
        chunk = targets.subset(slice(lo, lo + CHUNK))
        scores = model.score_targets(chunk)
        competing = np.ones(scores.shape, dtype=bool)
        competing[:, 0] = False
        for i, h in enumerate(chunk.histories):
            competing[i, h] = False
        full.append(metrics.rank_stats(scores, chunk.targets, competing))
        if cand is not None:
            c = cand[lo : lo + CHUNK]
            samp.append(metrics.rank_stats(np.take_along_axis(scores, c, 1), np.zeros(len(c), int)))
        if lists:
            # Top-k lists break ties at random (seeded), like the expected-rank metrics.
            finite = np.abs(scores[np.isfinite(scores)])
            jitter = rng.random(scores.shape) * 1e-9 * ((finite.max() if finite.size else 0) + 1)
            masked = np.where(competing, scores + jitter, -np.inf)
            part = np.argpartition(-masked, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(masked, part, 1), axis=1)
            tops.append(np.take_along_axis(part, order, 1))
    out: dict[str, Any] = {"full": concat_stats(full)}
    if cand is not None:
        out["sampled"] = concat_stats(samp)
    if lists:
        out["topk"] = np.concatenate(tops) if tops else np.zeros((0, k), np.int64)
    return out


@dataclass(frozen=True)
class Column:
    """One protocol at one moment, per user: NDCG@k and the hit rate (HR@k sampled,
    Recall@k full; the same thing with one held-out item)."""

    ndcg: np.ndarray
    hit: np.ndarray

    @classmethod
    def of(cls, stats: metrics.RankStats, k: int) -> Column:
        return cls(metrics.ndcg(stats, k), metrics.hit_rate(stats, k))

    def summary(self, hit_name: str, k: int) -> dict[str, float]:
        return {
            f"ndcg@{k}": metrics.mean_defined(self.ndcg),
            f"{hit_name}@{k}": metrics.mean_defined(self.hit),
        }

    def where(self, mask: np.ndarray) -> Column:
        return Column(self.ndcg[mask], self.hit[mask])


def column_name(protocol: str, moment: str) -> str:
    return f"{protocol}@{moment}"


def at_moments(
    model: Scorer,
    targets: SplitTargets,
    cand: np.ndarray,
    k: int,
    deltas: dict[str, int],
    at_target: dict[str, metrics.RankStats],
) -> dict[str, Column]:
    """Both protocols at the target's time (`at_target`, already scored) and at the
    history's last event + each Δ. A method without a time input scores the same at
    every moment, so it is not scored again."""
    out = {column_name(p, TARGET_TIME): Column.of(s, k) for p, s in at_target.items()}
    for label, seconds in deltas.items():
        if model.uses_time:
            res = score_split(model, targets.after_last_event(seconds), cand, k, lists=False)
            cols = {p: Column.of(res[p], k) for p in ("sampled", "full")}
        else:
            cols = {p: out[column_name(p, TARGET_TIME)] for p in ("sampled", "full")}
        for p, col in cols.items():
            out[column_name(p, label)] = col
    return out


def repeat_targets(targets: SplitTargets) -> np.ndarray:
    """(n,) bool: the target item is already in the user's history (a re-consumption).

    The full-ranking protocol ranks such a target like any other, but a list of
    items new to the user (the nightly lists) can never hold it; MovieLens
    has none, a shop's logs (view, then cart, then purchase) many.
    """
    return np.array(
        [bool(np.isin(t, h)) for t, h in zip(targets.targets, targets.histories, strict=True)],
        dtype=bool,
    )


def gap_labels(targets: SplitTargets) -> np.ndarray:
    """(n,) the real gap from each history's last event to its target, as a GAP_BUCKETS
    label (NO_EARLIER_EVENT for an empty history)."""
    gap = targets.target_times - targets.last_event_times()
    edges = np.array([lo for _, lo in GAP_BUCKETS[1:]])
    labels = np.array([label for label, _ in GAP_BUCKETS], dtype=object)[
        np.searchsorted(edges, gap, side="right")
    ]
    return np.where(targets.has_history, labels, NO_EARLIER_EVENT)


class PopularityFallback(Scorer):
    """`model`, except that users with an empty history get the popularity list (what a
    system without a personal model shows a user it knows nothing about)."""

    def __init__(self, model: Scorer, popularity: Scorer) -> None:
        self.model, self.popularity = model, popularity
        self.name, self.uses_time = model.name, model.uses_time

    @property
    def params(self) -> dict:
        return self.model.params

    def score_targets(self, targets: SplitTargets) -> np.ndarray:
        scores = self.model.score_targets(targets)
        empty = ~targets.has_history
        if empty.any():
            scores[empty] = self.popularity.score_targets(targets.subset(empty))
        return scores


def backtest(model: Scorer, targets: SplitTargets, k: int, popularity: Scorer | None) -> Column:
    """Per user, the nightly protocol's NDCG@k and Recall@k (see the module docstring).

    `targets` as they are (`as_of_previous_day` is applied here). A target already in
    that history (a repeat) can never be in a list of items new to the user: a miss.
    Models without a time input rank users whose history is empty by `popularity`.
    """
    cut = targets.as_of_previous_day()
    if popularity is not None and not model.uses_time:
        model = PopularityFallback(model, popularity)
    col = Column.of(score_split(model, cut, None, k, lists=False)["full"], k)
    repeat = repeat_targets(cut)
    return Column(np.where(repeat, 0.0, col.ndcg), np.where(repeat, 0.0, col.hit))


def backtest_rows(col: Column, has_history: np.ndarray, k: int) -> dict[str, Any]:
    """The backtest's summary: every target, and apart those whose cut history is empty."""
    out = {}
    for label, mask in (
        ("all", np.ones(len(col.ndcg), bool)),
        ("with_history", has_history),
        ("empty_history", ~has_history),
    ):
        out[label] = {**col.where(mask).summary("recall", k), "users": int(mask.sum())}
    return out


def versus_best(
    columns: dict[str, dict[str, Column]], baselines: list[str], others: list[str]
) -> dict[str, Any]:
    """Per column, the best baseline (highest mean NDCG) and every other method minus it,
    user by user: mean difference and its 95% interval (± 1.96 standard errors)."""
    out: dict[str, Any] = {}
    names = sorted({c for m in columns.values() for c in m})
    for col in names:
        have = [b for b in baselines if col in columns.get(b, {})]
        if not have:
            continue
        best = max(have, key=lambda b: metrics.mean_defined(columns[b][col].ndcg))
        for name in others:
            if col not in columns.get(name, {}):
                continue
            d = metrics.paired_difference(columns[name][col].ndcg, columns[best][col].ndcg)
            out.setdefault(name, {})[col] = {"baseline": best, **d}
    return out


def versus_pairs(
    columns: dict[str, dict[str, Column]], pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """For each pair [a, b] (methods or groups), a - b user by user in every column
    both have: mean difference and its 95% interval."""
    out: dict[str, Any] = {}
    for a, b in pairs:
        missing = [n for n in (a, b) if n not in columns]
        if missing:
            raise ValueError(f"compare: {missing} not among the scored methods {sorted(columns)}")
        shared = [c for c in columns[a] if c in columns[b]]
        out[f"{a} - {b}"] = {
            c: metrics.paired_difference(columns[a][c].ndcg, columns[b][c].ndcg) for c in shared
        }
    return out
