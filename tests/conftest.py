"""Shared fixtures: one local Ray per test session, small data written per test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `ensure_ray` sets them for the local Ray a stage starts (the session's Ray below is
# started here, and its workers inherit this process's environment): idle OpenMP threads
# sleep instead of spinning on cores that the other xdist worker needs, and no training
# run starts a preemption watcher.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Set before Ray starts so that Serve replicas (forked by Ray) see it too.
TEST_TOKEN_ENV = "RERANK_TEST_TOKEN"
os.environ[TEST_TOKEN_ENV] = "s3cret-test-token"


# `make test` runs two pytest-xdist workers. Each module that shares the session's local
# Ray and trained model runs on one worker (spread over both, each worker would start that
# Ray and train that model); the cluster tests (Ray nodes of their own) run on the other.
# The rest is self-contained, one unit per test: each notebook (a kernel and a Ray of its
# own) and the returning-user module (data and a model of its own). xdist hands those to
# whichever worker runs short of work first: pinned beside the cluster tests they made
# that worker the suite's critical path (README, Development). (A scheduler of our own
# rather than xdist_group marks: `--dist loadgroup` ignores them with pytest 9.2,
# pytest-dev/pytest-xdist#1386.)
CLUSTER = {"test_cluster"}
FLOATING = {"test_notebooks", "test_returning"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
            if module in CLUSTER:
                return "cluster"
            if module in FLOATING:
                return nodeid.split("[", 1)[0]
            return "shared-ray"

    return Groups(config, log)


# The session's S3-compatible server (moto, started by the `s3` fixture) is named
# before Ray starts, so every Ray worker inherits the endpoint and the dummy keys,
# as it would inherit a cluster's real settings.
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_PORT = free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

SHARED_MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


METRICS_PORT: list[int] = []  # the session Ray's Prometheus port, once it is up


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs, shared by every test that needs Ray."""
    import ray
    import ray.data

    METRICS_PORT.append(free_port())
    ray.init(
        _metrics_export_port=METRICS_PORT[0],
        address="local",  # never join a cluster that `ray start` left on this machine
        num_cpus=2,
        # Ray Train's controller watches its workers through the dashboard's state API.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        configure_logging=False,
        object_store_memory=512 * 1024 * 1024,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # A pipeline stuck waiting for CPUs (e.g. held by a leaked actor) fails a
    # test in minutes, not after Ray Data's default half hour.
    ctx.execution_no_progress_timeout_s = 300
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _root_logging():
    """The CLI configures logging (`force`: it owns the process); a test that calls it
    must not leave its handler, bound to that test's captured stderr, to the next."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def metrics_url(ray_local) -> str:
    """The session Ray's Prometheus endpoint."""
    return f"http://127.0.0.1:{METRICS_PORT[0]}/metrics"


@pytest.fixture
def write(tmp_path: Path):
    """write("a/b.csv", text_or_bytes) -> path, under this test's tmp dir."""

    def _write(rel: str, content: str | bytes) -> Path:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content)
        else:
            p.write_bytes(content)
        return p

    return _write


@pytest.fixture(scope="session")
def prepared(ray_local, tmp_path_factory) -> str:
    """A small prepared synthetic data set (15k events, 300 items), built once. Its
    catalogue does not grow (no item released later): the cold-start tests hold items
    out themselves and want those to be the only items training never met."""
    from ray_app.config import load_config
    from ray_app.data.config import GenerateConfig, PrepareConfig
    from ray_app.data.prepare import run_prepare
    from ray_app.data.synthetic import generate

    root = tmp_path_factory.mktemp("prepared")
    generate(
        GenerateConfig(
            output=str(root / "raw"),
            num_events=15_000,
            num_items=300,
            seed=3,
            new_items_share=0.0,
            fresh_share=0.0,
        )
    )
    cfg = load_config(
        PrepareConfig,
        None,
        [
            f"input.interactions={root / 'raw' / 'interactions'}",
            f"input.items={root / 'raw' / 'items'}",
            f"output={root / 'prepared'}",
        ],
    )
    run_prepare(cfg)
    return str(root / "prepared")


EPOCHS = 3
BATCH = 128


