"""The nightly top-K job on a local Ray with the session's tiny trained model."""

from __future__ import annotations

import datetime as dt
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ray_app.batch.config import NightlyConfig
from ray_app.batch.nightly import _move_latest, end_of_day, mmr, run_nightly
from ray_app.data import schema as S
from ray_app.errors import describe
from ray_app.evaluation.config import EvaluateConfig
from ray_app.evaluation.evaluate import run_evaluate
from ray_app.model.ranker import Candidate, Event, Query, Ranker
from ray_app.protocol.data import load_prepared
from ray_app.storage import read_parquet
from ray_app.times import day_start
from tests.conftest import FailAtBatch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

K = 10


def _config(prepared: str, model: str, out: Path, **kw) -> NightlyConfig:
    base = {
        "model": model,
        "prepared": prepared,
        "output": str(out),
        "date": "2026-11-23",
        "k": K,
        "num_candidates": 50,
        "batch_size": 64,
    }
    return NightlyConfig.model_validate({**base, **kw})


def _lists(path: Path) -> pd.DataFrame:
    return read_parquet(str(path)).sort_values([S.USER_ID, S.RANK], ignore_index=True)


@pytest.fixture(scope="module")
def nightly(prepared, trained, tmp_path_factory):
    """One published nightly run: (config, result, interactions)."""
    out = tmp_path_factory.mktemp("topk")
    cfg = _config(prepared, trained[0].output, out)
    return cfg, run_nightly(cfg), read_parquet(str(Path(prepared) / "interactions"))


def test_every_user_gets_k_unseen_items_ranked_1_to_k(nightly):
    cfg, result, events = nightly
    part = Path(cfg.output) / "dt=2026-11-23"
    assert (part / "_SUCCESS").is_file() and (part / "manifest.json").is_file()
    assert (Path(cfg.output) / "LATEST").read_text().strip() == "dt=2026-11-23"
    files = list(part.glob("*.parquet"))
    assert files and all(pq.read_schema(f).equals(S.TOPK_SCHEMA) for f in files)
    lists = _lists(part)
    users = events[S.USER_ID].unique()
    assert set(lists[S.USER_ID]) == set(users)
    assert result["counts"] == {"rows": len(users) * K, "users": len(users)}
    per_user = lists.groupby(S.USER_ID)
    assert (per_user.size() == K).all()
    assert (per_user[S.RANK].apply(list).map(lambda r: r == list(range(1, K + 1)))).all()
    # Best first: scores never rise down a list.
    assert (per_user[S.SCORE].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 0)))).all()
    seen = events.groupby(S.USER_ID)[S.ITEM_ID].apply(set)
    listed = per_user[S.ITEM_ID].apply(set)
    assert all(not (listed[u] & seen[u]) for u in users)
    assert (lists[S.MODEL_VERSION] == result["model_version"]).all()


def test_scores_are_the_ones_the_online_ranker_gives(nightly):
    cfg, _, events = nightly
    lists = _lists(Path(cfg.output) / "dt=2026-11-23")
    ranker = Ranker.from_path(cfg.model)
    names = {v: k for k, v in ranker.events.items()}
    queries, expected = [], []
    for user in sorted(lists[S.USER_ID].unique())[:20]:
        ev = events[events[S.USER_ID] == user]
        mine = lists[lists[S.USER_ID] == user]
        history = [
            Event(i, int(t), names[int(e)])
            for i, t, e in zip(ev[S.ITEM_ID], ev[S.TIMESTAMP], ev[S.EVENT_IDX], strict=True)
        ]
        # The candidates in another order: the ranker must give them back in the list's.
        cands = [Candidate(c) for c in mine[S.ITEM_ID][::-1]]
        queries.append(Query(history, cands, now=end_of_day("2026-11-23")))
        expected.append(list(zip(mine[S.ITEM_ID], mine[S.SCORE], strict=True)))
    for got, want in zip(ranker.score(queries), expected, strict=True):
        assert [i for i, _ in got.items] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got.items], [s for _, s in want], atol=1e-5)


def test_rerun_of_a_date_is_idempotent_and_leaves_no_staging(nightly):
    cfg, first, _ = nightly
    before = _lists(Path(cfg.output) / "dt=2026-11-23")
    again = run_nightly(cfg)
    assert again["run_id"] != first["run_id"]
    pd.testing.assert_frame_equal(_lists(Path(cfg.output) / "dt=2026-11-23"), before)
    assert not [p for p in Path(cfg.output).iterdir() if p.name.startswith(".")]


