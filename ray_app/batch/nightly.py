"""The nightly job: every user's top-K from the whole catalogue, published as Parquet.

    rerank nightly --set model=runs/demo/model --set prepared=runs/demo/prepared \\
                   --set output=runs/demo/topk --date 2026-11-23

Ray Data reads the prepared interactions and gathers each user's events in
time order (`groupby(user_id).map_groups`); an actor pool of `TopKActor`
(the model loaded once per actor, as the same `Ranker` that serves
`/v1/rerank`) retrieves candidates with the user vector against the item
table, re-ranks them with the full model and keeps the best K. The lists go
to a staging directory, are published as `dt=<date>` with `_SUCCESS`, and
only then does `LATEST` move to them: a run that dies half-way leaves the
previous lists and `LATEST` as they were.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from ray_app.batch.config import NightlyConfig
from ray_app.data import schema
from ray_app.errors import describe
from ray_app.model.ranker import Ranker
from ray_app.runtime import cluster_cpus, ensure_ray, use_gpus
from ray_app.storage import (
    StagedOutput,
    absolute,
    exists,
    join,
    parquet_dataset,
    published,
    ray_parquet,
    read_text,
    resolve,
    write_text_atomic,
)
from ray_app.times import day_start, end_of_day

logger = logging.getLogger(__name__)

# One row per user, what `user_events` hands to the ranking actors.
NOW = "now"  # when recency is measured to; 0 = the run's time
HIST_TIME = "hist_time"
USER_ROWS = pa.schema(
    [
        pa.field(schema.USER_ID, pa.string()),
        pa.field(schema.HIST_ITEM_IDX, pa.list_(pa.int32())),
        pa.field(schema.HIST_EVENT_IDX, pa.list_(pa.int8())),
        pa.field(HIST_TIME, pa.list_(pa.int64())),
        pa.field(NOW, pa.int64()),
    ]
)
# Users x retrieved candidates scored in one forward pass, which bounds the
# attention tensor's memory.
MAX_CELLS = 1 << 19


def partition_name(date: str) -> str:
    return f"dt={date}"


def user_events(group: pa.Table, as_of: str, until: int) -> pa.Table:
    """One user's events (any order) -> one row: their history in time order.

    `as_of: now`: the events up to `until` (the end of the run's day), so a run
    for a past date sees what that night's run saw; a user with none yet gets
    no row. `as_of: valid/test` (a backtest): what the nightly run of the UTC
    day before the user's first event of that split knew, the events before
    that day's 00:00 with recency to the end of the day before, which is the
    list the user would have been shown when that target happened; the row is
    kept even when that history is empty.
    """
    order = pc.sort_indices(
        group,
        [
            (schema.TIMESTAMP, "ascending"),
            (schema.SOURCE_FILE, "ascending"),
            (schema.SOURCE_ROW, "ascending"),
        ],
    )
    g = group.take(order)
    times = g[schema.TIMESTAMP].to_numpy()
    if as_of == "now":
        n, now = int(np.searchsorted(times, until, side="right")), 0
        if n == 0:
            return USER_ROWS.empty_table()
    else:
        hits = np.flatnonzero(pc.equal(g[schema.SPLIT], as_of).to_numpy(zero_copy_only=False))
        if not len(hits):
            return USER_ROWS.empty_table()
        midnight = int(day_start(times[hits[0]]))
        n, now = int(np.searchsorted(times, midnight, side="left")), midnight - 1

    def head(col: str, typ: pa.DataType) -> pa.Array:
        return pa.array([g[col].slice(0, n).to_numpy()], pa.list_(typ))

    return pa.Table.from_arrays(
        [
            pa.array([g[schema.USER_ID][0].as_py()], pa.string()),
            head(schema.ITEM_IDX, pa.int32()),
            head(schema.EVENT_IDX, pa.int8()),
            head(schema.TIMESTAMP, pa.int64()),
            pa.array([now], pa.int64()),
        ],
        schema=USER_ROWS,
    )


@dataclass(frozen=True)
class ListOptions:
    """How a list is made, from `NightlyConfig`."""

    k: int
    num_candidates: int
    diversity: float = 0.0
    now: int = 0  # for users whose row carries none
    explain_top: int = 0

    @classmethod
    def from_config(cls, cfg: NightlyConfig, now: int) -> ListOptions:
        return cls(cfg.k, cfg.num_candidates, cfg.diversity, now, cfg.explain_top)


def _lists(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def mmr(scores: torch.Tensor, vectors: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """Maximal marginal relevance: (B, k) positions into each row's candidates.

    Each step takes the candidate with the best (1 - weight) x relevance (the
    score, min-max scaled per user) - weight x its largest cosine similarity to
    the items already taken. -inf scores are never taken (position -1 once a
    user has none left). Pass vectors centred on the catalogue's mean: learned
    item vectors share a common direction (raw cosines of 0.95+ between any
    two items), which would leave the similarity term nearly constant.
    """
    ok = torch.isfinite(scores)
    lo = torch.where(ok, scores, torch.inf).min(1, keepdim=True).values
    hi = torch.where(ok, scores, -torch.inf).max(1, keepdim=True).values
    rel = (scores - lo) / (hi - lo).clamp(min=1e-12)
    v = F.normalize(vectors, dim=-1)
    most_similar = torch.zeros_like(scores)
    rows = torch.arange(len(scores), device=scores.device)
    picks = []
    for _ in range(min(k, scores.shape[1])):
        obj = ((1 - weight) * rel - weight * most_similar).masked_fill(~ok, -torch.inf)
        j = obj.argmax(1)
        none_left = ~torch.isfinite(obj[rows, j])
        picks.append(j.masked_fill(none_left, -1))
        ok[rows, j] = False
        sim = (v * v[rows, j].unsqueeze(1)).sum(-1)
        most_similar = torch.maximum(most_similar, sim)
    return torch.stack(picks, 1)


def top_k(
    ranker: Ranker,
    users: pa.Table,
    opts: ListOptions,
    boost: torch.Tensor | None = None,
) -> pa.Table:
    """USER_ROWS -> TOPK_SCHEMA rows: each user's best `k` unseen items, best first.

    The scores are `Ranker.score_rows` (or, for the whole catalogue,
    `score_catalogue`) of the user's history and the candidates, the very
    scores `/v1/rerank` returns for them; `boost` (per
    item_idx) and `diversity` change the order only, never the score column.
    """
    items = _lists(users[schema.HIST_ITEM_IDX])
    events = _lists(users[schema.HIST_EVENT_IDX])
    times = _lists(users[HIST_TIME])
    now = users[NOW].to_numpy()
    now = np.where(now > 0, now, opts.now)
    hist = ranker.history_input(items, events, times, now)
    total = len(ranker.vectors) - 1
    if opts.num_candidates:
        cand_items = ranker.retrieve(hist, opts.num_candidates, items)
        scores = torch.cat(
            [
                ranker.score_rows(hist[lo:hi], cand_items[lo:hi])
                for lo, hi in _spans(len(items), max(1, MAX_CELLS // max(1, cand_items.shape[1])))
            ]
        ).float()
    else:
        cand_items = torch.arange(1, total + 1).expand(len(items), -1).clone()
        for b, seen in enumerate(items):
            cand_items[b, torch.from_numpy(seen[seen > 0] - 1)] = 0
        cand_items = cand_items.to(ranker.device)
        scores = ranker.score_catalogue(hist)[:, 1:].float()
    scores = scores.masked_fill(cand_items == 0, -torch.inf)
    ordered = scores if boost is None else scores + boost.to(scores.device)[cand_items]
    if opts.diversity > 0:
        pos = mmr(ordered, ranker.vectors[cand_items] - ranker.vector_mean, opts.k, opts.diversity)
    else:
        top = ordered.topk(min(opts.k, ordered.shape[1]), dim=1)
        pos = top.indices.masked_fill(~torch.isfinite(top.values), -1)
    keep = (pos >= 0).cpu().numpy()
    pos = pos.clamp(min=0)
    idx = cand_items.gather(1, pos).cpu().numpy()
    sc = scores.gather(1, pos).cpu().numpy()
    n = keep.sum(1)
    ranks = np.broadcast_to(np.arange(1, pos.shape[1] + 1, dtype=np.int32), keep.shape)
    out = pa.Table.from_arrays(
        [
            pa.array(
                np.repeat(users[schema.USER_ID].to_numpy(zero_copy_only=False), n), pa.string()
            ),
            pa.array(ranks[keep], pa.int32()),
            pa.array(ranker.item_ids[idx[keep]], pa.string()),
            pa.array(sc[keep].astype(np.float32), pa.float32()),
            pa.array([ranker.version] * int(n.sum()), pa.string()),
        ],
        schema=schema.TOPK_SCHEMA,
    )
    if opts.explain_top:
        out = out.append_column(schema.BECAUSE_FIELD, _because(ranker, hist, idx, keep, opts))
    return out


def _because(
    ranker: Ranker, hist: Any, idx: np.ndarray, keep: np.ndarray, opts: ListOptions
) -> pa.Array:
    """The `because` column of the listed rows (user by user, rank by rank): the history
    items each listed item's score attended to most, as `/v1/rerank` explains."""
    rows = []
    for lo, hi in _spans(len(idx), max(1, MAX_CELLS // max(1, idx.shape[1]))):
        cand = ranker.vectors[torch.from_numpy(idx[lo:hi]).to(ranker.device)]
        _, att = ranker.model.explain(hist[lo:hi], cand)
        att = att.float().cpu().numpy()
        items = hist.items[lo:hi].cpu().numpy()
        for b in range(hi - lo):
            why = ranker.explanations(items[b], att[b][keep[lo + b]], opts.explain_top)
            rows += [[{schema.ITEM_ID: i, "weight": w} for i, w in w_] for w_ in why]
    return pa.array(rows, schema.BECAUSE_FIELD.type)


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


class TopKActor:
    """`map_batches` actor: the model is loaded once, then every batch of users becomes
    their top-K rows. `on_batch` (picklable) is called with each batch's number first:
    a hook to watch a run or, in the tests, to make it fail half-way."""

    def __init__(
        self,
        model: str,
        opts: ListOptions,
        boost: np.ndarray | None = None,
        torch_threads: int = 1,
        device: str = "cpu",
        on_batch: Callable[[int], None] | None = None,
        registered: dict[str, np.ndarray] | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.ranker = Ranker.from_path(model, device=device)
        self.ranker.extend(registered or {})
        self.opts = opts
        if boost is not None and len(boost) < len(self.ranker.vectors):
            # A registered item has no events yet: the long tail's full boost.
            top = float(boost.max()) if len(boost) else 0.0
            boost = np.concatenate([boost, np.full(len(self.ranker.vectors) - len(boost), top)])
        self.boost = None if boost is None else torch.from_numpy(boost).float()
        self.on_batch = on_batch
        self.batches = 0

    def __call__(self, users: pa.Table) -> pa.Table:
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(self.batches)
        return top_k(self.ranker, users, self.opts, self.boost)


def popularity_boost(ds: Any, num_items: int, weight: float) -> np.ndarray:
    """weight x (1 - popularity percentile) per item_idx, from train-split events."""

    def train_items(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.equal(batch[schema.SPLIT], "train")).select([schema.ITEM_IDX])

    counts = np.zeros(num_items + 1)
    agg = ds.map_batches(train_items, batch_format="pyarrow").groupby(schema.ITEM_IDX).count()
    df = agg.to_pandas()
    counts[df[schema.ITEM_IDX].to_numpy()] = df.iloc[:, 1].to_numpy()
    pct = np.argsort(np.argsort(counts[1:], kind="stable"), kind="stable") / max(1, num_items - 1)
    out = np.zeros(num_items + 1, dtype=np.float32)
    out[1:] = weight * (1.0 - pct)
    return out


def read_latest(root: str) -> str | None:
    latest = join(root, schema.TOPK_LATEST)
    return read_text(latest).strip() if exists(latest) else None


def _partitions(fs: Any, path: str) -> int:
    """Groups of users for the shuffle: about 64 MB of Parquet events each, at least one
    per CPU. Ray Data's default (200) gives a small data set 200 tiny blocks, and the
    actors then spend their time on per-task overhead."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    size = sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)
    return int(min(1000, max(cluster_cpus(), -(-size // (64 << 20)))))


def _actors(cfg: NightlyConfig, gpu: bool) -> Any:
    """The actor pool: `concurrency` if set, else from 1 up to one per GPU (or per CPU).

    Starting at one leaves CPUs to the shuffle that gathers each user's events
    (a pool started at full size on a small machine held every CPU while that
    shuffle waited for one); Ray Data grows the pool once rows arrive.
    """
    import ray
    from ray.data import ActorPoolStrategy

    if cfg.concurrency:
        return ActorPoolStrategy(size=cfg.concurrency)
    if gpu:
        most = int(ray.cluster_resources().get("GPU", 1))
    else:
        most = int(cluster_cpus() // cfg.cpus_per_actor)
    return ActorPoolStrategy(min_size=1, max_size=max(1, most))


class NightlyError(RuntimeError):
    """The ranking pipeline failed; nothing was published (the message says why)."""


def _write_lists(
    cfg: NightlyConfig,
    staging: str,
    model: str,
    prepared: str,
    num_items: int,
    opts: ListOptions,
    actors: Any,
    gpu: bool,
    on_batch: Callable[[int], None] | None,
    registered: dict[str, np.ndarray] | None = None,
) -> str | None:
    """The Ray Data pipeline, written to `staging`: None, or what went wrong.

    The error comes back as text, not raised, and is then cut loose from its
    tracebacks: Ray Data frees a failed pipeline's actors (and their CPUs)
    only when nothing refers to its executor any more, and the frames of its
    scheduling thread do, through the error's context. Ray Data logs that
    error object, so a log handler that keeps records (pytest keeps every
    one) held them, and the next run in the same process (a retry, a
    notebook, the tests) found the cluster short of CPUs and waited forever.
    """
    fs, path = resolve(join(prepared, "interactions"))
    cols = [
        schema.USER_ID,
        schema.ITEM_IDX,
        schema.EVENT_IDX,
        schema.TIMESTAMP,
        schema.SPLIT,
        schema.SOURCE_FILE,
        schema.SOURCE_ROW,
    ]
    events = ray_parquet(path, fs, cols)
    boost = None
    if cfg.long_tail_boost > 0:
        boost = popularity_boost(events, num_items, cfg.long_tail_boost)
    users = events.groupby(schema.USER_ID, num_partitions=_partitions(fs, path)).map_groups(
        user_events, fn_args=(cfg.as_of, opts.now), batch_format="pyarrow"
    )
    lists = users.map_batches(
        TopKActor,
        fn_constructor_kwargs={
            "model": model,
            "opts": opts,
            "boost": boost,
            "torch_threads": cfg.torch_threads,
            "device": "cuda" if gpu else "cpu",
            "on_batch": on_batch,
            "registered": registered,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=actors,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if gpu else 0,
    )
    out_fs, out_path = resolve(staging)
    try:
        lists.write_parquet(out_path, filesystem=out_fs)
    except Exception as e:
        logger.error("nightly ranking failed; nothing published\n%s", traceback.format_exc())
        message = describe(e)
        _detach(e)
        return message
    return None


def _detach(exc: BaseException) -> None:
    """Cut `exc` and every exception chained to it loose from their tracebacks and
    from each other, once they have been turned into text."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        e.__traceback__ = e.__cause__ = e.__context__ = None


def run_nightly(
    cfg: NightlyConfig, on_batch: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Rank every user, publish `dt=<date>` atomically, then move `LATEST` to it.
    `on_batch` goes to every ranking actor (see `TopKActor`)."""
    t0 = time.time()
    date = cfg.date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    # Resolved once: the driver and every actor read the same published runs.
    model, _ = published(absolute(cfg.model))
    prepared, prep_manifest = published(absolute(cfg.prepared))
    ensure_ray(cfg.ray)
    from ray_app.model.artifact import load_artifact

    art = load_artifact(model)
    gpu = use_gpus(cfg.use_gpu)
    opts = ListOptions.from_config(cfg, end_of_day(date))
    actors = _actors(cfg, gpu)
    registered = _registered(cfg, art)
    name = partition_name(date)
    with StagedOutput(join(cfg.output, name)) as stage:
        error = _write_lists(
            cfg,
            stage.staging,
            model,
            prepared,
            art.model.num_items,
            opts,
            actors,
            gpu,
            on_batch,
            registered,
        )
        if error is None:
            counts = _count(stage.staging)
            if counts["rows"] == 0:
                error = f"no lists were produced from {cfg.prepared} (as_of={cfg.as_of}): no users"
        if error is not None:
            gc.collect()  # the failed pipeline's actors go now, not at some later collection
            raise NightlyError(f"nightly {name}: {error}; LATEST and published lists unchanged")
        manifest = stage.manifest(
            "nightly",
            cfg,
            t0,
            date=date,
            as_of=cfg.as_of,
            history_cut="end_of_date" if cfg.as_of == "now" else "day_before_target",
            model=cfg.model,
            model_version=art.version,
            prepared=cfg.prepared,
            prepared_run_id=prep_manifest.get("run_id"),
            counts=counts,
            actors={"min": actors.min_size, "max": actors.max_size},
            registered_items=len(registered),
            device="cuda" if gpu else "cpu",
        )
        stage.publish(manifest)
    moved = _move_latest(cfg.output, name, cfg.as_of)
    logger.info(
        "published %d lists (%d rows) to %s%s",
        counts["users"],
        counts["rows"],
        join(cfg.output, name),
        "; LATEST points to it" if moved else "",
    )
    return {**manifest, "latest": read_latest(cfg.output), "output": join(cfg.output, name)}


def _registered(cfg: NightlyConfig, art: Any) -> dict[str, np.ndarray]:
    """The registered items' vectors for this model version (new items, and trained ones
    registered with `replace`), read once here for every actor."""
    if cfg.items is None:
        return {}
    from ray_app.model.catalogue import Catalogue, make_item_store

    ranker = Ranker(art, text_encoder=cfg.text_encoder)
    catalogue = Catalogue(make_item_store(cfg.items))
    encoded = catalogue.load(ranker)
    logger.info(
        "%d registered items (%d encoded now for %s)", len(catalogue.vectors), encoded, ranker.space
    )
    return dict(catalogue.vectors)


def _count(uri: str) -> dict[str, int]:
    ds = parquet_dataset(uri)
    return {"rows": ds.count_rows(), "users": ds.count_rows(filter=pc.field(schema.RANK) == 1)}


def _move_latest(root: str, name: str, as_of: str) -> bool:
    """Point LATEST at `name` unless it names a later date already (a backfill of an
    older date does not roll serving back); backtests never move it."""
    if as_of != "now":
        return False
    current = read_latest(root)
    if current is not None and current > name:
        logger.info("LATEST stays at %s (later than %s)", current, name)
        return False
    write_text_atomic(join(root, schema.TOPK_LATEST), name + "\n")
    return True
