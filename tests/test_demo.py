"""The README's demo command, on a small generated data set."""

from __future__ import annotations

import json

import pytest

from ray_app.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_runs_every_stage_and_publishes(ray_local, tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--workdir",
            str(tmp_path),
            "--events",
            "5000",
            "--sasrec-epochs",
            "2",
            "--encoder",
            "tiny",
            "--train-minutes",
            "0.5",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| ease |" in out and "| reranker |" in out and "report and plots:" in out
    assert (tmp_path / "model" / "_SUCCESS").exists()
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["counts"]["interactions"]["read"] == 5000
    for name in ("_SUCCESS", "metrics.json", "report.md", "metrics_by_method.png"):
        assert (tmp_path / "evaluation" / name).exists(), name
