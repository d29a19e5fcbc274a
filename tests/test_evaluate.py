"""The evaluate stage on a small prepared synthetic data set."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_app.config import load_config
from ray_app.evaluation.config import EvaluateConfig
from ray_app.evaluation.evaluate import run_evaluate
from ray_app.evaluation.report import headline_text
from ray_app.model.artifact import load_artifact
from ray_app.protocol import metrics as M
from ray_app.protocol.data import load_prepared, sample_users
from ray_app.protocol.scorer import NetScorer
from ray_app.protocol.scoring import sampled_candidates, score_split
from ray_app.times import parse_duration
from ray_app.training.inputs import returning_moments

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_candidates_exclude_everything_the_user_touched(prepared):
    data = load_prepared(prepared)
    cand = sampled_candidates(data, "test", 50, seed=1)
    t = data.splits["test"]
    assert cand.shape == (len(t), 51)
    assert (cand[:, 0] == t.targets).all()
    for u, row in zip(t.user_ids, cand, strict=True):
        assert len(set(row[1:])) == 50
        assert not set(row[1:]) & set(data.user_items[u])
        assert row.min() >= 1 and row.max() <= data.num_items
    assert (cand == sampled_candidates(data, "test", 50, seed=1)).all()
    assert not (cand == sampled_candidates(data, "test", 50, seed=2)).all()
    # Full history before the test target = train + valid events, in time order.
    v = data.splits["valid"]
    i = 0
    assert len(t.histories[i]) == len(v.histories[i]) + 1
    assert t.histories[i][-1] == v.targets[i]


def test_evaluate_writes_metrics_report_plots_and_baselines_beat_random(prepared, tmp_path):
    cfg = load_config(
        EvaluateConfig,
        None,
        [
            f"prepared={prepared}",
            f"output={tmp_path / 'eval'}",
            "sasrec_epochs=20",
            "ease_lambdas=[10, 100]",
            "knn_neighbours=[10, 50]",
        ],
    )
    metrics = run_evaluate(cfg)
    out = tmp_path / "eval"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(metrics["results"]))
    for name in (
        "report.md",
        "metrics_by_method.png",
        "ndcg_by_history.png",
        "ndcg_by_popularity.png",
        "_SUCCESS",
    ):
        assert (out / name).exists(), name
    cand = pq.read_table(out / "candidates" / "test.parquet").to_pandas()
    assert cand["candidates"].map(len).eq(100).all()
    random_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / 100
    test = metrics["results"]["test"]
    assert set(test) == {"popularity", "item_knn", "ease", "sasrec", "sasrec_ce", "text_tfidf"}
    for name, r in test.items():
        assert r["sampled"]["ndcg@10"] > 2 * random_ndcg, name
        assert 0 < r["full"]["coverage@10"] <= 1
    # Personal models use the topic signal that popularity ignores.
    assert test["ease"]["full"]["ndcg@10"] > test["popularity"]["full"]["ndcg@10"]
    ease = metrics["baselines"]["ease"]
    assert set(ease["valid_ndcg_search"]) == {"10.0", "100.0"}
    for proto in ("sampled", "full"):  # the value with the best valid NDCG for that protocol
        best = max(ease["valid_ndcg_search"], key=lambda lam: ease["valid_ndcg_search"][lam][proto])
        assert ease["params"][proto]["lam"] == float(best)
    assert "| ease |" in (out / "report.md").read_text()
    # SASRec+ (full-softmax CE) is a fitted, validated baseline of its own.
    ce = metrics["baselines"]["sasrec_ce"]["params"]["full"]
    assert ce["loss"] == "ce" and 1 <= ce["epochs_trained"] <= 20
    text = metrics["baselines"]["text_tfidf"]
    assert set(text["valid_ndcg_search"]) == {"1", "3", "10", "30"}


def test_sasrecs_fitted_side_by_side_are_the_models_fitted_in_turn(prepared, tmp_path):
    """Each variant fits in a process of its own and comes back whole: the same epoch
    chosen and the same scores as the same fit in this process, on as many threads."""
    import torch

    from ray_app.evaluation.evaluate import _token_bags, fit_sasrec, sasrec_fits

    data = load_prepared(prepared)
    cands = sampled_candidates(data, "valid", 20, seed=0)
    bags = _token_bags(data)
    names = ["sasrec", "sasrec_ce"]
    overrides = [f"prepared={prepared}", f"output={tmp_path}", "sasrec_epochs=6"]
    side = load_config(EvaluateConfig, None, [*overrides, "fit_processes=2"])
    with sasrec_fits(side, data, cands, bags, names) as futures:
        apart = {name: f.result()[0] for name, f in futures.items()}
    threads = torch.get_num_threads()
    try:
        for name in names:
            here, _ = fit_sasrec(name, side, data, cands, bags, threads=1)
            there = apart[name]
            assert there.params == here.params
            hist = data.splits["test"].histories[:50]
            np.testing.assert_allclose(there.score_all(hist), here.score_all(hist), rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_text_baseline_ranks_by_shared_words_even_items_no_one_has_met():
    """Items 1 and 2 share words, 3 shares none; 4 is in no training event but shares
    item 1's words: the text-only baseline ranks 2 and 4 above 3."""
    import pandas as pd
    import scipy.sparse as sp

    from ray_app.data import schema as S
    from ray_app.evaluation.baselines import TextSimilarity

    bags = sp.csr_matrix(
        np.array(
            [
                [0, 0, 0, 0, 0],  # padding
                [1, 1, 0, 0, 1],
                [1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 1, 0, 0, 1],
            ],
            dtype=np.float32,
        )
    )
    train = pd.DataFrame({S.USER_ID: ["u", "v"], S.ITEM_IDX: [1, 3]})
    model = TextSimilarity(bags=bags, recent=3).fit(train, num_items=4)
    (scores,) = model.score_all([np.array([1])])
    assert scores[0] == -np.inf
    assert scores[2] > scores[3] and scores[4] > scores[3] and scores[4] > 0
    # Only the last `recent` items make the profile.
    (last,) = model.with_recent(1).score_all([np.array([1, 3])])
    assert last[3] > last[2]


