"""Ray Train fine-tuning of a tiny re-ranker on generated data.

One model is trained per test session (`trained`); tests that change
training (failure injection, resuming) copy its run or start their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ray_app.errors import describe
from ray_app.model.artifact import load_artifact, save_artifact
from ray_app.protocol import metrics as M
from ray_app.protocol.data import load_prepared
from ray_app.protocol.scorer import NetScorer
from ray_app.protocol.scoring import sampled_candidates, score_split
from ray_app.training.inputs import cold_start_items
from ray_app.training.trainer import run_train, train_dataset
from tests.conftest import BATCH, EPOCHS, FailAtStep, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _valid_ndcg(prepared: str, artifact_path: str) -> tuple[float, np.ndarray]:
    data = load_prepared(prepared)
    art = load_artifact(artifact_path)
    cands = sampled_candidates(data, "valid", 99, seed=0)
    res = score_split(NetScorer(art.model, art.item_vectors), data.splits["valid"], cands, 10)
    scores = NetScorer(art.model, art.item_vectors).score_targets(data.splits["valid"])
    return float(M.ndcg(res["sampled"], 10).mean()), scores


def test_trained_model_ranks_far_above_random(prepared, trained):
    cfg, metrics = trained
    ndcg, _ = _valid_ndcg(prepared, cfg.output)
    # A random order puts the target in the top 10 of 100 a tenth of the time:
    # expected NDCG@10 = sum_{r<=10} 1/log2(r+1) / 100 = 0.045.
    assert ndcg > 0.25, ndcg
    history = metrics["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(h["samples_per_s"] > 0 for h in history)
    assert metrics["steps"] == EPOCHS * (metrics["train_examples"] // BATCH)


def test_artifact_holds_everything_and_reloads_to_identical_scores(prepared, trained, tmp_path):
    cfg, _ = trained
    out = Path(cfg.output)
    for name in (
        "config.json",
        "model.safetensors",
        "item_embeddings.safetensors",
        "items.parquet",
        "metrics.json",
        "manifest.json",
        "_SUCCESS",
        "encoder/config.json",
        "encoder/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pkl"))
    art = load_artifact(cfg.output)
    manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    assert art.event_index == {e: i + 1 for i, e in enumerate(manifest["resolved"]["event_types"])}
    # The stored item table is what the stored weights compute.
    torch.testing.assert_close(art.model.item_table(), art.item_vectors)
    _, first = _valid_ndcg(prepared, cfg.output)
    save_artifact(
        tmp_path / "copy",
        art.model,
        art.tokenizer,
        art.items.iloc[1:],
        art.metrics,
        art.version,
        art.config["encoder"],
        event_types=art.config["event_types"],
        text_max_length=art.config["text_max_length"],
    )
    (tmp_path / "copy" / "manifest.json").write_text("{}\n")
    (tmp_path / "copy" / "_SUCCESS").write_text("x\n")
    _, again = _valid_ndcg(prepared, str(tmp_path / "copy"))
    np.testing.assert_array_equal(first, again)


def test_a_worker_failure_is_recovered_from_the_last_checkpoint(prepared, tmp_path):
    cfg = tiny_config(prepared, tmp_path, epochs=1, checkpoint_every_steps=5, max_failures=1)
    metrics = run_train(cfg, callbacks=[FailAtStep(7, tmp_path / "runs" / ".train.failed-once")])
    assert (tmp_path / "runs" / ".train.failed-once").exists()  # it did fail once
    assert metrics["steps"] == metrics["train_examples"] // BATCH > 7
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["history"][-1]["step"] == metrics["steps"]


def test_failure_beyond_max_failures_stops_with_the_error(prepared, tmp_path, monkeypatch):
    # Relative paths, as in `rerank train --config cluster/configs/...`: the
    # workers, which run elsewhere, must still find the data (they reach the
    # injected failure only after loading it).
    shutil.copytree(prepared, tmp_path / "prepared")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("prepared", Path("."), epochs=1, max_failures=0)
    with pytest.raises(Exception, match="injected failure") as failed:
        run_train(cfg, callbacks=[FailAtStep(2, tmp_path / "runs" / ".train.failed-once")])
    assert not (tmp_path / "model").exists()  # nothing published
    # What the CLI prints: the worker's own error, not Ray Train's wrapper.
    assert describe(failed.value).startswith("RuntimeError: injected failure at step 2")


def test_a_new_run_pointed_at_an_old_run_resumes(prepared, trained, tmp_path):
    cfg, first = trained
    shutil.copytree(cfg.storage_path, tmp_path / "runs")
    more = tiny_config(prepared, tmp_path, epochs=EPOCHS + 1)
    metrics = run_train(more)
    assert len(metrics["history"]) == EPOCHS + 1
    # The first epochs come from the old run's checkpoint, not from training again.
    assert metrics["history"][:EPOCHS] == first["history"]
    assert metrics["steps"] == (EPOCHS + 1) * (metrics["train_examples"] // BATCH)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["config"]["epochs"] == EPOCHS + 1


def test_cold_start_items_are_removed_from_training(prepared, ray_local, tmp_path):
    cfg = tiny_config(prepared, tmp_path, cold_start_fraction=0.2)
    data = load_prepared(prepared)
    hidden = cold_start_items(data.items["item_id"].to_numpy(), 0.2, cfg.seed)
    assert 0.1 < hidden[1:].mean() < 0.3
    np.testing.assert_array_equal(
        hidden, cold_start_items(data.items["item_id"].to_numpy(), 0.2, 0)
    )
    ds, rows = train_dataset(cfg, hidden)
    targets = np.concatenate([b["target_item_idx"] for b in ds.iter_batches(batch_format="numpy")])
    every = pd.read_parquet(Path(prepared) / "examples" / "train", columns=["target_item_idx"])
    kept = ~hidden[every["target_item_idx"].to_numpy()]
    assert 0 < len(targets) == rows == kept.sum() < len(every)
    assert not hidden[targets].any()
