"""Connecting to Ray: a cluster address, or a local instance on 127.0.0.1; and what the
cluster offers (CPUs, GPUs) to the stages that size their work by it."""

from __future__ import annotations

import gc
import logging
import os
from typing import Any, Literal

from pydantic import Field

from ray_app.config import StrictModel

logger = logging.getLogger(__name__)


class RayConfig(StrictModel):
    """Where to run. `address: null` starts a local Ray in-process on 127.0.0.1."""

    address: str | None = None
    """A Ray cluster to join (`ray://...`, `auto`, host:port); null starts a local Ray (or joins
    RAY_ADDRESS).
    """
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of a local Ray (default: all)."""
    object_store_memory_mb: int | None = Field(default=None, ge=64)
    """Object store size of a local Ray (default: Ray's)."""
    show_progress: bool = True
    """Ray Data progress bars."""
    metrics_export_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of a local Ray's Prometheus endpoint (`/metrics` on 127.0.0.1): Ray's, Serve's and
    the app's metrics. Null: a random free port (Ray's default), which a scraper cannot find.
    """
    dashboard: bool = True
    """A local Ray's dashboard (on 127.0.0.1). Ray Train's controller watches its workers through
    the state API that the dashboard serves.
    """


def ensure_ray(cfg: RayConfig) -> None:
    """Initialise Ray once per process.

    With no address (and none in RAY_ADDRESS, which `ray job submit` sets) a
    local Ray starts in-process, bound to 127.0.0.1 (dashboard included).

    When Ray is already up (a notebook, a test session, a driver that runs
    stages in turn), collect garbage first: a stage that failed earlier in this
    process leaves its traceback in a reference cycle that holds Ray Data's
    actor handles, and each such actor keeps its CPUs reserved until Python's
    cycle collector happens to run, which can be never; the next stage then
    waits for CPUs nobody uses.
    """
    import ray

    if ray.is_initialized():
        gc.collect()
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {}
        if cfg.metrics_export_port:
            kwargs["_metrics_export_port"] = cfg.metrics_export_port
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
        # Idle OpenMP threads of a training worker otherwise spin and starve the
        # processes that feed it (Ray Data) on a machine with few cores; the
        # workers of a local Ray inherit this process's environment.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # Ray Train's preemption watcher (an actor per training run, observability
        # only) watches for nodes a cloud takes back; one machine has none.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        logger.info("starting a local Ray instance (num_cpus=%s)", cfg.num_cpus or "all")
        ray.init(
            # "local": a new instance even when `ray start` left one running here,
            # which a bare ray.init() would silently join.
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            configure_logging=False,
            **kwargs,
        )
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.show_progress


def usable_cpus() -> list[int]:
    """The CPUs this process may run on, in order: its affinity mask, which a
    container's cpuset narrows, not the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def local_cpus() -> int:
    """How many CPUs this process may run on (`usable_cpus`)."""
    return max(1, len(usable_cpus()))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def use_gpus(setting: bool | Literal["auto"]) -> bool:
    """A stage's `use_gpu`: `auto` is true when the cluster has GPUs."""
    import ray

    if setting != "auto":
        return bool(setting)
    return ray.cluster_resources().get("GPU", 0) > 0


def redis_client(url: str, timeout_s: float) -> tuple[Any, tuple[type[Exception], ...]]:
    """A Redis client that never retries (a retried write whose first attempt reached a
    paused server would land twice) and waits at most `timeout_s` to connect and for
    each answer; and the errors that mean the server is unavailable."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return client, (redis.ConnectionError, redis.TimeoutError)