def test_a_trained_model_is_scored_beside_the_baselines(prepared, trained, tmp_path):
    cfg, train_metrics = trained
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        models={"tiny": cfg.output},
        paired=[("tiny", "popularity"), ("tiny", "tiny")],
    )
    metrics = run_evaluate(ev)
    for split in ("valid", "test"):
        assert set(metrics["results"][split]) == {"popularity", "tiny"}
    valid = metrics["results"]["valid"]["tiny"]
    # The artifact scores valid as the training run did when it selected its epoch
    # (each user at its drawn moment of the returning-user curve). Not equal:
    # training reads a float16 cache of the frozen layers, the artifact's table
    # comes from the whole encoder in float32, and with this few validation users
    # one user whose target moves a rank shifts NDCG by ~0.01.
    best = train_metrics["history"][train_metrics["best_epoch"] - 1]
    data = load_prepared(prepared)
    art = load_artifact(cfg.output)
    drawn = returning_moments(data.splits["valid"], [parse_duration(d) for d in cfg.select_deltas])
    cands = sampled_candidates(data, "valid", cfg.valid_negatives, 0)
    res = score_split(NetScorer(art.model, art.item_vectors), drawn, cands, 10, lists=False)
    for proto in ("full", "sampled"):
        assert float(M.ndcg(res[proto], 10).mean()) == pytest.approx(
            best[f"valid_ndcg_{proto}_returning@10"], rel=0.15
        )
    assert valid["full"]["ndcg@10"] > 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| tiny |" in report and "## Trained models" in report
    assert metrics["models"]["tiny"]["artifact"] == cfg.output
    vs_pop = metrics["paired"]["tiny - popularity"]["test_full"]
    test = metrics["results"]["test"]
    gap = test["tiny"]["full"]["ndcg@10"] - test["popularity"]["full"]["ndcg@10"]
    assert vs_pop["diff"] == pytest.approx(gap) and vs_pop["se"] > 0
    assert vs_pop["users"] == test["tiny"]["users"]
    same = metrics["paired"]["tiny - tiny"]["test_sampled"]
    assert same["diff"] == 0 and same["se"] == 0
    assert "## Paired comparisons" in report and "| tiny - popularity |" in report
    # The demo's closing summary: the same comparison, per segment, in plain text.
    head = metrics["headline"]["segments"]
    assert set(head) == {"all", "new_items", "returning_users"}
    assert head["all"]["versus"]["tiny - popularity"]["diff"] == pytest.approx(vs_pop["diff"])
    assert head["all"]["targets"] == test["tiny"]["users"]
    assert head["returning_users"]["targets"] < head["all"]["targets"]
    text = headline_text(metrics)
    assert "tiny - popularity" in text and "all targets: tiny is " in text
    with pytest.raises(ValueError, match=r"paired names \['nope'\]"):
        EvaluateConfig(**{**ev.model_dump(), "paired": [("tiny", "nope")]})