def tiny_config(prepared: str, root: Path, **kw):
    """A tiny re-ranker's train config (2-layer random BERT, top layer trained). Its
    artifact holds no ONNX graphs unless `export_onnx=True` (the session model's does):
    exporting them costs seconds per training, and only a served model needs them."""
    from ray_app.training.config import TrainConfig

    base = {
        "prepared": prepared,
        "output": str(root / "model"),
        "storage": str(root / "runs"),
        "model": {"encoder": "tiny", "dim": 32, "trainable_layers": 1},
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "patience": 10,
        "refresh_text_every": 20,
        "seed": 0,
        "export_onnx": False,
    }
    for key, value in kw.items():
        base[key] = value
    return TrainConfig.model_validate(base)


class FailAtStep:
    """A training callback that makes the rank-0 worker raise when it reaches `step`, once:
    a marker file remembers the failure, so a run that restarts from its checkpoint goes
    on, as after a worker that crashed."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, Path(marker)

    def on_step(self, step: int, rank: int) -> None:
        if step == self.step and rank == 0 and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("injected failure\n")
            raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


class FailAtBatch:
    """A nightly `on_batch` hook: every ranking actor raises from its `batch`-th batch on
    (a run that dies half-way)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def __call__(self, batch: int) -> None:
        if batch >= self.batch:
            raise RuntimeError(f"injected failure at batch {batch} (fail_after_batches)")


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """(config, metrics) of one tiny model trained with Ray Train, once per session."""
    from ray_app.training.trainer import run_train

    root = tmp_path_factory.mktemp("trained")
    # Recorded in an MLflow sqlite store, as `tracking.mlflow_uri` does for users.
    tracking = {"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"}
    cfg = tiny_config(prepared, root, export_onnx=True, tracking=tracking)
    return cfg, run_train(cfg)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports() -> dict[str, str]:
    """GCS, dashboard (each with the port after it) and a PORT_BASE block for the nodes,
    below the kernel's ephemeral range so no outgoing connection holds one."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 32000, 10)
        wanted = [*range(base, base + 20), base + 600, base + 601, base + 602, base + 603]
        if all(_port_free(p) for p in wanted):
            return {
                "PORT_BASE": str(base),
                "GCS_PORT": str(base + 600),
                "DASHBOARD_PORT": str(base + 602),
                "S3_PORT": str(base + 5),
            }
    raise RuntimeError("no free block of ports")


def swap_under_load(
    send: Callable[[], tuple[int, str | None]],
    swap: Callable[[], Any],
    version: str,
    clients: int = 4,
    timeout_s: float = 180,
) -> tuple[list[tuple[int, str | None]], Any]:
    """`clients` threads call `send` (-> status, model_version) in a loop while `swap()`
    rolls a new model out, until `version` answers; a dropped connection is (0, error).
    Returns every answer in order, and what `swap` returned."""
    import threading
    import time

    import requests

    stop, results = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            try:
                results.append(send())
            except requests.RequestException as e:
                results.append((0, str(e)))

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for th in threads:
        th.start()
    time.sleep(2)
    swapped = swap()
    deadline = time.time() + timeout_s
    while time.time() < deadline and not any(v == version for _, v in results[-5:]):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for th in threads:
        th.join()
    return results, swapped


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (the port AWS_ENDPOINT_URL names), for the session."""
    import subprocess
    import sys
    import time
    import urllib.request

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=out, stderr=out
        )
    url = os.environ["AWS_ENDPOINT_URL"]
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"moto_server did not start on {url}: {log.read_text()[-2000:]}")
    if proc.poll() is not None:
        pytest.fail(f"moto_server exited: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new bucket on the session's S3 server: `s3://<bucket>`."""
    import uuid

    import boto3

    name = f"rerank-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on 127.0.0.1 for this session (Debian's `redis-server`).

    Skipped where it is not installed, unless RERANK_REQUIRE_REDIS=1 (CI), where
    its absence is a failure.
    """
    import shutil
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("RERANK_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (RERANK_REQUIRE_REDIS=1)")
        pytest.skip("redis-server is not installed")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def pytest_terminal_summary(terminalreporter) -> None:
    """How many requests schemathesis generated against the live app, and what came back."""
    import sys

    calls = getattr(sys.modules.get("tests.test_serve"), "SCHEMATHESIS_CALLS", None)
    if not calls:
        return
    ops = {k: v for k, v in calls.items() if k not in ("server errors", "failed checks")}
    terminalreporter.write_line(
        f"schemathesis: {sum(ops.values())} generated requests over {len(ops)} operations "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(ops.items()))}); "
        f"{calls['server errors']} server errors, {calls['failed checks']} failed checks"
    )
