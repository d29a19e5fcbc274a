"""The replica's own Prometheus metrics, exported through `ray.serve.metrics` beside the
ones Serve keeps for every request (rate, latency, status per route).

Ray exports both on each node's metrics port (`ray.metrics_export_port`), prefixed
`ray_`; Serve adds the `application`, `deployment` and `replica` labels. `APP_METRICS`
is the one list of names and labels: the README's table, the Grafana dashboard
(`cluster/grafana/rerank.json`) and the tests read it. The metrics are created when a
replica starts, never at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CANDIDATE_BOUNDS = [1, 5, 10, 20, 50, 100, 200, 500, 1000]
HISTORY_BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500]


@dataclass(frozen=True)
class MetricDoc:
    name: str  # as Prometheus shows it
    kind: str  # counter, histogram, gauge
    labels: tuple[str, ...]
    help: str


APP_METRICS = (
    MetricDoc("ray_rerank_candidates", "histogram", (), "Candidates per /v1/rerank request."),
    MetricDoc(
        "ray_rerank_history_events",
        "histogram",
        (),
        "History events a /v1/rerank request was scored with (stored and sent, after the "
        "model's max_history).",
    ),
    MetricDoc(
        "ray_rerank_history_dropped_total",
        "counter",
        (),
        "History events left out: items the model cannot embed, or events after scored_at.",
    ),
    MetricDoc(
        "ray_rerank_new_items_total",
        "counter",
        ("source",),
        "Candidates outside the trained catalogue, by where their vectors came from: "
        "`encoded` (text encoded now), `cache` (the replica's LRU of encoded text), "
        "`registered` (PUT /v1/items).",
    ),
    MetricDoc(
        "ray_rerank_unknown_items_total",
        "counter",
        (),
        "Candidates unknown to the model and sent without text: answered with a per-item error.",
    ),
    MetricDoc(
        "ray_rerank_stored_history_reads_total",
        "counter",
        ("result",),
        "Reads of a user's stored events by result: `used`, or `unavailable` (the store did "
        "not answer; the request was scored with the events it sent).",
    ),
    MetricDoc(
        "ray_rerank_model_info",
        "gauge",
        ("model_version",),
        "1 for the model version a replica serves, 0 for the one it swapped out.",
    ),
)

# Serve's own, the ones the dashboard and an alert need (Ray's documentation lists all).
# The dynamic batcher's batch sizes are Serve's `ray_serve_actual_batch_size`
# (`function_name="_score"`): a copy under the app's name would count them twice.
SERVE_METRICS = (
    MetricDoc(
        "ray_serve_num_http_requests_total",
        "counter",
        ("route", "method", "status_code", "application"),
        "HTTP requests by route and status.",
    ),
    MetricDoc(
        "ray_serve_num_http_error_requests_total",
        "counter",
        ("route", "method", "error_code", "application"),
        "HTTP requests answered with an error status.",
    ),
    MetricDoc(
        "ray_serve_http_request_latency_ms",
        "histogram",
        ("route", "method", "status_code", "application"),
        "End-to-end latency at the HTTP proxy.",
    ),
    MetricDoc(
        "ray_serve_deployment_processing_latency_ms",
        "histogram",
        ("deployment", "replica", "route", "application"),
        "Time a replica spent on a request.",
    ),
    MetricDoc(
        "ray_serve_actual_batch_size",
        "histogram",
        ("deployment", "replica", "function_name", "application"),
        "Requests the dynamic batcher scored in one forward pass (`function_name` `_score`).",
    ),
    MetricDoc(
        "ray_serve_replica_processing_queries",
        "gauge",
        ("deployment", "replica", "application"),
        "Requests a replica is working on now (what autoscaling targets).",
    ),
    MetricDoc(
        "ray_serve_deployment_replica_healthy",
        "gauge",
        ("deployment", "replica", "application"),
        "1 while a replica passes its health check.",
    ),
)


def _short(name: str) -> str:
    """The name `ray.serve.metrics` is given: no `ray_` prefix, no `_total` suffix (both
    added at export)."""
    name = name.removeprefix("ray_")
    return name.removesuffix("_total")


class ServeMetrics:
    """The metrics of one replica; each method records one event of the request path."""

    def __init__(self) -> None:
        from ray.serve import metrics

        doc = {m.name: m for m in APP_METRICS}

        def counter(name: str) -> Any:
            d = doc[name]
            return metrics.Counter(_short(name), d.help, tag_keys=d.labels or None)

        def histogram(name: str, bounds: list[float]) -> Any:
            d = doc[name]
            return metrics.Histogram(_short(name), d.help, bounds, tag_keys=d.labels or None)

        self.candidates = histogram("ray_rerank_candidates", CANDIDATE_BOUNDS)
        self.history = histogram("ray_rerank_history_events", HISTORY_BOUNDS)
        self.dropped = counter("ray_rerank_history_dropped_total")
        self.new_items = counter("ray_rerank_new_items_total")
        self.unknown = counter("ray_rerank_unknown_items_total")
        self.reads = counter("ray_rerank_stored_history_reads_total")
        d = doc["ray_rerank_model_info"]
        self.model = metrics.Gauge(_short(d.name), d.help, tag_keys=d.labels)

    def request(
        self, candidates: int, history_used: int, history_dropped: int, unknown: int
    ) -> None:
        self.candidates.observe(candidates)
        self.history.observe(history_used)
        if history_dropped:
            self.dropped.inc(history_dropped)
        if unknown:
            self.unknown.inc(unknown)

    def new(self, source: str, n: int) -> None:
        if n:
            self.new_items.inc(n, tags={"source": source})

    def stored_read(self, result: str) -> None:
        self.reads.inc(tags={"result": result})

    def model_live(self, version: str, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.model.set(0, tags={"model_version": previous})
        self.model.set(1, tags={"model_version": version})
