"""The `evaluate` stage: baselines (and later model artifacts) on the same held-out users.

Two protocols per split. *Sampled*: the held-out item among `num_negatives`
items the user never touched (uniform, fixed seed), written to Parquet so
any system can be scored on the very same lists. *Full*: the held-out item
ranked against the whole catalogue minus the user's earlier items.
Hyper-parameters are chosen on the validation split only; the test split is
scored once with the chosen values.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import logging.handlers
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ray_app import tracking
from ray_app.data import schema
from ray_app.evaluation.baselines import EASE, ItemKNN, Popularity, TextSimilarity
from ray_app.evaluation.config import EvaluateConfig
from ray_app.evaluation.sasrec import SASRec, SASRecConfig
from ray_app.protocol import metrics
from ray_app.protocol.data import EvalData, SplitTargets, load_prepared, sample_users
from ray_app.protocol.scorer import Scorer
from ray_app.protocol.scoring import (
    GAP_BUCKETS,
    NO_EARLIER_EVENT,
    TARGET_TIME,
    Column,
    at_moments,
    backtest,
    backtest_rows,
    column_name,
    concat_stats,
    gap_labels,
    repeat_targets,
    sampled_candidates,
    score_split,
    versus_best,
    versus_pairs,
)
from ray_app.runtime import local_cpus
from ray_app.storage import StagedOutput, resolve, write_json

logger = logging.getLogger(__name__)

HISTORY_BUCKETS = (1, 11, 21, 51, 101, 201)  # lower edges


def write_candidates(path: str, targets: SplitTargets, cand: np.ndarray) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    table = pa.table(
        {
            schema.USER_ID: pa.array(targets.user_ids, pa.string()),
            schema.TARGET_ITEM_IDX: pa.array(targets.targets.astype(np.int32)),
            "candidates": pa.array(list(cand.astype(np.int32)), pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, p, filesystem=fs)


def _token_bags(data: EvalData) -> sp.csr_matrix:
    """Items as bags of text tokens, for intra-list diversity."""
    ids = data.items[schema.INPUT_IDS].tolist()
    rows = np.repeat(np.arange(len(ids)), [len(v) for v in ids])
    cols = np.concatenate([np.asarray(v) for v in ids])
    return sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(ids), int(cols.max()) + 1))


def summarize(res: dict[str, Any], data: EvalData, k: int, bags: sp.csr_matrix) -> dict[str, Any]:
    s, f, topk = res["sampled"], res["full"], res["topk"]
    per_user_auc = metrics.auc(s)
    return {
        "sampled": {
            f"hr@{k}": metrics.mean_defined(metrics.hit_rate(s, k)),
            f"ndcg@{k}": metrics.mean_defined(metrics.ndcg(s, k)),
            "mrr": metrics.mean_defined(metrics.mrr(s)),
            "auc": metrics.mean_defined(per_user_auc),
            "gauc": metrics.gauc(per_user_auc),
        },
        "full": {
            f"recall@{k}": metrics.mean_defined(metrics.hit_rate(f, k)),
            f"ndcg@{k}": metrics.mean_defined(metrics.ndcg(f, k)),
            "mrr": metrics.mean_defined(metrics.mrr(f)),
            f"coverage@{k}": metrics.coverage(list(topk), data.num_items, k),
            f"long_tail_share@{k}": metrics.long_tail_share(list(topk), data.train_counts, k),
            f"diversity@{k}": metrics.intra_list_diversity(list(topk), bags, k),
        },
        "users": len(s),
    }


def breakdowns(res: dict[str, Any], data: EvalData, split: str, k: int) -> dict[str, Any]:
    """Full-ranking and sampled NDCG@k by history length, by target popularity and by the
    real gap from the history's last event to the target (at the target's time)."""
    targets = data.splits[split]
    hl = np.array([len(h) for h in targets.histories])
    counts = data.train_counts
    pop = counts[targets.targets]
    ranked = np.sort(counts[1:])[::-1]
    cuts = [ranked[int(q * (len(ranked) - 1))] for q in (0.01, 0.05, 0.2, 0.5)]
    pop_bucket = np.select(
        [pop == 0, pop >= cuts[0], pop >= cuts[1], pop >= cuts[2], pop >= cuts[3]],
        ["cold (0)", "top 1%", "1-5%", "5-20%", "20-50%"],
        "bottom 50%",
    )
    gaps = gap_labels(targets)
    gap_order = [label for label, _ in GAP_BUCKETS] + [NO_EARLIER_EVENT]
    hist_bucket = np.digitize(hl, HISTORY_BUCKETS)
    hist_labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(HISTORY_BUCKETS)] + [
        f"{HISTORY_BUCKETS[-1]}+"
    ]
    out: dict[str, Any] = {}
    repeat = repeat_targets(targets)
    out["full_by_target"] = {
        label: {
            f"recall@{k}": metrics.mean_defined(metrics.hit_rate(res["full"], k)[mask]),
            f"ndcg@{k}": metrics.mean_defined(metrics.ndcg(res["full"], k)[mask]),
            "users": int(mask.sum()),
        }
        for label, mask in (("new", ~repeat), ("repeat", repeat))
    }
    for proto in ("full", "sampled"):
        nd = metrics.ndcg(res[proto], k)
        out[f"{proto}_ndcg_by_history"] = {
            hist_labels[b - 1]: {
                "ndcg": float(nd[hist_bucket == b].mean()),
                "users": int((hist_bucket == b).sum()),
            }
            for b in np.unique(hist_bucket)
        }
        out[f"{proto}_ndcg_by_popularity"] = {
            lab: {
                "ndcg": float(nd[pop_bucket == lab].mean()),
                "users": int((pop_bucket == lab).sum()),
            }
            for lab in ["top 1%", "1-5%", "5-20%", "20-50%", "bottom 50%", "cold (0)"]
            if (pop_bucket == lab).any()
        }
        out[f"{proto}_ndcg_by_gap"] = {
            lab: {"ndcg": float(nd[gaps == lab].mean()), "users": int((gaps == lab).sum())}
            for lab in gap_order
            if (gaps == lab).any()
        }
    return out


PROTOCOLS = ("sampled", "full")


def fit_sasrec(
    name: str,
    cfg: EvaluateConfig,
    data: EvalData,
    valid_candidates: np.ndarray,
    bags: sp.csr_matrix,
    threads: int | None = None,
) -> tuple[SASRec, float]:
    """One SASRec variant, the epoch best on valid full NDCG@k kept; (model, seconds)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    t = time.time()

    def valid_full(m: Scorer) -> float:
        return valid_ndcg(m, data, valid_candidates, bags, cfg.k)["full"]

    sc = SASRecConfig(
        epochs=cfg.sasrec_epochs,
        seed=cfg.seed,
        loss="bce" if name == "sasrec" else "ce",
        max_minutes=cfg.sasrec_max_minutes,
    )
    model = SASRec(sc).fit(data.train, data.num_items, validate=valid_full)
    return model, time.time() - t


