"""A team's cluster shape on one machine: a Ray head that offers no CPUs, a worker
node that has them (both started with `ray start`, by `cluster/local-cluster.sh`),
and every path on an S3-compatible server (moto, on 127.0.0.1). Jobs go in with
`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`, Serve
with `serve deploy`; the faults kill the worker node's processes, not the head."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from ray_app import storage
from tests.conftest import cluster_ports, swap_under_load

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-cluster.sh"
DATE = "2026-11-24"
TINY = ["--set", "model.encoder=tiny"]
# How long a nightly run that lost its worker node may take to fail or finish once the node is
# back (the README states it too).
NIGHTLY_NODE_LOSS_S = 300


class Cluster:
    """`cluster/local-cluster.sh up --two-nodes --s3` and its other steps; the CLI
    (`ray job`, `serve`) is run with the cluster's settings, as a user's shell would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {
            **os.environ,
            "VENV": sys.prefix,
            "CLUSTER_DIR": str(folder),
            "NUM_CPUS": "2",
            **cluster_ports(),
        }
        self.env.pop("RAY_ADDRESS", None)
        # A cluster keeps Ray Train's preemption watcher, which only a local Ray goes without.
        self.env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)
        self.settings: dict[str, str] = {}

    def script(self, *args: str, timeout: float = 240) -> str:
        r = subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, f"local-cluster.sh {args}: {r.stdout}\n{r.stderr}"[-4000:]
        return r.stdout

    def up(self) -> None:
        out = self.script("up", "--two-nodes", "--s3")
        self.settings = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        self.bucket = f"s3://{self.settings['BUCKET']}"

    def cli_env(self) -> dict[str, str]:
        return {
            **self.env,
            **self.settings,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.folder / "auth_token"),
            "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
        }

    def run(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), cwd=ROOT, env=self.cli_env(), capture_output=True, text=True, timeout=timeout
        )

    def submit(
        self, job_id: str, *entrypoint: str, wait: bool = True, install: bool = True
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ...`.

        `install` False ships the working dir without the runtime env's pip step, for
        the jobs whose point is a node's death, not how the package got there: a node
        that comes back has a new session, which would spend most of a minute here
        installing the package again into a new virtualenv (the nodes' own venv has it).
        """
        env = ["--runtime-env", "cluster/runtime_env.yaml"]
        if not install:
            light = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
            light.pop("pip")
            light.pop("working_dir")
            env = ["--runtime-env-json", json.dumps(light)]
        cmd = [
            "ray", "job", "submit", "--submission-id", job_id, "--working-dir", ".", *env,
            *([] if wait else ["--no-wait"]), "--", *entrypoint,
        ]  # fmt: skip
        return self.run(*cmd, timeout=900)

    def api(self, path: str) -> dict:
        """GET from the dashboard's REST API with the cluster's token: what `ray job status`
        and `ray list` ask, without a Python process importing Ray per question (about 2 s
        of CPU each, which the tests' polling loops spent on a 2-core machine)."""
        token = (self.folder / "auth_token").read_text().strip()
        r = requests.get(
            self.settings["DASHBOARD_URL"] + path,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        r.raise_for_status()
        return r.json()

    def state(self, kind: str, query: str = "") -> list[dict]:
        """`ray list <kind> --detail --format json` (the state API behind it)."""
        body = self.api(f"/api/v0/{kind}?limit=10000&detail=true{query}")
        return body["data"]["result"]["result"]

    def job_status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def job_logs(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]

    def wait_job(self, job_id: str, timeout: float) -> tuple[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, self.job_logs(job_id)
            time.sleep(2)
        return "TIMEOUT", self.job_logs(job_id)

    def actors(self) -> list[dict]:
        return self.state("actors")

    def worker_node(self) -> str:
        nodes = self.state("nodes")
        return next(n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"])

    def down(self) -> None:
        self.script("down", timeout=120)


@pytest.fixture(scope="module")
def cluster(s3_server):
    # A short path: Ray's Unix sockets live under it, and those are capped at 107 bytes.
    c = Cluster(Path(tempfile.mkdtemp(prefix="rerank-cluster-", dir="/tmp")))
    try:
        c.up()
        yield c
    finally:
        c.down()
        for log in ("head.log", "worker.log"):
            if (c.folder / log).exists():
                print(f"--- {log}\n" + (c.folder / log).read_text()[-2000:])
        shutil.rmtree(c.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pipeline(cluster):
    """The whole pipeline as one Ray job, every path under s3://<bucket>/pipeline."""
    wd = f"{cluster.bucket}/pipeline"
    r = cluster.submit(
        "pipeline-s3", "python", "jobs/pipeline.py", "--set", f"workdir={wd}",
        "--set", "generate={num_events: 5000, seed: 7}",
        "--set", "train={model: {encoder: tiny}, epochs: 1, shuffle_seed: 1}",
        "--set", "evaluate.baselines=[popularity]",
        "--set", f"nightly={{k: 10, num_candidates: 50, date: '{DATE}'}}",
    )  # fmt: skip
    return wd, r


def test_the_pipeline_job_runs_on_the_worker_node_with_every_path_on_s3(cluster, pipeline):
    wd, r = pipeline
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "succeeded" in out
    for stage in ("raw", "prepared", "model", "evaluation", f"topk/dt={DATE}"):
        if stage != "raw":
            assert storage.is_complete(f"{wd}/{stage}"), stage
            assert storage.live(f"{wd}/{stage}").startswith(f"{wd}/{stage}/_runs/"), stage
    assert storage.read_text(f"{wd}/topk/LATEST").strip() == f"dt={DATE}"
    summary = storage.read_json(f"{wd}/pipeline.json")
    assert list(summary["stages"]) == ["generate", "prepare", "train", "evaluate", "nightly"]
    # Checkpoints went to object storage too (Ray Train's storage_path).
    manifest = storage.require_complete(f"{wd}/model")
    assert manifest["checkpoints"].startswith(f"{wd}/model.runs")
    assert storage.exists(manifest["checkpoints"])
    # Every piece of work that needs a CPU ran on the worker node.
    worker = cluster.worker_node()
    placed = {}
    for a in cluster.actors():
        if not a.get("node_id"):
            continue  # created, then removed before any node took it (Ray Data's pool scaling)
        for kind in ("RayTrainWorker", "TopKActor", "MapWorker"):
            if kind in a["class_name"]:
                placed.setdefault(kind, set()).add(a["node_id"])
    tasks = cluster.state(
        "tasks", "&filter_keys=type&filter_predicates=%3D&filter_values=NORMAL_TASK"
    )
    # Ray Data's V1 Parquet read (storage.ray_parquet), which training and nightly use
    assert any(t["name"].startswith("ReadParquet") for t in tasks), tasks[:3]
    for t in tasks:  # Ray Data's reads, maps, shuffles and writes
        if t.get("node_id"):
            placed.setdefault("Ray Data tasks", set()).add(t["node_id"])
    assert set(placed) == {"RayTrainWorker", "TopKActor", "MapWorker", "Ray Data tasks"}, placed
    assert all(nodes == {worker} for nodes in placed.values()), placed


def _serve_config(cluster, model: str, topk: str, port: int) -> Path:
    path = cluster.folder / "serve.yaml"
    path.write_text(
        json.dumps(
            {
                "proxy_location": "HeadOnly",
                "http_options": {"host": "127.0.0.1", "port": port},
                "applications": [
                    {
                        "name": "rerank",
                        "route_prefix": "/",
                        "import_path": "ray_app.serving.app:build_app",
                        "args": {
                            "model": model,
                            "topk": topk,
                            "num_cpus": 1,
                            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                        },
                    }
                ],
            }
        )
    )
    return path


def _copy_model(src: str, dst: str, version: str) -> None:
    """A second artifact on S3: the live run's files with another version."""
    import pyarrow.fs as pafs

    fs, src_path = storage.resolve(storage.live(src))
    _, dst_path = storage.resolve(dst)
    pafs.copy_files(src_path, dst_path, source_filesystem=fs, destination_filesystem=fs)
    conf = storage.read_json(f"{dst}/config.json")
    conf["version"] = version
    storage.write_json(f"{dst}/config.json", conf)


def test_serve_reads_the_model_and_latest_lists_from_s3_and_swaps_models_without_errors(
    cluster, pipeline
):
    wd, r = pipeline
    assert r.returncode == 0
    port = int(cluster.env["PORT_BASE"]) + 7
    dashboard = cluster.settings["DASHBOARD_URL"]
    deploy = cluster.run(
        "serve", "deploy", "--address", dashboard,
        str(_serve_config(cluster, f"{wd}/model", f"{wd}/topk", port)),
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    lists = storage.read_parquet(storage.live(f"{wd}/topk/dt={DATE}"))
    user = lists["user_id"].iloc[0]
    got = requests.get(f"{url}/v1/users/{user}/recommendations", timeout=30)
    assert got.status_code == 200, got.text
    body = got.json()
    want = lists[lists.user_id == user].sort_values("rank")["item_id"].tolist()
    assert body["partition"] == f"dt={DATE}"
    assert [i["item_id"] for i in body["items"]] == want
    replicas = [a for a in cluster.actors() if a["class_name"].startswith("ServeReplica")]
    assert replicas and {a["node_id"] for a in replicas} == {cluster.worker_node()}

    # A new artifact on S3 goes live through user_config; requests meanwhile all succeed.
    _copy_model(f"{wd}/model", f"{wd}/model-v2", "v2-swapped")

    def send() -> tuple[int, str | None]:
        resp = requests.post(
            f"{url}/v1/rerank",
            json={"user_id": user, "candidates": [{"item_id": want[0]}]},
            timeout=30,
        )
        return resp.status_code, resp.json().get("model_version")

    v2 = str(_serve_config(cluster, f"{wd}/model-v2", f"{wd}/topk", port))
    results, swap = swap_under_load(
        send,
        lambda: cluster.run("serve", "deploy", "--address", dashboard, v2),
        "v2-swapped",
        clients=3,
    )
    assert swap.returncode == 0, swap.stderr[-3000:]
    failures = [x for x in results if x[0] != 200]
    assert not failures, failures[:5]
    assert results[0][1] != "v2-swapped" and results[-1][1] == "v2-swapped"
    cluster.run("serve", "shutdown", "--address", dashboard, "--yes")


def _wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _listing(runs: str):
    import pyarrow.fs as pafs

    fs, path = storage.resolve(runs)
    return fs, fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))


def _checkpoints(runs: str, infos=None) -> list[str]:
    infos = _listing(runs)[1] if infos is None else infos
    return sorted({i.path.split("/")[-2] for i in infos if i.path.endswith("/best.safetensors")})


def _registered_checkpoints(runs: str) -> list[str]:
    """The checkpoints on S3, once Ray Train's controller has registered one, so a worker
    group it restarts gets it: it rewrites `checkpoint_manager_snapshot.json` in the run's
    folder when it does. A checkpoint's files on S3 alone are not that: a kill between
    their upload and the report reaching the controller restarts training from scratch."""
    fs, infos = _listing(runs)
    for i in infos:
        if i.path.endswith("/checkpoint_manager_snapshot.json"):
            with fs.open_input_stream(i.path) as f:
                if json.loads(f.read()).get("latest_checkpoint_result"):
                    return _checkpoints(runs, infos)
    return []


def test_training_resumes_from_its_s3_checkpoint_after_the_worker_node_dies(cluster, pipeline):
    wd, r = pipeline
    assert r.returncode == 0
    out, epochs = f"{wd}/model-killed", 3
    # Small batches: epochs long enough (about 10 s here) that the kill, a second or two
    # after the first checkpoint is registered, lands before the last epoch ends. No ONNX
    # graphs: exporting them is the stage's last step, seconds that show nothing here.
    cluster.submit(
        "train-kill", "python", "jobs/train.py", "--set", f"prepared={wd}/prepared",
        "--set", f"output={out}", *TINY, "--set", f"epochs={epochs}", "--set", "patience=10",
        "--set", "shuffle_seed=1", "--set", "batch_size=64", "--set", "export_onnx=false",
        wait=False, install=False,
    )  # fmt: skip
    first = _wait_for(
        "the first registered checkpoint", lambda: _registered_checkpoints(f"{out}.runs"), 400
    )
    cluster.script("kill-worker")
    killed_after = len(_checkpoints(f"{out}.runs"))
    assert killed_after < epochs, "training ended before the worker node was killed"
    assert cluster.job_status("train-kill") in ("RUNNING", "PENDING")  # the driver is on the head
    cluster.script("start-worker")
    status, logs = cluster.wait_job("train-kill", 600)
    assert status == "SUCCEEDED", logs[-5000:]
    metrics = storage.require_complete(out)["metrics"]
    history = storage.read_json(f"{storage.live(out)}/metrics.json")["history"]
    # Every epoch once, and the step count of an uninterrupted run: the epochs done before
    # the kill were not trained again.
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert metrics["steps"] == epochs * history[0]["step"]
    assert "resumed at epoch" in logs, "\n".join(
        line
        for line in logs.splitlines()
        if any(w in line.lower() for w in ("resum", "restart", "checkpoint", "fail", "epoch 1"))
    )[-6000:]
    assert first and killed_after < epochs


def _started(cluster, kind: str) -> bool:
    """An actor of `kind` being created or running (the state API may show it pending
    until it is gone: the shuffle before it holds the CPUs)."""
    return any(kind in a["class_name"] and a["state"] != "DEAD" for a in cluster.actors())


def test_a_nightly_run_that_loses_its_worker_node_keeps_latest_and_a_rerun_succeeds(
    cluster, pipeline
):
    wd, r = pipeline
    assert r.returncode == 0
    nightly = [
        "python", "jobs/nightly.py", "--set", f"model={wd}/model",
        "--set", f"prepared={wd}/prepared", "--set", f"output={wd}/topk",
        "--set", "k=10", "--set", "num_candidates=50", "--set", "date=2026-11-25",
    ]  # fmt: skip
    cluster.submit("nightly-kill", *nightly, wait=False, install=False)
    _wait_for("the ranking stage", lambda: _started(cluster, "TopKActor"), 300, every=0.5)
    cluster.script("kill-worker")
    assert cluster.job_status("nightly-kill") == "RUNNING"  # no CPUs left: it cannot be done
    assert storage.read_text(f"{wd}/topk/LATEST").strip() == f"dt={DATE}"
    cluster.script("start-worker")
    status, logs = cluster.wait_job("nightly-kill", NIGHTLY_NODE_LOSS_S)
    assert storage.read_text(f"{wd}/topk/LATEST").strip() == (
        "dt=2026-11-25" if status == "SUCCEEDED" else f"dt={DATE}"
    )
    if status != "SUCCEEDED":
        assert status == "FAILED", logs[-3000:]
        assert "nightly dt=2026-11-25" in logs and "LATEST and published lists unchanged" in logs
        rerun = cluster.submit("nightly-rerun", *nightly, install=False)
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
        assert storage.read_text(f"{wd}/topk/LATEST").strip() == "dt=2026-11-25"
    lists = storage.read_parquet(storage.live(f"{wd}/topk/dt=2026-11-25"))
    assert lists.groupby("user_id").size().eq(10).all()
