"""The `train` stage on the driver: data, the TorchTrainer, the model artifact."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_app import tracking
from ray_app.data import schema
from ray_app.runtime import ensure_ray, use_gpus
from ray_app.storage import (
    StagedOutput,
    absolute,
    exists,
    expand_paths,
    join,
    live,
    ray_parquet,
    remove,
    require_complete,
    upload_dir,
)
from ray_app.training.config import TrainConfig

if TYPE_CHECKING:
    from ray_app.training.loop import StepCallback

logger = logging.getLogger(__name__)


def storage_uri(cfg: TrainConfig) -> str:
    return absolute(cfg.storage_path)


def for_workers(cfg: TrainConfig) -> TrainConfig:
    """The config with local paths made absolute: Ray Train workers do not run in the
    driver's working directory, so `prepared: runs/x` would name nothing there."""
    return cfg.model_copy(
        update={
            "prepared": absolute(cfg.prepared),
            "output": absolute(cfg.output),
            "storage": storage_uri(cfg),
        }
    )


# Parquet examples grow about 5x once decoded (list columns); a set is kept in
# the object store when that fits in this share of it.
CACHE_SHARE = 0.3
DECODED_GROWTH = 5


def _fits_object_store(cfg: TrainConfig, parquet_bytes: int) -> bool:
    import ray

    if cfg.cache_examples != "auto":
        return bool(cfg.cache_examples)
    store = ray.cluster_resources().get("object_store_memory", 0)
    return parquet_bytes * DECODED_GROWTH <= CACHE_SHARE * store


def train_dataset(cfg: TrainConfig, hidden: np.ndarray | None):
    """Training examples as a Ray Dataset shuffled anew each epoch, and their count.

    Cold-start targets are removed. A set that fits the object store is read once
    and kept there, so an epoch starts with an in-memory reshuffle instead of
    reading and shuffling from storage again, time in which the workers wait for
    their first batch (the README's training benchmark has the figures).
    """
    examples = join(live(cfg.prepared), "examples", "train")
    fs, files = expand_paths(examples)
    cols = [
        schema.HIST_ITEM_IDX,
        schema.HIST_EVENT_IDX,
        schema.HIST_GAP,
        schema.TARGET_ITEM_IDX,
        schema.TARGET_TIMESTAMP,
        schema.NEGATIVES,
    ]
    ds = ray_parquet([f.path for f in files], fs, cols)
    if cfg.shuffle_seed is not None:
        # A seeded shuffle permutes the blocks in the order it gets them, and a
        # materialized set otherwise holds them in the order its read tasks finished.
        # (This dataset's own copy of the DataContext: nothing else is slowed.)
        ds.context.execution_options.preserve_order = True
    if hidden is not None:
        held = pa.array(np.flatnonzero(hidden).astype(np.int32))

        def drop_held_out(batch: pa.Table) -> pa.Table:
            return batch.filter(pc.invert(pc.is_in(batch[schema.TARGET_ITEM_IDX], value_set=held)))

        ds = ds.map_batches(drop_held_out, batch_format="pyarrow")
    if _fits_object_store(cfg, sum(f.size for f in files)):
        ds = ds.materialize()
    return ds.random_shuffle(seed=cfg.shuffle_seed), ds.count()