def _child_logging(queue: Any, level: int) -> None:
    """A fit process's records go to the driver's handlers (text or JSON alike)."""
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(queue)]
    root.setLevel(level)


@contextlib.contextmanager
def sasrec_fits(
    cfg: EvaluateConfig,
    data: EvalData,
    valid_candidates: np.ndarray,
    bags: sp.csr_matrix,
    names: list[str],
) -> Iterator[dict[str, Future]]:
    """The SASRec fits: name -> future (model, seconds). With CPUs for it
    (`fit_processes`) they start side by side in processes of their own and the other
    baselines fit meanwhile, leaving the block waits for those still running; otherwise
    they fit here, one after the other, before the block is entered."""
    cpus = local_cpus()
    n = min(len(names), cfg.fit_processes or cpus)
    if n <= 1:
        out: dict[str, Future] = {}
        for name in names:
            out[name] = Future()
            out[name].set_result(fit_sasrec(name, cfg, data, valid_candidates, bags))
        yield out
        return
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    listener = logging.handlers.QueueListener(
        queue, *logging.getLogger().handlers, respect_handler_level=True
    )
    threads = max(1, cpus // n)
    logger.info("fitting %s in %d processes of %d thread(s) each", ", ".join(names), n, threads)
    listener.start()
    try:
        with ProcessPoolExecutor(
            n, mp_context=ctx, initializer=_child_logging,
            initargs=(queue, logging.getLogger().getEffectiveLevel()),
        ) as pool:  # fmt: skip
            yield {
                name: pool.submit(fit_sasrec, name, cfg, data, valid_candidates, bags, threads)
                for name in names
            }
    finally:
        listener.stop()


def valid_ndcg(
    m: Scorer, data: EvalData, valid_candidates: np.ndarray, bags: sp.csr_matrix, k: int
) -> dict[str, float]:
    """NDCG@k on valid, per protocol: what every baseline is tuned on."""
    summary = summarize(score_split(m, data.splits["valid"], valid_candidates, k), data, k, bags)
    return {p: summary[p][f"ndcg@{k}"] for p in PROTOCOLS}


def fit_baselines(
    cfg: EvaluateConfig, data: EvalData, candidates: dict[str, np.ndarray], bags: sp.csr_matrix
) -> tuple[dict[str, dict[str, Scorer]], dict[str, Any]]:
    """Fit each baseline on train; choose its hyper-parameters on valid, per protocol.

    Each protocol gets the value with the best valid NDCG@k under that protocol
    (small neighbourhoods win full ranking but leave sampled lists full of
    ties, for instance). Both SASRec variants keep the epoch best on valid full NDCG@k,
    within their fit-time cap.
    """
    models: dict[str, dict[str, Scorer]] = {}
    info: dict[str, Any] = {}
    sasrecs = [n for n in cfg.baselines if n in ("sasrec", "sasrec_ce")]
    with sasrec_fits(cfg, data, candidates["valid"], bags, sasrecs) as fitted:
        for name in cfg.baselines:
            t = time.time()
            if name in fitted:
                model, seconds = fitted[name].result()
                chosen, tried = dict.fromkeys(PROTOCOLS, model), {}
            else:
                chosen, tried = _fit_tuned(name, cfg, data, candidates["valid"], bags)
                seconds = time.time() - t
            models[name] = chosen
            info[name] = {
                "fit_seconds": round(seconds, 2),
                "params": {p: chosen[p].params for p in PROTOCOLS},
                "valid_ndcg_search": tried,
            }
            logger.info("fitted %s in %.1fs (%s)", name, seconds, info[name]["params"])
    return models, info


def _fit_tuned(
    name: str,
    cfg: EvaluateConfig,
    data: EvalData,
    valid_candidates: np.ndarray,
    bags: sp.csr_matrix,
) -> tuple[dict[str, Scorer], dict[str, Any]]:
    """A baseline fitted on train and, per protocol, its value searched on valid."""

    def search(candidates: dict[str, Scorer]) -> tuple[dict[str, Scorer], dict]:
        tried = {
            key: valid_ndcg(m, data, valid_candidates, bags, cfg.k) for key, m in candidates.items()
        }
        chosen = {p: candidates[max(tried, key=lambda key: tried[key][p])] for p in PROTOCOLS}
        return chosen, tried

    if name == "popularity":
        return dict.fromkeys(PROTOCOLS, Popularity().fit(data.train, data.num_items)), {}
    if name == "item_knn":
        base = ItemKNN(k=cfg.knn_neighbours[0]).fit(data.train, data.num_items)
        return search({str(kk): base.with_k(kk) for kk in cfg.knn_neighbours})
    if name == "ease":
        base = EASE(lam=cfg.ease_lambdas[0]).fit(data.train, data.num_items)
        return search({str(lam): base.with_lambda(lam) for lam in cfg.ease_lambdas})
    if name == "text_tfidf":
        base = TextSimilarity(bags=bags, recent=cfg.text_recent[0]).fit(data.train, data.num_items)
        return search({str(r): base.with_recent(r) for r in cfg.text_recent})
    raise ValueError(f"unknown baseline {name!r}")  # config validation makes this unreachable


def load_models(
    cfg: EvaluateConfig, data: EvalData
) -> tuple[dict[str, dict[str, Scorer]], dict[str, Any], dict[str, np.ndarray]]:
    """Trained re-rankers from their artifacts; checked against the prepared catalogue."""
    from ray_app.model.artifact import load_artifact
    from ray_app.protocol.scorer import NetScorer

    models, info, held = {}, {}, {}
    for name, path in cfg.models.items():
        art = load_artifact(path)
        ids = art.items[schema.ITEM_ID].to_numpy()
        if (
            len(ids) != len(data.items)
            or (ids[1:] != data.items[schema.ITEM_ID].to_numpy()[1:]).any()
        ):
            raise ValueError(
                f"models.{name}: the artifact's catalogue ({len(ids) - 1} items) is not the "
                f"one of {cfg.prepared} ({data.num_items} items); evaluate on the prepare "
                "output the model was trained on"
            )
        scorer = NetScorer(
            art.model,
            art.item_vectors,
            name=name,
            params={"artifact": path, "version": art.version},
        )
        models[name] = dict.fromkeys(PROTOCOLS, scorer)
        mc = art.config["model"]
        info[name] = {
            "artifact": path,
            "version": art.version,
            "best_epoch": art.metrics.get("best_epoch"),
            "trainable_layers": mc["trainable_layers"] if mc["use_text"] else "-",
            "use_text": mc["use_text"],
            "use_ids": mc["use_ids"],
        }
        mask = art.items["held_out"].fillna(False).to_numpy(bool)
        if mask.any():
            held[name] = mask
    return models, info, held


def score_lists(
    data: EvalData, path: str, k: int, bags: sp.csr_matrix
) -> tuple[str, dict[str, Any], Column]:
    """The nightly backtest of precomputed top-K lists (a `nightly` partition run as of a
    split, which lists each user as the run of the day before their target did): the
    split's target in the user's top k or not. Returns (split, summary, per-user column),
    comparable to every method's `backtest` column."""
    from ray_app.storage import published, read_parquet

    root, manifest = published(path)
    split = manifest.get("as_of")
    if split not in ("valid", "test"):
        raise ValueError(
            f"lists {path}: made with as_of={split!r}; score lists made as of the split "
            "they are judged on (nightly --set as_of=test), else each target is already "
            "in the history they exclude"
        )
    if manifest.get("history_cut") != "day_before_target":
        raise ValueError(
            f"lists {path}: made by an older nightly that cut histories at the target "
            "itself, not at the day before it; re-run nightly with as_of=" + split
        )
    table = read_parquet(root).sort_values([schema.USER_ID, schema.RANK], kind="stable")
    index = schema.item_index(data.items)
    unknown = set(table[schema.ITEM_ID]) - index.keys()
    if unknown:
        raise ValueError(
            f"lists {path}: {len(unknown)} item ids are not in the prepared catalogue "
            f"({sorted(unknown)[:3]}...); score lists on the data their model was trained on"
        )
    table[schema.ITEM_IDX] = table[schema.ITEM_ID].map(index).astype(np.int64)
    per_user = {
        u: g.to_numpy() for u, g in table.groupby(schema.USER_ID, sort=False)[schema.ITEM_IDX]
    }
    targets = data.splits[split]
    topk = [per_user.get(u, np.zeros(0, np.int64))[:k] for u in targets.user_ids]
    relevant = [np.array([t]) for t in targets.targets]
    recall = metrics.recall_at_k(topk, relevant, k)
    ndcg = metrics.ndcg_lists(topk, relevant, k)
    new = ~repeat_targets(targets)
    full = {
        f"recall@{k}": metrics.mean_defined(recall),
        f"ndcg@{k}": metrics.mean_defined(ndcg),
        f"coverage@{k}": metrics.coverage(topk, data.num_items, k),
        f"long_tail_share@{k}": metrics.long_tail_share(topk, data.train_counts, k),
        f"diversity@{k}": metrics.intra_list_diversity([t for t in topk if len(t) == k], bags, k),
    }
    col = Column(ndcg, recall)
    return (
        split,
        {
            "full": full,
            "backtest": backtest_rows(col, targets.as_of_previous_day().has_history, k),
            "new_targets": {
                f"recall@{k}": metrics.mean_defined(recall[new]),
                f"ndcg@{k}": metrics.mean_defined(ndcg[new]),
                "users": int(new.sum()),
            },
            "users": len(targets),
            "users_with_list": int(sum(len(t) > 0 for t in topk)),
            "list_length": int(table.groupby(schema.USER_ID).size().max()),
            "model_version": manifest.get("model_version"),
            "config": {
                key: manifest.get("config", {}).get(key)
                for key in ("num_candidates", "diversity", "long_tail_boost")
            },
            "source": path,
        },
        col,
    )


def held_out_events(data: EvalData, mask: np.ndarray) -> SplitTargets:
    """Every train-split event on a held-out item after a user's first event.

    No model that held these items out trained on them (their events were
    removed), so each is a cold-start target with the history before it:
    about a fifth of all events when a fifth of the items is held out, so a
    comparison of two cold models rests on thousands of events rather than on
    the few hundred valid and test targets that happen to be held-out items.
    The models did train on the same users' later events with other items.
    """
    tr = data.train
    users = tr[schema.USER_ID].to_numpy()
    items = tr[schema.ITEM_IDX].to_numpy(np.int64)
    kinds = tr[schema.EVENT_IDX].to_numpy(np.int64)
    times = tr[schema.TIMESTAMP].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    first = np.zeros(len(tr), dtype=bool)
    first[starts] = True
    begin = np.repeat(starts, np.diff(np.r_[starts, len(tr)]))
    rows = np.flatnonzero(mask[items] & ~first)
    return SplitTargets(
        user_ids=users[rows],
        histories=[items[begin[r] : r] for r in rows],
        targets=items[rows],
        history_events=[kinds[begin[r] : r] for r in rows],
        history_times=[times[begin[r] : r] for r in rows],
        target_times=times[rows],
    )


def _per_user_mean(user_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of `values` per user, users in sorted order."""
    _, inverse = np.unique(user_ids, return_inverse=True)
    return np.bincount(inverse, weights=values) / np.bincount(inverse)


def _cold_target_sets(
    data: EvalData, mask: np.ndarray, cfg: EvaluateConfig
) -> dict[str, tuple[SplitTargets, np.ndarray]]:
    """Per split, the targets that are held-out items and their sampled candidates
    (the target, then held-out items the user never touched)."""
    pool = np.flatnonzero(mask)
    sets = {
        split: data.splits[split].subset(mask[data.splits[split].targets])
        for split in ("valid", "test")
    }
    sets["train"] = held_out_events(data, mask)
    return {
        split: (sub, sampled_candidates(data, split, cfg.num_negatives, cfg.seed, sub, pool))
        for split, sub in sets.items()
        if len(sub)
    }


def _warm_targets(
    sampled: dict[str, metrics.RankStats], mask: np.ndarray, data: EvalData, k: int
) -> dict[str, Any]:
    """The same model on the valid and test targets that are not held-out items,
    in the standard sampled protocol: what its held-out-item figure is weighed
    against (how much of the warm quality text alone keeps)."""
    stats = [
        sampled[split].subset(~mask[data.splits[split].targets])
        for split in ("valid", "test")
        if split in sampled
    ]
    merged = concat_stats(stats)
    return {
        f"hr@{k}": metrics.mean_defined(metrics.hit_rate(merged, k)),
        f"ndcg@{k}": metrics.mean_defined(metrics.ndcg(merged, k)),
        "users": len(merged),
    }


def cold_start(
    models: dict[str, dict[str, Scorer]],
    held: dict[str, np.ndarray],
    data: EvalData,
    cfg: EvaluateConfig,
    sampled: dict[str, dict[str, metrics.RankStats]],
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Each model with held-out items, ranked against other held-out items the user
    never touched, on two target sets: the valid and test targets that are
    held-out items (one per user and split), and `all_events`: those plus every
    train-split event on a held-out item (`held_out_events`), averaged per user.
    `warm` is the same model on the other valid and test targets in the sampled
    protocol (`sampled`: method -> split -> its per-user rank statistics there).

    Returns the summary and, per target set, each model's per-user NDCG@k (for
    paired comparisons)."""
    out: dict[str, Any] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {"valid_test": {}, "all_events": {}}
    k = cfg.k
    target_sets: dict[bytes, dict[str, tuple[SplitTargets, np.ndarray]]] = {}
    for name, mask in held.items():
        sets = target_sets.setdefault(mask.tobytes(), _cold_target_sets(data, mask, cfg))
        scorer = models[name]["sampled"]
        stats = {
            split: metrics.rank_stats(scorer.score_candidates(sub, cand), np.zeros(len(cand), int))
            for split, (sub, cand) in sets.items()
        }
        row: dict[str, Any] = {
            "held_out_items": int(mask.sum()),
            "warm": _warm_targets(sampled[name], mask, data, k),
        }
        vt = [stats[s] for s in ("valid", "test") if s in stats]
        if vt:
            merged = concat_stats(vt)
            per_user["valid_test"][name] = metrics.ndcg(merged, k)
            row.update(
                {
                    f"hr@{k}": metrics.mean_defined(metrics.hit_rate(merged, k)),
                    f"ndcg@{k}": metrics.mean_defined(per_user["valid_test"][name]),
                    "users": len(merged),
                }
            )
        users = np.concatenate([sub.user_ids for sub, _ in sets.values()])
        ndcg = np.concatenate([metrics.ndcg(s, k) for s in stats.values()])
        hits = np.concatenate([metrics.hit_rate(s, k) for s in stats.values()])
        per_user["all_events"][name] = _per_user_mean(users, ndcg)
        row["all_events"] = {
            f"hr@{k}": float(_per_user_mean(users, hits).mean()),
            f"ndcg@{k}": float(per_user["all_events"][name].mean()),
            "users": len(np.unique(users)),
            "events": len(users),
        }
        out[name] = row
    return out, per_user


def paired(
    pairs: list[tuple[str, str]],
    test: dict[str, dict[str, metrics.RankStats]],
    cold: dict[str, dict[str, np.ndarray]],
    held: dict[str, np.ndarray],
    k: int,
) -> dict[str, Any]:
    """a - b per user for each configured pair: test under both protocols, and both
    cold-start target sets when both models held out the very same items (else
    their users differ)."""
    out: dict[str, Any] = {}
    for a, b in pairs:
        missing = [n for n in (a, b) if n not in test]
        if missing:
            raise ValueError(f"paired: {missing} not among the scored methods {sorted(test)}")
        row = {
            f"test_{p}": metrics.paired_difference(
                metrics.ndcg(test[a][p], k), metrics.ndcg(test[b][p], k)
            )
            for p in PROTOCOLS
        }
        if a in held and b in held and np.array_equal(held[a], held[b]):
            for key, label in (("valid_test", "cold_start"), ("all_events", "cold_start_all")):
                if a in cold[key] and b in cold[key]:
                    row[label] = metrics.paired_difference(cold[key][a], cold[key][b])
        out[f"{a} - {b}"] = row
    return out


RETURNING = ("1 - 7 d", "> 7 d")
"""Gap labels of a returning user's target: a day or more after the history's last event."""


def headline(
    test: dict[str, dict[str, metrics.RankStats]],
    baselines: list[str],
    models: list[str],
    data: EvalData,
    k: int,
) -> dict[str, Any]:
    """Each trained model against every baseline on test, full ranking, NDCG@k, user by
    user (mean difference and 95% interval): on all targets, on targets that are new
    items (no training event) and on returning users' targets (a day or more after
    their last event). The demo's closing summary reads this."""
    targets = data.splits["test"]
    segments = {
        "all": np.ones(len(targets.targets), dtype=bool),
        "new_items": data.train_counts[targets.targets] == 0,
        "returning_users": np.isin(gap_labels(targets), RETURNING),
    }
    ndcg = {n: metrics.ndcg(test[n]["full"], k) for n in [*baselines, *models] if n in test}
    out: dict[str, Any] = {"k": k, "protocol": "full", "segments": {}}
    for seg, mask in segments.items():
        row: dict[str, Any] = {
            "targets": int(mask.sum()),
            "ndcg": {n: metrics.mean_defined(v[mask]) for n, v in ndcg.items()},
            "versus": {},
        }
        for m in models:
            for b in baselines:
                if m in ndcg and b in ndcg and mask.any():
                    row["versus"][f"{m} - {b}"] = metrics.paired_difference(
                        ndcg[m][mask], ndcg[b][mask]
                    )
        out["segments"][seg] = row
    return out


def _group_columns(
    groups: dict[str, list[str]], columns: dict[str, dict[str, Column]]
) -> dict[str, dict[str, Column]]:
    """A group's per-user values: the mean of its members' (the same users and lists)."""
    out = {}
    for group, members in groups.items():
        shared = set.intersection(*(set(columns[m]) for m in members))
        out[group] = {
            col: Column(
                np.mean([columns[m][col].ndcg for m in members], 0),
                np.mean([columns[m][col].hit for m in members], 0),
            )
            for col in shared
        }
    return out


def moment_table(
    columns: dict[str, dict[str, Column]],
    moments: list[str],
    groups: dict[str, list[str]],
    k: int,
) -> dict[str, Any]:
    """method -> moment -> protocol -> NDCG@k and HR/Recall@k; a group also gets the
    standard deviation of its members' means."""
    out: dict[str, Any] = {}
    for name, cols in columns.items():
        row = {}
        for moment in moments:
            cell = {}
            for proto, hit in (("sampled", "hr"), ("full", "recall")):
                col = cols.get(column_name(proto, moment))
                if col is None:
                    continue
                cell[proto] = col.summary(hit, k)
                if name in groups:
                    member_means = [
                        metrics.mean_defined(columns[m][column_name(proto, moment)].ndcg)
                        for m in groups[name]
                    ]
                    sd = np.std(member_means, ddof=1) if len(member_means) > 1 else 0.0
                    cell[proto][f"ndcg@{k}_sd"] = float(sd)
            if cell:
                row[moment] = cell
        if row:  # precomputed lists have a backtest column only
            out[name] = row
    return out


@dataclass
class Scores:
    """Every method scored on valid and test: what the report is made of."""

    results: dict[str, dict[str, Any]] = field(default_factory=lambda: {"valid": {}, "test": {}})
    breakdowns: dict[str, Any] = field(default_factory=dict)  # test, by method
    test_stats: dict[str, dict[str, metrics.RankStats]] = field(default_factory=dict)
    sampled_stats: dict[str, dict[str, metrics.RankStats]] = field(default_factory=dict)
    # split -> method -> column ("<protocol>@<moment>" or "backtest") -> per-user values
    columns: dict[str, dict[str, dict[str, Column]]] = field(
        default_factory=lambda: {"valid": {}, "test": {}}
    )


def _score(
    scores: Scores,
    name: str,
    chosen: dict[str, Scorer],
    split: str,
    cfg: EvaluateConfig,
    data: EvalData,
    candidates: np.ndarray,
    bags: sp.csr_matrix,
    popularity: Scorer,
) -> None:
    """One method (its choice per protocol) on one split: both protocols at the target's
    time, then every moment of a returning user and the backtest."""
    k, targets = cfg.k, data.splits[split]
    per_proto = {}
    for proto in PROTOCOLS:
        model = chosen[proto]
        if proto == "full" and model is chosen["sampled"]:
            per_proto["full"] = per_proto["sampled"]
            continue
        res = score_split(model, targets, candidates, k)
        per_proto[proto] = (res, summarize(res, data, k, bags))
    scores.results[split][name] = {
        **{p: per_proto[p][1][p] for p in PROTOCOLS},
        "users": len(candidates),
    }
    merged = {p: per_proto[p][0][p] for p in PROTOCOLS}
    scores.sampled_stats.setdefault(name, {})[split] = merged["sampled"]
    if split == "test":
        scores.test_stats[name] = merged
        scores.breakdowns[name] = breakdowns(merged, data, split, k)
    # Per-protocol choices exist only for time-free baselines, which at_moments
    # does not score again; a model with a time input is one model.
    if chosen["full"].uses_time and chosen["full"] is not chosen["sampled"]:
        raise ValueError(f"{name}: a time-aware method must be one model")
    returning = split in cfg.returning_splits
    deltas = cfg.delta_seconds if returning else {}
    cols = at_moments(chosen["full"], targets, candidates, k, deltas, merged)
    if cfg.backtest and returning:
        cols["backtest"] = backtest(chosen["full"], targets, k, popularity)
    scores.columns[split][name] = cols


def _backtest_summaries(
    cfg: EvaluateConfig, data: EvalData, columns: dict[str, dict[str, dict[str, Column]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"valid": {}, "test": {}}
    for split in ("valid", "test"):
        if cfg.backtest or cfg.lists:
            has = data.splits[split].as_of_previous_day().has_history
            out[split] = {
                name: backtest_rows(cols["backtest"], has, cfg.k)
                for name, cols in columns[split].items()
                if "backtest" in cols
            }
    return out


def _protocols(cfg: EvaluateConfig) -> dict[str, str]:
    return {
        "sampled": f"held-out item + {cfg.num_negatives} never-touched items, seed {cfg.seed}",
        "full": "held-out item against all items minus the user's earlier items",
        "returning": "the same targets, histories and candidates, scored at the "
        "history's last event + Δ",
        "backtest": "what the nightly run of the UTC day before each target knew: "
        "events before the target's day, recency to the end of the day before, all "
        "items minus those events' items; a repeat target is a miss; baselines give "
        "users with an empty history the popularity list",
    }


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score every configured method on valid and test; write metrics, report, plots."""
    from ray_app.evaluation.report import write_report

    t0 = time.time()
    tracking.check(cfg.tracking)
    data = sample_users(load_prepared(cfg.prepared), cfg.max_users, cfg.seed)
    bags = _token_bags(data)
    k = cfg.k
    with StagedOutput(cfg.output) as stage:
        candidates = {}
        for split in ("valid", "test"):
            candidates[split] = sampled_candidates(data, split, cfg.num_negatives, cfg.seed)
            write_candidates(
                stage.path("candidates", f"{split}.parquet"), data.splits[split], candidates[split]
            )
        models, info = fit_baselines(cfg, data, candidates, bags)
        baseline_names = list(models)
        # What the backtest shows users with an empty history, for every baseline.
        popularity = models.get("popularity", {}).get("full") or Popularity().fit(
            data.train, data.num_items
        )
        trained, model_info, held = load_models(cfg, data)
        models.update(trained)
        scores = Scores()
        for name, chosen in models.items():
            for split in ("valid", "test"):
                _score(scores, name, chosen, split, cfg, data, candidates[split], bags, popularity)
                logger.info("scored %s on %s", name, split)
        cold, cold_users = cold_start(models, held, data, cfg, scores.sampled_stats)
        columns = scores.columns
        lists = {}
        for name, path in cfg.lists.items():
            split, summary, col = score_lists(data, path, k, bags)
            lists[name] = {"split": split, **summary}
            columns[split][name] = {"backtest": col}
        for split in ("valid", "test"):
            columns[split].update(_group_columns(cfg.groups, columns[split]))
        others = [n for n in columns["test"] if n not in baseline_names]
        moments = [TARGET_TIME, *cfg.delta_seconds]
        report = {
            "k": k,
            "protocols": _protocols(cfg),
            "prepared": cfg.prepared,
            "prepared_run_id": data.manifest.get("run_id"),
            "results": scores.results,
            "moments": {
                "deltas_s": cfg.delta_seconds,
                "no_earlier_event": {
                    s: int((~data.splits[s].has_history).sum()) for s in ("valid", "test")
                },
                "uses_time": {n: bool(models[n]["full"].uses_time) for n in models},
                "results": {
                    s: moment_table(columns[s], moments, cfg.groups, k) for s in ("valid", "test")
                },
            },
            "backtest": _backtest_summaries(cfg, data, columns),
            "versus_best_baseline": versus_best(columns["test"], baseline_names, others),
            "compare": versus_pairs(columns["test"], cfg.compare),
            "groups": cfg.groups,
            "breakdowns_test": scores.breakdowns,
            "baselines": info,
            "models": model_info,
            "cold_start": cold,
            "lists": lists,
            "paired": paired(cfg.paired, scores.test_stats, cold_users, held, k),
            "headline": headline(scores.test_stats, baseline_names, list(trained), data, k),
            "num_negatives": cfg.num_negatives,
            "max_users": cfg.max_users,
        }
        write_report(stage.staging, report)
        write_json(stage.path("metrics.json"), report)
        stage.publish(stage.manifest("evaluate", cfg, t0))
    tracking.log_run(
        cfg.tracking,
        "evaluate",
        tracking.run_label("evaluate", cfg.output, stage.run_id),
        cfg.model_dump(mode="json"),
        metric_table(report),
        tags={"rerank.evaluation": str(cfg.output), "rerank.prepared": str(cfg.prepared)},
    )
    return report


def metric_table(report: dict[str, Any]) -> dict[str, float]:
    """The metrics table as flat MLflow keys: `<split>.<method>.<protocol>.<metric>`, and
    the headline's NDCG per segment, `headline.<segment>.<method>`."""
    out = {}
    for split, methods in report["results"].items():
        for method, protocols in methods.items():
            for protocol, values in protocols.items():
                if isinstance(values, dict):
                    for name, v in values.items():
                        out[f"{split}.{method}.{protocol}.{name}"] = v
    for seg, v in ((report.get("headline") or {}).get("segments") or {}).items():
        for method, ndcg in v["ndcg"].items():
            out[f"headline.{seg}.{method}"] = ndcg
    return out
