"""The `evaluate` stage: baselines (and later model artifacts) on the same held-out users.

Two protocols per split. *Sampled*: the held-out item among `num_negatives`
items the user never touched (uniform, fixed seed), written to Parquet so
any system can be scored on the very same lists. *Full*: the held-out item
ranked against the whole catalogue minus the user's earlier items.
Hyper-parameters are chosen on the validation split only; the test split is
scored once with the chosen values.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ray_app.config import EvaluateConfig, dump_config
from ray_app.data import schema as S
from ray_app.evaluation import metrics as M
from ray_app.evaluation.baselines import EASE, Baseline, ItemKNN, Popularity
from ray_app.evaluation.data import EvalData, SplitTargets, load_prepared
from ray_app.evaluation.sasrec import SASRec, SASRecConfig
from ray_app.storage import StagedOutput, code_version, resolve, write_json

logger = logging.getLogger(__name__)

HISTORY_BUCKETS = (1, 11, 21, 51, 101, 201)  # lower edges
CHUNK = 1024


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


def write_candidates(path: str, targets: SplitTargets, cand: np.ndarray) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    table = pa.table(
        {
            S.USER_ID: pa.array(targets.user_ids, pa.string()),
            S.TARGET_ITEM_IDX: pa.array(targets.targets.astype(np.int32)),
            "candidates": pa.array(list(cand.astype(np.int32)), pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, p, filesystem=fs)


def _token_bags(data: EvalData) -> sp.csr_matrix:
    """Items as normalised bags of text tokens, for intra-list diversity."""
    ids = data.items[S.INPUT_IDS].tolist()
    rows = np.repeat(np.arange(len(ids)), [len(v) for v in ids])
    cols = np.concatenate([np.asarray(v) for v in ids])
    m = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(ids), int(cols.max()) + 1))
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ m


def _diversity(topk: np.ndarray, bags: sp.csr_matrix) -> float:
    vals = []
    for t in topk:
        e = bags[t]
        sim = (e @ e.T).toarray()
        m = len(t)
        vals.append(1.0 - (sim.sum() - np.trace(sim)) / (m * (m - 1)))
    return float(np.mean(vals)) if vals else float("nan")


def score_split(
    model: Baseline, targets: SplitTargets, cand: np.ndarray, k: int, seed: int = 0
) -> dict[str, Any]:
    """Per-user rank statistics for both protocols plus each user's top-k list."""
    rng = np.random.default_rng(seed)
    full, samp, tops = [], [], []
    for lo in range(0, len(targets), CHUNK):
        chunk = targets.subset(slice(lo, lo + CHUNK))
        hist = chunk.histories
        tgt = chunk.targets
        scores = model.score_targets(chunk)
        competing = np.ones(scores.shape, dtype=bool)
        competing[:, 0] = False
        for i, h in enumerate(hist):
            competing[i, h] = False
        full.append(M.rank_stats(scores, tgt, competing))
        c = cand[lo : lo + CHUNK]
        samp.append(M.rank_stats(np.take_along_axis(scores, c, 1), np.zeros(len(c), int)))
        # Top-k lists break ties at random (seeded), like the expected-rank metrics.
        jitter = rng.random(scores.shape) * 1e-9 * (np.abs(scores[np.isfinite(scores)]).max() + 1)
        masked = np.where(competing, scores + jitter, -np.inf)
        part = np.argpartition(-masked, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(masked, part, 1), axis=1)
        tops.append(np.take_along_axis(part, order, 1))

    def cat(stats: list[M.RankStats]) -> M.RankStats:
        return M.RankStats(
            *(np.concatenate([getattr(s, f) for s in stats]) for f in ("greater", "ties", "less"))
        )

    return {"full": cat(full), "sampled": cat(samp), "topk": np.concatenate(tops)}


def summarize(res: dict[str, Any], data: EvalData, k: int, bags: sp.csr_matrix) -> dict[str, Any]:
    s, f, topk = res["sampled"], res["full"], res["topk"]
    per_user_auc = M.auc(s)
    return {
        "sampled": {
            f"hr@{k}": M.mean_defined(M.hit_rate(s, k)),
            f"ndcg@{k}": M.mean_defined(M.ndcg(s, k)),
            "mrr": M.mean_defined(M.mrr(s)),
            "auc": M.mean_defined(per_user_auc),
            "gauc": M.gauc(per_user_auc),
        },
        "full": {
            f"recall@{k}": M.mean_defined(M.hit_rate(f, k)),
            f"ndcg@{k}": M.mean_defined(M.ndcg(f, k)),
            "mrr": M.mean_defined(M.mrr(f)),
            f"coverage@{k}": M.coverage(list(topk), data.num_items, k),
            f"long_tail_share@{k}": M.long_tail_share(list(topk), data.train_counts, k),
            f"diversity@{k}": _diversity(topk, bags),
        },
        "users": len(s),
    }


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


