"""`make cluster-local` start to finish (`cluster/local-cluster.sh`): the cluster
started with `ray start` on 127.0.0.1, the pipeline submitted with `ray job submit
--working-dir .`, its status reported, the cluster stopped. The pipeline's
success on that shape is in test_cluster.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_app import storage
from tests.conftest import cluster_ports

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _submit(args: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "VENV": sys.prefix,
        **cluster_ports(),
        "NUM_CPUS": "2",
        "TMPDIR": "/tmp",
    }
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        ["bash", str(ROOT / "cluster" / "local-cluster.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _head_gone(out: str) -> bool:
    return "local-cluster: Ray head stopped" in out


def test_a_failing_pipeline_job_is_reported_failed_with_its_error(tmp_path, s3_bucket):
    missing = f"{s3_bucket}/no-such-logs"
    r = _submit(
        [
            "--two-nodes", "--s3", "--set", f"workdir={s3_bucket}/wd",
            "--set", f"prepare.input={{interactions: '{missing}', items: '{missing}'}}",
        ],
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "FAILED" in out and _head_gone(out)
    assert "pipeline stage 'prepare' failed" in out and missing in out
    assert not storage.exists(f"{s3_bucket}/wd/prepared")
