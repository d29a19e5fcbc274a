"""A soak run of the Serve app: a sustained request mix, reported minute by minute.

    python jobs/soak_serve.py --model runs/demo/model --minutes 10 --concurrency 16

Starts `rerank serve` (one replica, on 127.0.0.1) unless `--url` names a running
one, then keeps `--concurrency` clients busy for `--minutes` with a fixed mix:

- 70% known: re-rank 100 candidates the model knows for a user of the pool, with
  a 20-event history in the request (merged with what the store holds);
- 10% new: the same with 20 of the candidates new items sent with their text;
- 15% events: post 1-5 events for a user of a bounded pool (500 users);
- 5% bad: a body the service must refuse with a 4xx (NaN, a lone surrogate, a
  timestamp beyond 64 bits, an unknown event type, no candidates, too many).

Before the clock starts, every user of the pool gets `--warm-events` stored
events (default: the model's history length), so a request's history is full
from the first minute, as for returning users: without it the stored histories
grow all run, every request gets larger, and latency and memory drift for that
reason alone.

Every client waits at most 10 s for an answer. Each minute it prints the
requests by kind and status, the failures (a good request not answered 200, a
bad one not answered 4xx, a timeout), p50/p99 latency of the good requests, and
the memory of the replica and of the event store. At the end it checks what a
long-running deployment needs: no failures, p99 of the last minute within 1.5x
of minute 2, replica memory growth from minute 2 to the end under 5%.
Not part of CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import threading
import time
from typing import Any

import numpy as np
import requests

JSON = {"content-type": "application/json"}
KINDS = ("known", "new", "events", "bad")
MIX = (0.70, 0.10, 0.15, 0.05)
USERS = 500
TIMEOUT_S = 10.0


class Bodies:
    """Request bodies of one client (its own RNG, so clients never share state)."""

    def __init__(self, ids: np.ndarray, event_type: str | None, seed: int) -> None:
        self.ids, self.event_type = ids, event_type
        self.rng = np.random.default_rng(seed)
        self.seed, self.n = seed, 0

    def _history(self, now: int, n: int) -> list[dict[str, Any]]:
        items = self.rng.choice(self.ids, size=n, replace=False)
        return [
            {"item_id": str(x), "timestamp": now - 600 * (n - j), "event_type": self.event_type}
            for j, x in enumerate(items)
        ]

    def _user(self) -> str:
        return f"soak-{int(self.rng.integers(USERS))}"

    def make(self, kind: str) -> tuple[str, bytes]:
        now = int(time.time())
        self.n += 1
        if kind in ("known", "new"):
            cands: list[dict[str, Any]] = [
                {"item_id": str(c)} for c in self.rng.choice(self.ids, size=100, replace=False)
            ]
            if kind == "new":
                for i in range(20):
                    cands[i] = {
                        "item_id": f"new-{self.seed}-{self.n}-{i}",
                        "text": f"A new item {self.n}-{i}, never seen before. Tags: soak|{i}",
                    }
            body = {"user_id": self._user(), "history": self._history(now, 20), "candidates": cands}
            return "/v1/rerank", json.dumps(body).encode()
        if kind == "events":
            n = int(self.rng.integers(1, 6))
            body = {"user_id": self._user(), "events": self._history(now, n)}
            return "/v1/events", json.dumps(body).encode()
        good = [{"item_id": str(self.ids[0])}]
        bad = [
            b'{"candidates": [{"item_id": "a"}], "k": NaN}',
            b'{"candidates": [{"item_id": "a"}], "k": 1e400}',
            b'{"candidates": [{"item_id": "\\ud800"}]}',
            json.dumps(
                {"candidates": good, "history": [{"item_id": "a", "timestamp": 2**70}]}
            ).encode(),
            json.dumps(
                {"candidates": good, "history": [{"item_id": "a", "event_type": "teleport"}]}
            ).encode(),
            b'{"candidates": []}',
            json.dumps({"candidates": [{"item_id": f"c{i}"} for i in range(5000)]}).encode(),
            b"{not json",
        ]
        return "/v1/rerank", bad[int(self.rng.integers(len(bad)))]


class Tally:
    """Per-minute counts and latencies, filled by the clients."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lock = threading.Lock()
        self.minutes: dict[int, dict[str, Any]] = collections.defaultdict(
            lambda: {"status": collections.Counter(), "failed": collections.Counter(), "lat": []}
        )

    def add(self, kind: str, status: str, ok: bool, latency: float) -> None:
        m = int((time.time() - self.t0) // 60) + 1
        with self.lock:
            row = self.minutes[m]
            row["status"][f"{kind}:{status}"] += 1
            if not ok:
                row["failed"][f"{kind}:{status}"] += 1
            elif kind != "bad":
                row["lat"].append(latency)


def client(base: str, bodies: Bodies, tally: Tally, stop: float, token: str | None) -> None:
    s = requests.Session()
    headers = dict(JSON)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    rng = bodies.rng
    while time.time() < stop:
        kind = KINDS[int(rng.choice(len(KINDS), p=MIX))]
        path, data = bodies.make(kind)
        t = time.perf_counter()
        try:
            r = s.post(base + path, data=data, headers=headers, timeout=TIMEOUT_S)
            status = str(r.status_code)
            ok = 400 <= r.status_code < 500 if kind == "bad" else r.status_code == 200
        except requests.Timeout:
            status, ok = "timeout", False
        except requests.RequestException as e:
            status, ok = type(e).__name__, False
        tally.add(kind, status, ok, time.perf_counter() - t)


def warm_histories(
    base: str, ids: np.ndarray, event_type: str | None, n: int, token: str | None
) -> None:
    """`n` events a day old or older for every user of the pool, posted through the API."""
    rng = np.random.default_rng(12345)
    headers = dict(JSON)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    s = requests.Session()
    start = int(time.time()) - 86_400 - 600 * n
    for u in range(USERS):
        items = rng.choice(ids, size=n, replace=False)
        events = [
            {"item_id": str(x), "timestamp": start + 600 * j, "event_type": event_type}
            for j, x in enumerate(items)
        ]
        r = s.post(
            f"{base}/v1/events",
            data=json.dumps({"user_id": f"soak-{u}", "events": events}),
            headers=headers,
            timeout=60,
        )
        r.raise_for_status()
    print(f"stored {n} events for each of {USERS} users", flush=True)


def _rss_mb(pid: int | None) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else None
    except psutil.Error:
        return None


def _actor_pid(class_part: str) -> int | None:
    from ray.util.state import list_actors

    alive = [
        a for a in list_actors(filters=[("state", "=", "ALIVE")]) if class_part in a.class_name
    ]
    return int(alive[0].pid) if alive else None


def memory(redis_url: str | None) -> dict[str, float | None]:
    """RSS of the replica and of the event store (the actor's process, or Redis's
    used_memory), in MiB."""
    replica = _rss_mb(_actor_pid("RerankService"))
    if redis_url:
        import redis

        store = redis.Redis.from_url(redis_url).info("memory")["used_memory"] / 2**20
    else:
        store = _rss_mb(_actor_pid("_EventsActor"))
    return {"replica_mb": replica, "store_mb": store}


def minute_row(m: int, row: dict[str, Any], mem: dict[str, float | None]) -> dict[str, Any]:
    lat = np.array(row["lat"]) * 1000
    return {
        "minute": m,
        "requests": sum(row["status"].values()),
        "by_status": dict(sorted(row["status"].items())),
        "failed": dict(row["failed"]),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        **mem,
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = [r["minute"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(m, [r["p50_ms"] for r in rows], marker="o", label="p50")
    a.plot(m, [r["p99_ms"] for r in rows], marker="o", label="p99")
    a.set(xlabel="minute", ylabel="latency (ms)", title="good requests")
    a.legend()
    b.plot(m, [r["replica_mb"] for r in rows], marker="o", label="replica RSS")
    b.plot(m, [r["store_mb"] for r in rows], marker="o", label="event store")
    b.set(xlabel="minute", ylabel="MiB", title="memory")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a published model artifact")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--url", help="a running service instead of starting one (same model)")
    p.add_argument("--redis-url", help="the service's Redis event store (memory figures)")
    p.add_argument("--token", help="bearer token of the service, if it has one")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="ServeConfig keys")
    p.add_argument(
        "--warm-events", type=int, help="stored events per pool user before the run "
        "(default: the model's max_history; 0: start from empty histories)",
    )  # fmt: skip
    p.add_argument("--json", help="also write the per-minute figures here")
    p.add_argument("--plot", help="PNG of latency and memory per minute")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ray_app.config import load_config
    from ray_app.model.artifact import load_artifact
    from ray_app.serving.config import ServeConfig

    if args.url:
        import ray

        ray.init(address="auto", logging_level="ERROR")
        base = args.url.rstrip("/")
    else:
        from ray_app.serving.run import start

        overrides = [
            f"model={args.model}",
            f"port={args.port}",
            "autoscaling.min_replicas=1",
            "autoscaling.max_replicas=1",
            "ray.show_progress=false",
            *args.overrides,
        ]
        if args.redis_url:
            overrides += ["events.kind=redis", f"events.redis_url={args.redis_url}"]
        base = start(load_config(ServeConfig, None, overrides))
    art = load_artifact(args.model)
    ids = art.items["item_id"].to_numpy()[1:].astype(str)
    event_type = (art.config.get("event_types") or [None])[0]

    warm = art.model.cfg.max_history if args.warm_events is None else args.warm_events
    if warm:
        warm_histories(base, ids, event_type, warm, args.token)

    t0 = time.time()
    stop = t0 + args.minutes * 60
    tally = Tally(t0)
    threads = [
        threading.Thread(
            target=client, args=(base, Bodies(ids, event_type, i), tally, stop, args.token)
        )
        for i in range(args.concurrency)
    ]
    for th in threads:
        th.start()
    rows: list[dict[str, Any]] = []
    minute = 1
    while minute <= int(np.ceil(args.minutes)):
        time.sleep(max(0.0, t0 + 60 * minute - time.time()))
        mem = memory(args.redis_url)
        if minute == int(np.ceil(args.minutes)):
            for th in threads:
                th.join()
        with tally.lock:
            row = minute_row(minute, tally.minutes[minute], mem)
        rows.append(row)
        print(json.dumps(row), flush=True)
        minute += 1

    print(f"\n{args.concurrency} clients, {args.minutes} min, model {args.model}\n")
    print("| minute | requests | failed | p50 ms | p99 ms | replica MiB | store MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['minute']} | {r['requests']} | {sum(r['failed'].values())} "
            f"| {r['p50_ms'] or 0:.0f} | {r['p99_ms'] or 0:.0f} | {r['replica_mb'] or 0:.0f} "
            f"| {r['store_mb'] or 0:.1f} |"
        )
    failed = sum(sum(r["failed"].values()) for r in rows)
    bad = sum(v for r in rows for k, v in r["by_status"].items() if k.startswith("bad:"))
    checks = {"failed requests": (failed, failed == 0), "bad requests sent (each 4xx)": (bad, True)}
    if len(rows) >= 3 and rows[1]["p99_ms"] and rows[-1]["p99_ms"]:
        p99 = rows[-1]["p99_ms"] / rows[1]["p99_ms"]
        checks["p99 last minute / minute 2"] = (round(p99, 2), p99 <= 1.5)
        if rows[1]["replica_mb"] and rows[-1]["replica_mb"]:
            growth = rows[-1]["replica_mb"] / rows[1]["replica_mb"] - 1
            checks["replica memory growth, minute 2 -> end"] = (f"{growth:+.1%}", growth < 0.05)
    print()
    for name, (value, ok) in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"minutes": rows, "checks": {k: v[0] for k, v in checks.items()}}, f, indent=2
            )
    if args.plot:
        plot(rows, args.plot)
    return 0 if all(ok for _, ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