def test_a_run_that_dies_half_way_leaves_latest_and_the_last_lists(nightly, tmp_path):
    cfg, _, _ = nightly
    root = Path(cfg.output)
    before = _lists(root / "dt=2026-11-23")
    broken = cfg.model_copy(update={"date": "2026-11-24"})
    with pytest.raises(Exception, match="injected failure") as failed:
        run_nightly(broken, on_batch=FailAtBatch(2))
    # What the CLI prints: the actor's own error, where it was raised, not Ray's wrapper.
    told = describe(failed.value)
    assert re.search(r"RuntimeError: injected failure at batch \d+", told), told
    assert "UDF" not in told, told
    assert re.search(r"\(at \S+conftest\.py:\d+ in __call__\)", told), told  # the raising hook
    assert (root / "LATEST").read_text().strip() == "dt=2026-11-23"
    assert not (root / "dt=2026-11-24").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".dt=2026-11-24.staging")]
    pd.testing.assert_frame_equal(_lists(root / "dt=2026-11-23"), before)
    # The next good run of that date publishes it, moves LATEST and clears the debris.
    run_nightly(broken)
    assert (root / "LATEST").read_text().strip() == "dt=2026-11-24"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    # A backfill of an older date does not roll LATEST back; a backtest never moves it.
    assert not _move_latest(str(root), "dt=2026-11-20", "now")
    assert not _move_latest(str(root), "dt=2026-11-25", "test")
    assert (root / "LATEST").read_text().strip() == "dt=2026-11-24"


def _intra_list_similarity(root: Path, model: str, k: int = 10) -> float:
    """Mean pairwise cosine similarity within each top-k list of the item vectors
    centred on the catalogue's mean (what MMR spreads the lists over)."""
    from ray_app.model.artifact import load_artifact

    art = load_artifact(model)
    lists = read_parquet(str(root / "dt=2026-11-23"))
    top = lists[lists[S.RANK] <= k].sort_values([S.USER_ID, S.RANK])
    idx = top[S.ITEM_ID].map(art.item_index).to_numpy().reshape(-1, k)
    vectors = art.item_vectors - art.item_vectors[1:].mean(0)
    v = torch.nn.functional.normalize(vectors[torch.from_numpy(idx)], dim=-1)
    sim = v @ v.transpose(1, 2)
    off = ~torch.eye(k, dtype=torch.bool)
    return float(sim[:, off].mean())


def test_a_run_for_a_past_date_sees_only_the_events_up_to_that_day(prepared, trained, tmp_path):
    import pyarrow.dataset as pads

    model, date = trained[0].output, "2024-03-15"
    until = end_of_day(date)
    # The same prepare output without the events after that day, as its night had it.
    cut = tmp_path / "prepared"
    shutil.copytree(prepared, cut)
    events = pads.dataset(str(cut / "interactions"), format="parquet").to_table()
    shutil.rmtree(cut / "interactions")
    (cut / "interactions").mkdir()
    early = events.filter(pc.field(S.TIMESTAMP) <= until)
    pq.write_table(early, cut / "interactions" / "part-00000.parquet")
    later_users = set(events[S.USER_ID].to_pylist()) - set(early[S.USER_ID].to_pylist())
    assert len(early) < len(events) and later_users  # the cut removes events and users
    run_nightly(_config(prepared, model, tmp_path / "full", date=date, explain_top=3))
    run_nightly(_config(str(cut), model, tmp_path / "cut", date=date))
    full = _lists(tmp_path / "full" / f"dt={date}")
    cut_lists = _lists(tmp_path / "cut" / f"dt={date}")
    pd.testing.assert_frame_equal(full[list(cut_lists.columns)], cut_lists)
    # explain_top: each listed item names at most 3 items of the user's history up to
    # that day, the largest weight first.
    seen = early.to_pandas().groupby(S.USER_ID)[S.ITEM_ID].agg(set)
    for user, why in zip(full[S.USER_ID], full[S.BECAUSE], strict=True):
        names = [b[S.ITEM_ID] for b in why]
        weights = [b["weight"] for b in why]
        assert 1 <= len(names) <= 3 and set(names) <= seen[user]
        assert all(0 <= w <= 1 for w in weights) and weights == sorted(weights, reverse=True)
    # A user whose first event comes after that day has no list for it.
    assert set(full[S.USER_ID]) == set(early[S.USER_ID].to_pylist())
    assert not set(full[S.USER_ID]) & later_users


@pytest.fixture(scope="module")
def backtests(prepared, trained, tmp_path_factory) -> Path:
    """Three backtests of the session's model (lists as of the night before each user's test
    target) under one folder: `exact` (the whole catalogue re-ranked), `retrieved` (200
    candidates) and `diverse` (the same candidates, MMR 0.5)."""
    root = tmp_path_factory.mktemp("backtests")
    model = trained[0].output
    for name, kw in (
        ("exact", {"num_candidates": 0}),
        ("retrieved", {"num_candidates": 200}),
        ("diverse", {"num_candidates": 200, "diversity": 0.5}),
    ):
        run_nightly(_config(prepared, model, root / name, as_of="test", **kw))
    return root


