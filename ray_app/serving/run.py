"""Starting the Serve application on a Ray cluster (`rerank serve`) and watching it."""

from __future__ import annotations

import logging

from ray_app.runtime import ensure_ray
from ray_app.serving.config import ServeConfig

logger = logging.getLogger(__name__)

DEPLOYMENT = "RerankService"


def start(cfg: ServeConfig) -> str:
    """Deploy the app (seeding the event store first when asked); returns its base URL."""
    from ray import serve

    from ray_app.serving.app import build_app
    from ray_app.serving.events import histories_from_prepared, make_store

    ensure_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    if cfg.seed_histories:
        histories = histories_from_prepared(cfg.seed_histories, cfg.events.max_events_per_user)
        make_store(cfg.events).bulk_load(histories)
        logger.info("seeded the event store with %d users' histories", len(histories))
    serve.run(build_app(cfg.app_args()), name=cfg.app_name, route_prefix=cfg.route_prefix)
    prefix = cfg.route_prefix.rstrip("/")
    url = f"http://{cfg.host}:{cfg.port}{prefix}"
    logger.info("serving on %s (OpenAPI: %s/docs)", url, url)
    return url


def serve_until_stopped(cfg: ServeConfig) -> dict[str, str]:
    """`rerank serve`: deploy, then keep serving until Ctrl-C or SIGTERM; returns the URL."""
    import contextlib
    import signal
    import threading

    from ray import serve

    url = start(cfg)
    print(f"serving {cfg.model} on {url} (OpenAPI at {url}/docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    serve.shutdown()
    return {"url": url}


def running_replicas(app_name: str = "rerank") -> int:
    """Replicas of the re-ranker deployment in state RUNNING."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return 0
    dep = app.deployments.get(DEPLOYMENT)
    return int(dep.replica_states.get("RUNNING", 0)) if dep else 0