def test_every_event_on_a_held_out_item_is_a_cold_target_with_its_past(prepared):
    import numpy as np

    from ray_app.evaluation.evaluate import held_out_events
    from ray_app.training.inputs import cold_start_items

    data = load_prepared(prepared)
    mask = cold_start_items(data.items["item_id"].to_numpy(), 0.2, 0)
    t = held_out_events(data, mask)
    train = data.train
    on_held = mask[train["item_idx"].to_numpy()]
    firsts = ~train["user_id"].duplicated().to_numpy()
    assert len(t) == (on_held & ~firsts).sum() > len(data.splits["test"])
    assert mask[t.targets].all()
    # A target's history is every earlier train event of that user, in order.
    for i in (0, len(t) // 2, len(t) - 1):
        events = train[train["user_id"] == t.user_ids[i]]
        pos = len(t.histories[i])
        assert pos >= 1
        assert events["item_idx"].iloc[pos] == t.targets[i]
        np.testing.assert_array_equal(events["item_idx"].to_numpy()[:pos], t.histories[i])
        np.testing.assert_array_equal(events["timestamp"].to_numpy()[:pos], t.history_times[i])
        assert t.target_times[i] == events["timestamp"].iloc[pos]


def test_a_cold_start_model_is_scored_on_held_out_items(prepared, trained, tmp_path):
    import numpy as np

    from ray_app.model.artifact import load_artifact
    from ray_app.protocol.scorer import NetScorer
    from ray_app.training.trainer import run_train
    from tests.conftest import tiny_config

    cold_cfg = tiny_config(prepared, tmp_path / "cold", epochs=1, cold_start_fraction=0.2)
    run_train(cold_cfg)
    # Scoring only the candidates gives the whole catalogue's scores at those columns.
    art = load_artifact(trained[0].output)
    scorer = NetScorer(art.model, art.item_vectors)
    data = load_prepared(prepared)
    t = data.splits["test"].subset(slice(0, 40))
    cand = sampled_candidates(data, "test", 20, seed=0, targets=t)
    np.testing.assert_allclose(
        scorer.score_candidates(t, cand),
        np.take_along_axis(scorer.score_targets(t), cand, 1),
        rtol=1e-5,
        atol=1e-5,
    )
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        models={"cold": cold_cfg.output, "warm": trained[0].output},
        num_negatives=20,  # 60 held-out items to sample from
        paired=[("cold", "cold"), ("cold", "warm")],
    )
    metrics = run_evaluate(ev)
    assert set(metrics["cold_start"]) == {"cold"}  # only a model that held items out
    cold = metrics["cold_start"]["cold"]
    every = cold["all_events"]
    assert every["events"] > cold["users"] and every["users"] <= len(data.splits["test"])
    random_ndcg = sum(1 / math.log2(r + 1) for r in range(1, 11)) / 21
    # Text alone ranks items the model never trained on above random. (1.05: one epoch of
    # the tiny model gave 0.236 against random's 0.216 in a CI run; the margin is thin.)
    assert every["ndcg@10"] > 1.05 * random_ndcg
    # Warm: every other valid and test target, the ratio's denominator.
    n = len(data.splits["valid"]) + len(data.splits["test"])
    assert cold["warm"]["users"] + cold["users"] == n and cold["warm"]["ndcg@10"] > 0
    same = metrics["paired"]["cold - cold"]
    assert same["cold_start_all"]["diff"] == 0 and same["cold_start_all"]["users"] == every["users"]
    assert "cold_start" not in metrics["paired"]["cold - warm"]  # different held-out items
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "every event" in report and "held-out / warm" in report


def _without_time_input(art, folder):
    """The trained artifact's model with `recency_buckets: 1` (no time input), saved."""
    from ray_app.model.artifact import save_artifact
    from ray_app.model.net import RerankerNet

    cfg = art.model.cfg.model_copy(update={"recency_buckets": 1})
    model = RerankerNet(cfg, art.model.num_items, art.model.text)
    time_tables = ("user.recency.", "user.since_last.", "user.to_last.")
    weights = {k: v for k, v in art.model.state_dict().items() if not k.startswith(time_tables)}
    model.load_state_dict(weights, strict=False)
    model.set_text_table(art.model.text_table)
    model.items.known.copy_(art.model.items.known)
    save_artifact(
        folder,
        model,
        art.tokenizer,
        art.items.iloc[1:],
        art.metrics,
        art.version + "-untimed",
        art.config["encoder"],
        event_types=art.config["event_types"],
        text_max_length=art.config["text_max_length"],
    )
    (folder / "manifest.json").write_text("{}\n")
    (folder / "_SUCCESS").write_text("x\n")
    return model