def test_a_backtest_list_is_what_the_night_before_the_target_published(
    prepared, trained, backtests, tmp_path
):
    model = trained[0].output
    targets = load_prepared(prepared).splits["test"]
    days, counts = np.unique(day_start(targets.target_times), return_counts=True)
    day = int(days[np.argmax(counts)])
    users = set(targets.user_ids[day_start(targets.target_times) == day])
    before = dt.datetime.fromtimestamp(day - 1, dt.timezone.utc).date().isoformat()
    run_nightly(_config(prepared, model, tmp_path / "night", date=before, num_candidates=200))
    backtest = _lists(backtests / "retrieved" / "dt=2026-11-23")
    night = _lists(tmp_path / "night" / f"dt={before}")
    mine = backtest[backtest[S.USER_ID].isin(users)].reset_index(drop=True)
    theirs = night[night[S.USER_ID].isin(users)].reset_index(drop=True)
    assert len(users) >= 2 and set(mine[S.USER_ID]) == users
    assert (mine[S.ITEM_ID] == theirs[S.ITEM_ID]).all()
    np.testing.assert_allclose(mine[S.SCORE], theirs[S.SCORE], atol=1e-5)


def test_backtest_lists_score_what_the_evaluation_computes_for_the_model(
    prepared, trained, backtests, tmp_path
):
    model = trained[0].output
    # As of the night before each user's test target, the whole catalogue re-ranked:
    # the lists are the model's top-k that the evaluation's backtest ranks with.
    assert not (backtests / "exact" / "LATEST").exists()  # a backtest never moves LATEST
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        models={"model": model},
        deltas=[],
        lists={
            name: str(backtests / name / "dt=2026-11-23")
            for name in ("exact", "retrieved", "diverse")
        },
    )
    metrics = run_evaluate(ev)
    lists = metrics["lists"]
    assert lists["exact"]["split"] == "test"
    backtest = metrics["backtest"]["test"]
    # Every test user has a list, those whose history before the target's day is
    # empty too, and the lists score what the evaluation's backtest of the model does.
    assert lists["exact"]["users_with_list"] == lists["exact"]["users"]
    assert backtest["model"]["empty_history"]["users"] > 0
    for part in ("all", "with_history", "empty_history"):
        for key in ("recall@10", "ndcg@10"):
            got, want = backtest["exact"][part][key], backtest["model"][part][key]
            assert got == pytest.approx(want, abs=1e-9), (part, key)
    # Baselines give users with an empty history the popularity list.
    assert backtest["popularity"]["empty_history"]["ndcg@10"] > 0
    # Retrieval keeps most of it; MMR trades accuracy for more varied lists.
    assert backtest["retrieved"]["all"]["ndcg@10"] >= 0.8 * backtest["exact"]["all"]["ndcg@10"] > 0
    # MMR on the same candidates: top-10 lists less alike in the item vectors it
    # spreads over, an effect the evaluation's metrics show.
    similarity = {name: _intra_list_similarity(backtests / name, model) for name in lists}
    assert similarity["diverse"] < similarity["retrieved"] - 0.1, similarity
    diverse_full, plain = lists["diverse"]["full"], lists["retrieved"]["full"]
    assert diverse_full["diversity@10"] > plain["diversity@10"]
    assert diverse_full["coverage@10"] > plain["coverage@10"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Precomputed top-K lists" in report and "## Nightly backtest" in report


def test_lists_made_as_of_now_are_not_scored_against_a_split(nightly, prepared, tmp_path):
    cfg, _, _ = nightly
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        lists={"now": str(Path(cfg.output) / "dt=2026-11-23")},
    )
    with pytest.raises(ValueError, match="as_of='now'"):
        run_evaluate(ev)
    assert not (tmp_path / "eval").exists()


def test_mmr_trades_relevance_for_dissimilar_items():
    torch.manual_seed(0)
    # Two near-duplicate best items and a different third one.
    vecs = torch.tensor([[[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.7, 0.7]]])
    scores = torch.tensor([[3.0, 2.9, 2.0, -math.inf]])
    assert mmr(scores, vecs, 3, 0.0)[0].tolist() == [0, 1, 2]
    assert mmr(scores, vecs, 3, 0.5)[0].tolist() == [0, 2, 1]
    # The -inf candidate is never listed; a list runs out with -1.
    assert mmr(scores, vecs, 4, 0.5)[0].tolist()[-1] == -1
