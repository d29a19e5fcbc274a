"""The README's demo command: the pipeline on the embedded defaults.

The pipeline itself runs end to end as a Ray job in tests/test_jobs.py; here the
demo's flags must reach the stages they are for, and a bad `--set` must stop
it before any work."""

from __future__ import annotations

import pytest

from ray_app.cli import build_parser, demo_config, main
from ray_app.config import ConfigError
from ray_app.pipeline.run import stage_configs


def _args(*extra: str):
    return build_parser().parse_args(["demo", "--workdir", "/w", *extra])


def test_demo_runs_every_stage_on_generated_data_with_the_bundled_encoder():
    stages = stage_configs(demo_config(_args()))
    assert list(stages) == ["generate", "prepare", "train", "evaluate", "nightly"]
    assert stages["generate"].output == "/w/raw"
    assert stages["prepare"].input.interactions == "/w/raw/interactions"
    assert stages["train"].model.encoder == "default" and stages["train"].prepared == "/w/prepared"
    assert stages["evaluate"].models == {"reranker": "/w/model"}
    # The light evaluate keeps the strongest ID-only baselines and the text-only one.
    assert {"ease", "sasrec_ce", "text_tfidf"} <= set(stages["evaluate"].baselines)
    assert stages["nightly"].model == "/w/model" and stages["nightly"].output == "/w/topk"


def test_demo_flags_and_overrides_reach_their_stage():
    args = _args(
        "--events", "5000", "--encoder", "tiny", "--train-minutes", "0.5",
        "--sasrec-epochs", "2", "--set", "nightly.k=20", "--set", "prepare.split.max_history=9",
    )  # fmt: skip
    s = stage_configs(demo_config(args))
    assert s["generate"].num_events == 5000 and s["train"].model.encoder == "tiny"
    assert s["train"].max_minutes == 0.5 and s["evaluate"].sasrec_epochs == 2
    assert s["nightly"].k == 20 and s["prepare"].split.max_history == 9
    assert s["prepare"].split.method == "time"
    # One tracking key reaches train and evaluate; a stage's own setting wins.
    s = stage_configs(
        demo_config(
            _args(
                "--set", "tracking.mlflow_uri=sqlite:///runs/mlflow.db",
                "--set", "evaluate.tracking.experiment=evals",
            )
        )
    )  # fmt: skip
    assert s["train"].tracking.mlflow_uri == s["evaluate"].tracking.mlflow_uri
    assert s["train"].tracking.mlflow_uri == "sqlite:///runs/mlflow.db"
    assert (s["train"].tracking.experiment, s["evaluate"].tracking.experiment) == (
        "rerank",
        "evals",
    )


def test_demo_splits_the_generated_period_in_time():
    """Valid and test are the last stretches of whatever period generate covers, so the
    test period has items released after training and users coming back to it."""
    from ray_app.times import parse_time

    for extra, days in (((), 180), (("--set", "generate.days=60"), 60)):
        s = stage_configs(demo_config(_args(*extra)))
        start, split = parse_time(s["generate"].start), s["prepare"].split
        assert split.method == "time"
        valid, test = parse_time(split.valid_start), parse_time(split.test_start)
        assert start < valid < test < start + days * 86_400
        assert (test - start) / (days * 86_400) == pytest.approx(0.89, abs=0.01)


def test_a_bad_demo_override_stops_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train\.epochz: unknown key"):
        demo_config(_args("--set", "train.epochz=3"))
    assert main(["demo", "--workdir", str(tmp_path), "--set", "nightly.k=0"]) == 2
    assert "nightly.k" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