def test_returning_users_a_model_without_time_input_scores_the_same_at_every_delta(
    prepared, trained, tmp_path
):
    import numpy as np

    from ray_app.model.artifact import load_artifact
    from ray_app.protocol.scorer import NetScorer

    art = load_artifact(trained[0].output)
    untimed = _without_time_input(art, tmp_path / "untimed")
    data = load_prepared(prepared)
    t = data.splits["test"]
    deltas = {"Δ=0": 0, "Δ=1h": 3600, "Δ=1d": 86_400, "Δ=7d": 7 * 86_400, "Δ=30d": 30 * 86_400}
    # Every gap to the moment of scoring is >= 0, and Δ moves that moment.
    for secs in deltas.values():
        later = t.after_last_event(secs)
        pairs = zip(later.moments, later.history_times, strict=True)
        assert all((m - h >= 0).all() for m, h in pairs)
    flat = NetScorer(untimed, untimed.item_table())
    timed = NetScorer(art.model, art.item_vectors)
    at_target = flat.score_targets(t)
    moved = []
    for secs in deltas.values():
        np.testing.assert_array_equal(flat.score_targets(t.after_last_event(secs)), at_target)
        later = timed.score_targets(t.after_last_event(secs))[:, 1:]
        moved.append(np.abs(later - timed.score_targets(t)[:, 1:]).max())
    assert max(moved) > 1e-3  # the time input does move scores
    # The evaluate stage reports the same: flat lines for it, and for the baselines.
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity", "ease"],
        ease_lambdas=[100],
        models={"timed": trained[0].output, "untimed": str(tmp_path / "untimed")},
    )
    metrics = run_evaluate(ev)
    mom = metrics["moments"]
    assert list(mom["deltas_s"]) == list(deltas) and mom["deltas_s"]["Δ=7d"] == 7 * 86_400
    for split in ("valid", "test"):
        for name in ("untimed", "popularity", "ease"):
            row = mom["results"][split][name]
            for proto in ("sampled", "full"):
                values = {m: row[m][proto]["ndcg@10"] for m in row}
                assert len(values) == 6 and len(set(values.values())) == 1, (name, values)
        timed_row = mom["results"][split]["timed"]
        assert len({timed_row[m]["full"]["ndcg@10"] for m in timed_row}) > 1
    assert mom["uses_time"] == {"popularity": False, "ease": False, "timed": True, "untimed": True}
    assert (tmp_path / "eval" / "ndcg_by_delta.png").is_file()
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Returning users" in report and "by the real gap" in report
    # Against the best baseline in every column, with a 95% interval around the mean.
    vs = metrics["versus_best_baseline"]["timed"]
    for col in ("full@target", "full@Δ=30d", "sampled@Δ=1d", "backtest"):
        lo, hi = vs[col]["ci95"]
        assert vs[col]["baseline"] in ("popularity", "ease") and lo <= vs[col]["diff"] <= hi
    test = metrics["results"]["test"]
    best = max(("popularity", "ease"), key=lambda b: test[b]["full"]["ndcg@10"])
    assert vs["full@target"]["baseline"] == best
    assert vs["full@target"]["diff"] == pytest.approx(
        test["timed"]["full"]["ndcg@10"] - test[best]["full"]["ndcg@10"]
    )


def test_returning_users_real_gaps_and_backtest_histories(prepared):
    import numpy as np

    from ray_app.protocol.scoring import NO_EARLIER_EVENT, gap_labels
    from ray_app.times import day_start

    t = load_prepared(prepared).splits["test"]
    gap = t.target_times - t.last_event_times()
    labels = gap_labels(t)
    assert set(labels[gap < 3600]) == {"< 1 h"} and set(labels[gap >= 7 * 86_400]) <= {"> 7 d"}
    assert NO_EARLIER_EVENT not in set(labels)  # prepare gives every target a history
    cut = t.as_of_previous_day()
    midnight = day_start(t.target_times)
    assert (cut.moments == midnight - 1).all()
    for i in range(len(t)):
        n = len(cut.histories[i])
        np.testing.assert_array_equal(cut.histories[i], t.histories[i][:n])
        assert (cut.history_times[i] < midnight[i]).all()
        assert (t.history_times[i][n:] >= midnight[i]).all()
    assert (~cut.has_history).any() and cut.has_history.any()


