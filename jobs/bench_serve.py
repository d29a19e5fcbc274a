"""Serving throughput and latency: the re-ranker against a no-op behind the same HTTP path.

    python jobs/bench_serve.py --model runs/demo/model --concurrency 1 4 16 --seconds 10

Both apps run in one Ray Serve instance on 127.0.0.1 with one replica each and
the same FastAPI body model; the no-op parses and validates the request and
returns the candidates in the order given. The clients (threads of this
process) send `POST /v1/rerank`:

- known: 100 candidates the model knows and a 50-event history;
- registered: the same, with 100 items the model never saw, registered
  beforehand through `PUT /v1/items` (sent without text);
- cold: 100 candidates with text the model has never seen, new on every
  request (nothing cached: the worst case);
- explain: the known case with `explain: true` (3 history items per returned item);
  the re-ranker's throughput on it against the known case's is printed last.

For each concurrency, `--repeats` times, it runs every case in turn, the no-op and
the re-ranker one after the other, and prints requests/s, p50 and p99 latency and the
re-ranker's throughput as a share of the no-op's: each repeat's ratio, then the
median and the spread (min..max) over the repeats. The client threads are pinned
to `--client-cpus` (the last core by default, after Serve's processes started on
all of them), so the clients take the same share of the machine in every run.
"""

import argparse
import itertools
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import requests
from fastapi import FastAPI
from ray import serve

from ray_app.serving.api import RerankRequest

noop_api = FastAPI()
JSON = {"content-type": "application/json"}


@serve.deployment(name="Noop", max_ongoing_requests=64)
@serve.ingress(noop_api)
class Noop:
    @noop_api.post("/v1/rerank")
    async def rerank(self, req: RerankRequest) -> dict:
        return {
            "user_id": req.user_id,
            "model_version": "noop",
            "items": [{"item_id": c.item_id, "score": 0.0} for c in req.candidates][: req.k],
            "errors": [],
            "history_used": 0,
        }