def _data_config(cfg: TrainConfig) -> Any:
    """Ray Train's ingest options: Ray Data's defaults, and the order kept when the shuffle
    is seeded (otherwise blocks reach a worker in the order they finish)."""
    from ray.train import DataConfig

    if cfg.shuffle_seed is None:
        return DataConfig()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def build_trainer(cfg: TrainConfig, datasets: dict[str, Any], loop_config: dict[str, Any]):
    """The one place that turns the config into ScalingConfig/RunConfig/TorchTrainer."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_app.training.loop import train_loop_per_worker

    gpu = use_gpus(cfg.use_gpu)
    cpus = ray.cluster_resources().get("CPU", 0)
    wanted = cfg.num_workers * cfg.cpus_per_worker
    local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))  # a cluster may scale up
    if local and wanted >= cpus:
        raise ValueError(
            f"num_workers x cpus_per_worker = {wanted} would reserve all {cpus:g} CPUs of "
            "the cluster and leave none for Ray Data to feed the workers; reserve fewer "
            "(torch_threads sets how many threads each worker uses)"
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=bool(gpu),
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_uri(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        datasets=datasets,
        dataset_config=_data_config(cfg),
    )


def _fit(
    cfg: TrainConfig, hidden: np.ndarray, callbacks: Sequence[StepCallback]
) -> tuple[Any, int]:
    """Ray Train's run over the training examples (cold-start items removed); returns its
    result and how many examples an epoch had."""
    ds, rows = train_dataset(cfg, hidden if hidden.any() else None)
    steps = rows // (cfg.batch_size * cfg.num_workers)
    if steps == 0:
        raise ValueError(
            f"{rows} training examples give no full batch of {cfg.batch_size} per worker "
            f"x {cfg.num_workers} workers: lower batch_size"
        )
    logger.info("training on %d examples, %d steps per epoch", rows, steps)
    trainer = build_trainer(
        cfg,
        {"train": ds},
        {
            "train": for_workers(cfg).model_dump(mode="json"),
            "steps_per_epoch": steps,
            "callbacks": list(callbacks),
        },
    )
    return trainer.fit(), rows


def _best_model(checkpoint: Any, data: Any, prep_manifest: dict[str, Any], seed: int):
    """The best epoch's network from the last checkpoint, LoRA merged and its item text
    table computed: what the artifact holds. Returns (model, tokenizer, progress, the
    resolved config)."""
    import torch

    from ray_app.training.batches import ItemText
    from ray_app.training.checkpoint import BEST, load_weights, read_state
    from ray_app.training.inputs import item_token_ids
    from ray_app.training.steps import build_model

    with checkpoint.as_directory() as d:
        progress, resolved = read_state(Path(d))
        best = load_weights(Path(d) / BEST)
    resolved_cfg = TrainConfig.model_validate(resolved)
    model, tokenizer = build_model(resolved_cfg.model, data.num_items, seed)
    model.load_state_dict(best)
    if model.text is not None:
        if resolved_cfg.model.lora_rank:
            model.text.merge_lora()
        text = ItemText(item_token_ids(data, prep_manifest, resolved_cfg.model.encoder))
        model.set_text_table(text.pooled(model.text, torch.device("cpu")))
    return model, tokenizer, progress, resolved_cfg


def run_train(cfg: TrainConfig, callbacks: Sequence[StepCallback] = ()) -> dict[str, Any]:
    """Fine-tune with Ray Train, then build and publish the model artifact. `callbacks`
    (picklable) are called by every worker after each step."""
    from ray_app import plots
    from ray_app.model.artifact import from_prepare_manifest, save_artifact
    from ray_app.protocol.data import load_prepared
    from ray_app.training.inputs import cold_start_items

    t0 = time.time()
    tracking.check(cfg.tracking)
    prep_manifest = require_complete(cfg.prepared)
    ensure_ray(cfg.ray)
    run_dir = join(storage_uri(cfg), cfg.run_name)
    if not cfg.resume and exists(run_dir):
        logger.info("resume=false: removing the previous run in %s", run_dir)
        remove(run_dir)
    data = load_prepared(cfg.prepared)
    hidden = cold_start_items(
        data.items[schema.ITEM_ID].to_numpy(), cfg.cold_start_fraction, cfg.seed
    )
    result, rows = _fit(cfg, hidden, callbacks)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {run_dir})")
    model, tokenizer, progress, resolved_cfg = _best_model(
        result.checkpoint, data, prep_manifest, cfg.seed
    )
    metrics = {
        "history": progress.history,
        "best_epoch": progress.best_epoch,
        f"best_valid_{cfg.select_metric}@{cfg.k}": progress.best,
        "stopped": progress.stopped or "all epochs done",
        "steps": progress.step,
        "train_examples": rows,
        "cold_start_items": int(hidden.sum()),
    }
    with StagedOutput(cfg.output) as stage:
        with tempfile.TemporaryDirectory() as tmp:
            save_artifact(
                Path(tmp),
                model,
                tokenizer,
                data.items.iloc[1:],
                metrics,
                stage.run_id,
                resolved_cfg.model.encoder,
                held_out=hidden,
                export_onnx=cfg.export_onnx,
                **from_prepare_manifest(prep_manifest),
            )
            if progress.history:
                (Path(tmp) / "training_curves.png").write_bytes(
                    plots.save_png(plots.training_curves(progress.history), dpi=100)
                )
            upload_dir(tmp, stage.staging)
        stage.publish(
            stage.manifest(
                "train",
                resolved_cfg,
                t0,
                prepared=cfg.prepared,
                prepared_run_id=prep_manifest.get("run_id"),
                checkpoints=run_dir,
                metrics={k: v for k, v in metrics.items() if k != "history"},
            )
        )
    logger.info("published model %s to %s", stage.run_id, cfg.output)
    tracking.log_run(
        cfg.tracking,
        "train",
        tracking.run_label("train", cfg.output, stage.run_id),
        {**resolved_cfg.model_dump(mode="json"), "artifact": str(cfg.output)},
        {k: v for k, v in metrics.items() if k not in ("history", "stopped")},
        [(int(e.get("epoch", i + 1)), e) for i, e in enumerate(progress.history)],
        {"rerank.artifact": str(cfg.output), "rerank.model_version": str(stage.run_id)},
    )
    return metrics