def test_training_sees_the_nightly_moment_exactly_as_the_backtest_scores_it(prepared):
    """`nightly_fraction` rows are what the nightly job and its backtest give the model:
    the same kept events, gaps to the same moment, empty histories included."""
    import numpy as np

    from ray_app.storage import join, parquet_dataset
    from ray_app.training.batches import to_examples

    length = 50
    t = load_prepared(prepared).splits["test"]
    cut = t.as_of_previous_day()
    table = parquet_dataset(join(prepared, "examples", "test")).to_table()
    row = {u: i for i, u in enumerate(t.user_ids)}
    order = [row[u] for u in table.column("user_id").to_pylist()]
    picked = np.arange(table.num_rows) % 2 == 0
    ex = to_examples(table, length, 0, None, picked)
    whole = to_examples(table, length, 0)
    for r, i in enumerate(order):
        items, gaps = ex.hist.items[r].numpy(), ex.hist.gaps[r].numpy()
        if not picked[r]:
            np.testing.assert_array_equal(items, whole.hist.items[r].numpy())
            continue
        # The examples hold the last `length` events before the target; the cut keeps those
        # before the target's day, the newest of what the nightly run sees.
        n = int((items > 0).sum())
        assert (items[: length - n] == 0).all() and n <= len(cut.histories[i])
        window = whole.hist.gaps[r][whole.hist.items[r] > 0].numpy()
        assert n == int((window >= t.target_times[i] - cut.moments[i]).sum())
        np.testing.assert_array_equal(items[length - n :], cut.histories[i][-n:] if n else [])
        want = cut.moments[i] - cut.history_times[i][-n:] if n else []
        np.testing.assert_array_equal(gaps[length - n :], want)
    assert picked[[r for r, i in enumerate(order) if not cut.has_history[i]]].any()


def test_a_user_sample_keeps_the_same_users_in_every_split_and_all_training_events(prepared):
    data = load_prepared(prepared)
    n = len(data.splits["test"])
    small = sample_users(data, n // 2, seed=3)
    test, valid = small.splits["test"], small.splits["valid"]
    assert len(test) == n // 2
    assert set(valid.user_ids) == set(test.user_ids)
    assert len(small.train) == len(data.train)
    whole = data.splits["test"]
    row = {u: i for i, u in enumerate(whole.user_ids)}
    for u, target, hist in zip(test.user_ids, test.targets, test.histories, strict=True):
        assert whole.targets[row[u]] == target
        assert (hist == whole.histories[row[u]]).all()
    again = sample_users(data, n // 2, seed=3).splits["test"].user_ids
    assert (again == test.user_ids).all()
    assert set(sample_users(data, n // 2, seed=4).splits["test"].user_ids) != set(test.user_ids)
    assert sample_users(data, None, seed=3) is data


def test_train_and_evaluate_runs_read_back_from_mlflow(prepared, trained, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg, train_metrics = trained
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        models={"tiny": cfg.output},
        tracking=cfg.tracking,
    )
    metrics = run_evaluate(ev)
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    exp = client.get_experiment_by_name("tests")
    runs = {r.data.tags["rerank.stage"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"train", "evaluate"}
    train = runs["train"]
    assert train.info.status == "FINISHED"
    # The resolved config, dotted.
    assert train.data.params["model.encoder"] == "tiny"
    assert train.data.params["model.dim"] == "32"
    assert train.data.params["batch_size"] == str(cfg.batch_size)
    assert train.data.params["artifact"] == cfg.output
    assert train.data.tags["rerank.artifact"] == cfg.output
    # One point per epoch of every per-epoch metric.
    history = train_metrics["history"]
    loss = client.get_metric_history(train.info.run_id, "loss")
    assert [m.step for m in loss] == [e["epoch"] for e in history]
    assert [m.value for m in loss] == pytest.approx([e["loss"] for e in history])
    best = f"best_valid_{cfg.select_metric}@{cfg.k}".replace("@", "_at_")
    assert train.data.metrics[best] == pytest.approx(train_metrics[best.replace("_at_", "@")])
    # Evaluate's metrics table.
    got = runs["evaluate"].data.metrics
    for method in ("popularity", "tiny"):
        want = metrics["results"]["test"][method]["full"]["ndcg@10"]
        assert got[f"test.{method}.full.ndcg_at_10"] == pytest.approx(want)