def breakdowns(res: dict[str, Any], data: EvalData, split: str, k: int) -> dict[str, Any]:
    """Full-ranking and sampled NDCG@k by history length and by target popularity."""
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
    hist_bucket = np.digitize(hl, HISTORY_BUCKETS)
    hist_labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(HISTORY_BUCKETS)] + [
        f"{HISTORY_BUCKETS[-1]}+"
    ]
    out: dict[str, Any] = {}
    repeat = repeat_targets(targets)
    out["full_by_target"] = {
        label: {
            f"recall@{k}": M.mean_defined(M.hit_rate(res["full"], k)[mask]),
            f"ndcg@{k}": M.mean_defined(M.ndcg(res["full"], k)[mask]),
            "users": int(mask.sum()),
        }
        for label, mask in (("new", ~repeat), ("repeat", repeat))
    }
    for proto in ("full", "sampled"):
        nd = M.ndcg(res[proto], k)
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
    return out


PROTOCOLS = ("sampled", "full")


def fit_baselines(
    cfg: EvaluateConfig, data: EvalData, cands: dict[str, np.ndarray], bags: sp.csr_matrix
) -> tuple[dict[str, dict[str, Baseline]], dict[str, Any]]:
    """Fit each baseline on train; choose its hyper-parameters on valid, per protocol.

    Each protocol gets the value with the best valid NDCG@k under that protocol
    (small neighbourhoods win full ranking but leave sampled lists full of
    ties, for instance). SASRec keeps the epoch best on valid full NDCG@k.
    """
    k = cfg.k
    models: dict[str, dict[str, Baseline]] = {}
    info: dict[str, Any] = {}

    def valid_ndcg(m: Baseline) -> dict[str, float]:
        summary = summarize(score_split(m, data.splits["valid"], cands["valid"], k), data, k, bags)
        return {p: summary[p][f"ndcg@{k}"] for p in PROTOCOLS}

    def search(candidates: dict[str, Baseline]) -> tuple[dict[str, Baseline], dict]:
        tried = {key: valid_ndcg(m) for key, m in candidates.items()}
        chosen = {p: candidates[max(tried, key=lambda key: tried[key][p])] for p in PROTOCOLS}
        return chosen, tried

    for name in cfg.baselines:
        t = time.time()
        tried: dict[str, Any] = {}
        if name == "popularity":
            pop = Popularity().fit(data.train, data.num_items)
            chosen = dict.fromkeys(PROTOCOLS, pop)
        elif name == "item_knn":
            base = ItemKNN(k=cfg.knn_neighbours[0]).fit(data.train, data.num_items)
            chosen, tried = search({str(kk): base.with_k(kk) for kk in cfg.knn_neighbours})
        elif name == "ease":
            base = EASE(lam=cfg.ease_lambdas[0]).fit(data.train, data.num_items)
            chosen, tried = search({str(lam): base.with_lambda(lam) for lam in cfg.ease_lambdas})
        elif name == "sasrec":
            sc = SASRecConfig(epochs=cfg.sasrec_epochs, seed=cfg.seed)
            model = SASRec(sc).fit(
                data.train, data.num_items, validate=lambda m: valid_ndcg(m)["full"]
            )
            chosen = dict.fromkeys(PROTOCOLS, model)
        else:  # config validation makes this unreachable
            raise ValueError(f"unknown baseline {name!r}")
        models[name] = chosen
        info[name] = {
            "fit_seconds": round(time.time() - t, 2),
            "params": {p: chosen[p].params for p in PROTOCOLS},
            "valid_ndcg_search": tried,
        }
        logger.info("fitted %s in %.1fs (%s)", name, time.time() - t, info[name]["params"])
    return models, info


