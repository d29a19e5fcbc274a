"""The pipeline as a Ray job on a real local head (`cluster/local-cluster.sh`):
`ray start --head` on 127.0.0.1, `ray job submit --working-dir .`, the head
stopped afterwards — what users do on a cluster, on small generated data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _free_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (the script uses both)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def _submit(config: dict, tmp: Path) -> subprocess.CompletedProcess:
    cfg = tmp / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "VENV": sys.prefix,
        "GCS_PORT": str(_free_pair()),
        "DASHBOARD_PORT": str(_free_pair()),
        "NUM_CPUS": "2",
        "TMPDIR": "/tmp",
    }
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        ["bash", str(ROOT / "cluster" / "local-cluster.sh"), "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _head_gone(out: str) -> bool:
    return "local-cluster: Ray head stopped" in out


def test_pipeline_job_succeeds_and_publishes_every_stage(tmp_path):
    wd = tmp_path / "wd"
    config = {
        "workdir": str(wd),
        "generate": {"num_events": 5000},
        "train": {"model": {"encoder": "tiny"}, "epochs": 1, "max_minutes": 0.5},
        "evaluate": {"baselines": ["popularity"]},
        "nightly": {"k": 10, "num_candidates": 50, "date": "2026-11-24"},
    }
    r = _submit(config, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "SUCCEEDED" in out and _head_gone(out)
    for stage in ("prepared", "model", "evaluation", "topk/dt=2026-11-24"):
        assert (wd / stage / "_SUCCESS").exists(), stage
    assert (wd / "topk" / "LATEST").read_text().strip().endswith("dt=2026-11-24")
    summary = json.loads((wd / "pipeline.json").read_text())
    assert list(summary["stages"]) == ["generate", "prepare", "train", "evaluate", "nightly"]
    nightly = summary["stages"]["nightly"]
    assert nightly["counts"]["rows"] == 10 * nightly["counts"]["users"] > 0


def test_a_failing_pipeline_job_is_reported_failed_with_its_error(tmp_path):
    missing = tmp_path / "no-such-logs"
    config = {
        "workdir": str(tmp_path / "wd"),
        "prepare": {"input": {"interactions": str(missing), "items": str(missing)}},
    }
    r = _submit(config, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "FAILED" in out and _head_gone(out)
    assert "pipeline stage 'prepare' failed" in out and str(missing) in out
    assert not (tmp_path / "wd" / "model").exists()
