"""`serve`: the re-ranker as a Ray Serve application (a command, not a pipeline stage)."""

from __future__ import annotations

from ray_app.serving.config import ServeConfig
from ray_app.stage import Stage

SERVE = Stage(
    name="serve",
    config=ServeConfig,
    run_path="ray_app.serving.run:serve_until_stopped",
    summarize=lambda cfg, out: out,
    show=lambda cfg, out: "",
    help="serve the re-ranker over HTTP with Ray Serve (autoscaling, batching)",
    description="Deploy the model artifact as a Ray Serve app on 127.0.0.1 (host/port to "
    "change): POST /v1/rerank, POST /v1/events, GET /v1/users/{id}/recommendations, /healthz, "
    "/readyz, OpenAPI at /docs. Ctrl-C stops it. On KubeRay: cluster/kuberay/rayservice.yaml.",
    examples=(
        "rerank serve --set model=runs/demo/model --set topk=runs/demo/topk",
        "rerank serve --set model=runs/demo/model --set seed_histories=runs/demo/prepared "
        "--set port=8080",
        "rerank serve --set model=runs/demo/model --set events.kind=redis "
        "--set events.redis_url=redis://127.0.0.1:6379/0",
    ),
)