def load_models(
    cfg: EvaluateConfig, data: EvalData
) -> tuple[dict[str, dict[str, Baseline]], dict[str, Any], dict[str, np.ndarray]]:
    """Trained re-rankers from their artifacts; checked against the prepared catalogue."""
    from ray_app.evaluation.model_scorer import RerankerScorer
    from ray_app.model.artifact import load_artifact

    models, info, held = {}, {}, {}
    for name, path in cfg.models.items():
        art = load_artifact(path)
        ids = art.items[S.ITEM_ID].to_numpy()
        if len(ids) != len(data.items) or (ids[1:] != data.items[S.ITEM_ID].to_numpy()[1:]).any():
            raise ValueError(
                f"models.{name}: the artifact's catalogue ({len(ids) - 1} items) is not the "
                f"one of {cfg.prepared} ({data.num_items} items); evaluate on the prepare "
                "output the model was trained on"
            )
        scorer = RerankerScorer(
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
) -> tuple[str, dict[str, Any]]:
    """Full-ranking metrics of precomputed top-K lists (a `nightly` partition run as of
    a split): the split's target in the user's list or not, as the evaluation's own
    full-ranking protocol does for a model's top-k. Returns (split, summary)."""
    from ray_app.storage import read_parquet, require_complete

    manifest = require_complete(path)
    split = manifest.get("as_of")
    if split not in ("valid", "test"):
        raise ValueError(
            f"lists {path}: made with as_of={split!r}; score lists made as of the split "
            "they are judged on (nightly --set as_of=test), else each target is already "
            "in the history they exclude"
        )
    table = read_parquet(path).sort_values([S.USER_ID, S.RANK], kind="stable")
    index = dict(zip(data.items[S.ITEM_ID].iloc[1:], data.items[S.ITEM_IDX].iloc[1:], strict=True))
    unknown = set(table[S.ITEM_ID]) - index.keys()
    if unknown:
        raise ValueError(
            f"lists {path}: {len(unknown)} item ids are not in the prepared catalogue "
            f"({sorted(unknown)[:3]}...); score lists on the data their model was trained on"
        )
    table[S.ITEM_IDX] = table[S.ITEM_ID].map(index).astype(np.int64)
    per_user = {u: g.to_numpy() for u, g in table.groupby(S.USER_ID, sort=False)[S.ITEM_IDX]}
    targets = data.splits[split]
    topk = [per_user.get(u, np.zeros(0, np.int64))[:k] for u in targets.user_ids]
    relevant = [np.array([t]) for t in targets.targets]
    recall = M.recall_at_k(topk, relevant, k)
    ndcg = M.ndcg_lists(topk, relevant, k)
    new = ~repeat_targets(targets)
    full = {
        f"recall@{k}": M.mean_defined(recall),
        f"ndcg@{k}": M.mean_defined(ndcg),
        f"coverage@{k}": M.coverage(topk, data.num_items, k),
        f"long_tail_share@{k}": M.long_tail_share(topk, data.train_counts, k),
        f"diversity@{k}": _diversity(np.array([t for t in topk if len(t) == k]), bags),
    }
    return split, {
        "full": full,
        "new_targets": {
            f"recall@{k}": M.mean_defined(recall[new]),
            f"ndcg@{k}": M.mean_defined(ndcg[new]),
            "users": int(new.sum()),
        },
        "users": len(targets),
        "users_with_list": int(sum(len(t) > 0 for t in topk)),
        "list_length": int(table.groupby(S.USER_ID).size().max()),
        "model_version": manifest.get("model_version"),
        "config": {
            key: manifest.get("config", {}).get(key)
            for key in ("num_candidates", "diversity", "long_tail_boost")
        },
        "source": path,
    }


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
    users = tr[S.USER_ID].to_numpy()
    items = tr[S.ITEM_IDX].to_numpy(np.int64)
    kinds = tr[S.EVENT_IDX].to_numpy(np.int64)
    times = tr[S.TIMESTAMP].to_numpy(np.int64)
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