def run_load(url: str, make_bodies, concurrency: int, seconds: float) -> dict:
    """`concurrency` client threads, each with its own body source (`make_bodies(seed)`):
    a generator shared by threads raises "generator already executing" and kills
    the thread, which silently lowers the concurrency measured."""
    lat: list[float] = []
    fails = [0]
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(seed: int) -> None:
        s = requests.Session()
        bodies = make_bodies(seed)
        while time.time() < stop:
            t = time.perf_counter()
            try:
                ok = s.post(url, data=next(bodies), headers=JSON, timeout=60).status_code == 200
            except Exception:
                logging.exception("request failed")
                ok = False
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    fails[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    a = np.array(lat) * 1000
    return {
        "req_per_s": len(lat) / wall,
        "p50_ms": float(np.percentile(a, 50)) if len(a) else float("nan"),
        "p99_ms": float(np.percentile(a, 99)) if len(a) else float("nan"),
        "ok": len(lat),
        "failed": fails[0],
    }


def summarize(case: str, concurrency: int, runs: list[dict]) -> dict:
    """Medians over the repeats of each figure, and the spread of the ratio."""

    def median(app: str, key: str) -> float:
        return float(np.median([r[app][key] for r in runs]))

    ratios = [r["ratio"] for r in runs]
    apps = {
        app: {k: median(app, k) for k in ("req_per_s", "p50_ms", "p99_ms")}
        for app in ("noop", "rerank")
    }
    return {
        "case": case,
        "concurrency": concurrency,
        **apps,
        "ratio": float(np.median(ratios)),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "p99_ratio": apps["rerank"]["p99_ms"] / apps["noop"]["p99_ms"],
        "failed": sum(r[a]["failed"] for r in runs for a in ("noop", "rerank")),
        "runs": runs,
    }


def main() -> int:
    from ray_app.model.artifact import load_artifact
    from ray_app.runtime import local_cpus, usable_cpus
    from ray_app.serving.config import ServeConfig
    from ray_app.serving.run import start

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a published model artifact")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument(
        "--cases",
        nargs="+",
        default=["known", "registered", "cold"],
        choices=["known", "registered", "cold", "explain"],
    )
    p.add_argument("--seconds", type=float, default=10.0, help="load per measurement")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="ServeConfig keys")
    p.add_argument("--repeats", type=int, default=3, help="runs of each case and concurrency")
    p.add_argument(
        "--client-cpus",
        type=int,
        nargs="*",
        default=None,
        help="cores the client threads run on (default: the last one; none given: unpinned)",
    )
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ray_app.config import load_config

    cfg = load_config(
        ServeConfig,
        None,
        [
            f"model={args.model}",
            f"port={args.port}",
            "autoscaling.min_replicas=1",
            "autoscaling.max_replicas=1",
            "ray.show_progress=false",
            *args.overrides,
        ],
    )
    url = start(cfg)
    serve.run(Noop.bind(), name="noop", route_prefix="/noop")
    # the clients' core: the highest this process may use, away from Serve's
    cpus = usable_cpus()[-1:] if args.client_cpus is None else args.client_cpus
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # threads started from now on inherit it
    base = f"http://{cfg.host}:{cfg.port}"
    art = load_artifact(args.model)
    ids = art.items["item_id"].to_numpy()[1:]
    types = art.config.get("event_types") or [None]
    now = int(time.time())

    registered = np.asarray([f"reg-{i}" for i in range(6400)])
    if "registered" in args.cases:
        t0 = time.time()
        for lo in range(0, len(registered), 500):
            items = [
                {"item_id": str(i), "title": f"New film {i}", "genres": "Drama|Comedy"}
                for i in registered[lo : lo + 500]
            ]
            r = requests.put(f"{url}/v1/items", json={"items": items}, timeout=600)
            r.raise_for_status()
        print(f"registered {len(registered)} items in {time.time() - t0:.1f}s", flush=True)

    def known(seed: int, pool_ids=ids, explain: bool = False):
        """A fixed pool of bodies, serialized once, so the clients spend their CPU
        on HTTP rather than on building JSON (both apps get the same bodies)."""
        rng = np.random.default_rng(seed)
        pool = []
        for _ in range(64):
            cands = rng.choice(pool_ids, size=100, replace=False)
            hist = rng.choice(ids, size=50, replace=False)
            body = {
                "history": [
                    {"item_id": str(h), "timestamp": now - 3600 * (50 - j), "event_type": types[0]}
                    for j, h in enumerate(hist)
                ],
                "candidates": [{"item_id": str(c)} for c in cands],
            }
            if explain:
                body["explain"] = True
            pool.append(json.dumps(body).encode())
        return itertools.cycle(pool)

    counter = itertools.count()  # next() on a count is atomic in CPython

    def cold(seed: int):
        words = ["space", "drama", "comedy", "war", "love", "robot", "music", "crime", "family"]
        while True:
            n = next(counter)
            body = {
                "candidates": [
                    {
                        "item_id": f"new-{n}-{i}",
                        "text": f"New film {n}-{i}. Genres: {words[i % 9]}|{words[(i + n) % 9]}",
                    }
                    for i in range(100)
                ]
            }
            yield json.dumps(body).encode()

    results = []

    def known_after_put(seed: int):
        return known(seed, registered)

    def explained(seed: int):
        return known(seed, ids, True)

    makers = {"known": known, "registered": known_after_put, "cold": cold, "explain": explained}
    # Each repeat runs every case back to back, so cases compared with each other (explain
    # against known) are measured minutes apart at most, not a whole case's runs apart.
    runs_by: dict[tuple[str, int], list[dict]] = {}
    for c in args.concurrency:
        for _ in range(args.repeats):
            for case in args.cases:
                make, run = makers[case], {}
                for name, target in (
                    ("noop", f"{base}/noop/v1/rerank"),
                    ("rerank", f"{url}/v1/rerank"),
                ):
                    run_load(target, make, c, min(2.0, args.seconds))  # warm-up
                    run[name] = run_load(target, make, c, args.seconds)
                run["ratio"] = run["rerank"]["req_per_s"] / run["noop"]["req_per_s"]
                runs_by.setdefault((case, c), []).append(run)
                print(json.dumps({"case": case, "concurrency": c, **run}), flush=True)
    results += [
        summarize(case, c, runs_by[case, c]) for case in args.cases for c in args.concurrency
    ]
    print(
        f"\nmodel={args.model} cores={local_cpus()} torch_threads={cfg.torch_threads} "
        f"max_batch_size={cfg.max_batch_size} batch_wait_timeout_s={cfg.batch_wait_timeout_s} "
        f"{args.seconds}s per measurement, {args.repeats} repeats, clients on cores {cpus}; "
        "medians over the repeats\n"
    )
    print(
        "| case | concurrency | no-op req/s | re-ranker req/s | ratio (min..max) "
        "| re-ranker p50 / p99 ms | no-op p50 / p99 ms | p99 ratio | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        n, m = r["noop"], r["rerank"]
        print(
            f"| {r['case']} | {r['concurrency']} | {n['req_per_s']:.1f} | {m['req_per_s']:.1f} "
            f"| {r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) "
            f"| {m['p50_ms']:.0f} / {m['p99_ms']:.0f} | {n['p50_ms']:.0f} / {n['p99_ms']:.0f} "
            f"| {r['p99_ratio']:.2f} | {r['failed']} |"
        )
    by = {(r["case"], r["concurrency"]): r for r in results}
    for c in args.concurrency:
        if ("known", c) in by and ("explain", c) in by:
            runs = zip(by["known", c]["runs"], by["explain", c]["runs"], strict=True)
            each = [e["rerank"]["req_per_s"] / k["rerank"]["req_per_s"] for k, e in runs]
            print(
                f"explain / known re-ranker throughput, concurrency {c}: "
                f"{np.median(each):.2f} ({min(each):.2f}..{max(each):.2f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