def cold_start(
    models: dict[str, dict[str, Baseline]],
    held: dict[str, np.ndarray],
    data: EvalData,
    cfg: EvaluateConfig,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Each model with held-out items, ranked against other held-out items the user
    never touched, on two target sets: the valid and test targets that are
    held-out items (one per user and split), and `all_events`: those plus every
    train-split event on a held-out item (`held_out_events`), averaged per user.

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
            split: M.rank_stats(scorer.score_candidates(sub, cand), np.zeros(len(cand), int))
            for split, (sub, cand) in sets.items()
        }
        row: dict[str, Any] = {"held_out_items": int(mask.sum())}
        vt = [stats[s] for s in ("valid", "test") if s in stats]
        if vt:
            merged = M.RankStats(
                *(np.concatenate([getattr(s, f) for s in vt]) for f in ("greater", "ties", "less"))
            )
            per_user["valid_test"][name] = M.ndcg(merged, k)
            row.update(
                {
                    f"hr@{k}": M.mean_defined(M.hit_rate(merged, k)),
                    f"ndcg@{k}": M.mean_defined(per_user["valid_test"][name]),
                    "users": len(merged),
                }
            )
        users = np.concatenate([sub.user_ids for sub, _ in sets.values()])
        ndcg = np.concatenate([M.ndcg(s, k) for s in stats.values()])
        hits = np.concatenate([M.hit_rate(s, k) for s in stats.values()])
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
    test: dict[str, dict[str, M.RankStats]],
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
            f"test_{p}": M.paired_difference(M.ndcg(test[a][p], k), M.ndcg(test[b][p], k))
            for p in PROTOCOLS
        }
        if a in held and b in held and np.array_equal(held[a], held[b]):
            for key, label in (("valid_test", "cold_start"), ("all_events", "cold_start_all")):
                if a in cold[key] and b in cold[key]:
                    row[label] = M.paired_difference(cold[key][a], cold[key][b])
        out[f"{a} - {b}"] = row
    return out


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score every configured method on valid and test; write metrics, report, plots."""
    from ray_app.evaluation.report import write_report

    t0 = time.time()
    data = load_prepared(cfg.prepared)
    bags = _token_bags(data)
    k = cfg.k
    with StagedOutput(cfg.output) as stage:
        cands = {}
        for split in ("valid", "test"):
            cands[split] = sampled_candidates(data, split, cfg.num_negatives, cfg.seed)
            write_candidates(
                stage.path("candidates", f"{split}.parquet"), data.splits[split], cands[split]
            )
        models, info = fit_baselines(cfg, data, cands, bags)
        trained, model_info, held = load_models(cfg, data)
        models.update(trained)
        results: dict[str, Any] = {"valid": {}, "test": {}}
        details: dict[str, Any] = {}
        test_stats: dict[str, dict[str, M.RankStats]] = {}
        for name, chosen in models.items():
            for split in ("valid", "test"):
                per_proto = {}
                for proto in PROTOCOLS:
                    model = chosen[proto]
                    if proto == "full" and model is chosen["sampled"]:
                        per_proto["full"] = per_proto["sampled"]
                        continue
                    res = score_split(model, data.splits[split], cands[split], k)
                    per_proto[proto] = (res, summarize(res, data, k, bags))
                results[split][name] = {
                    **{p: per_proto[p][1][p] for p in PROTOCOLS},
                    "users": len(cands[split]),
                }
                if split == "test":
                    merged = {p: per_proto[p][0][p] for p in PROTOCOLS}
                    test_stats[name] = merged
                    details[name] = breakdowns(merged, data, split, k)
        cold, cold_users = cold_start(models, held, data, cfg)
        lists = {}
        for name, path in cfg.lists.items():
            split, summary = score_lists(data, path, k, bags)
            lists[name] = {"split": split, **summary}
        metrics = {
            "k": k,
            "protocols": {
                "sampled": f"held-out item + {cfg.num_negatives} never-touched items, "
                f"seed {cfg.seed}",
                "full": "held-out item against all items minus the user's earlier items",
            },
            "prepared": cfg.prepared,
            "prepared_run_id": data.manifest.get("run_id"),
            "results": results,
            "breakdowns_test": details,
            "baselines": info,
            "models": model_info,
            "cold_start": cold,
            "lists": lists,
            "paired": paired(cfg.paired, test_stats, cold_users, held, k),
            "num_negatives": cfg.num_negatives,
        }
        manifest = {
            "stage": "evaluate",
            "run_id": stage.run_id,
            "code_version": code_version(),
            "config": dump_config(cfg),
            "timings": {"total_s": round(time.time() - t0, 2)},
        }
        write_report(stage.staging, metrics)
        write_json(stage.path("metrics.json"), metrics)
        stage.publish(manifest)
    return metrics
