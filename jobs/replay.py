"""Replay the evaluation's sampled protocol through a running service, over HTTP.

    python jobs/replay.py --url http://127.0.0.1:8000 --prepared runs/movielens/prepared \\
        --candidates runs/movielens/evaluation/candidates/test.parquet

Each held-out target becomes one `POST /v1/rerank`: the user's events before it
(what `evaluate` scores it with; the last `--history` of them), the target and
its sampled candidates (the evaluate stage's own lists), and `scored_at` = the
target's time, the moment `evaluate` scores it at. The service then ranks each
target as it would have when the target happened, and the NDCG@k printed is the
evaluate stage's for the same model. `--at-wall-clock` leaves `scored_at` out,
as logged traffic replayed without it would be: recency is then measured to
today, years after the events. Prints NDCG@k, HR@k, AUC and requests/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import sys
import threading
import time

import numpy as np
import pandas as pd
import requests

from ray_app.data import schema
from ray_app.protocol import metrics
from ray_app.protocol.data import load_prepared

logger = logging.getLogger(__name__)


def requests_for(prepared: str, candidates: str, split: str, history: int, scored_at: bool):
    """(item ids of each request's candidates, request bodies), in the lists' order."""
    data = load_prepared(prepared)
    targets = data.splits[split]
    lists = pd.read_parquet(candidates)
    if list(lists[schema.USER_ID]) != list(targets.user_ids):
        raise SystemExit(f"{candidates}: not the {split} lists of {prepared}")
    ids = data.items[schema.ITEM_ID].to_numpy()
    kinds = data.manifest["resolved"]["event_types"]
    bodies, cands = [], []
    for u, row in enumerate(lists["candidates"]):
        events = zip(
            targets.histories[u][-history:],
            targets.history_times[u][-history:],
            targets.history_events[u][-history:],
            strict=True,
        )
        body = {
            "history": [
                {"item_id": str(ids[i]), "timestamp": int(t), "event_type": kinds[int(e) - 1]}
                for i, t, e in events
            ],
            "candidates": [{"item_id": str(ids[c])} for c in row],
        }
        if scored_at:
            body["scored_at"] = int(targets.target_times[u])
        bodies.append(body)
        cands.append([str(ids[c]) for c in row])
    return cands, bodies


def replay(url: str, bodies: list[dict], headers: dict, concurrency: int) -> list[dict]:
    local = threading.local()

    def send(body: dict) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = local.session.post(f"{url}/v1/rerank", json=body, headers=headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        return r.json()

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(send, bodies))


def scores_of(answers: list[dict], cands: list[list[str]]) -> np.ndarray:
    """(requests, candidates) scores of the answers, in each request's candidate order."""
    return np.array(
        [
            [{x["item_id"]: x["score"] for x in a["items"]}[c] for c in row]
            for a, row in zip(answers, cands, strict=True)
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--prepared", required=True, help="the prepare output the lists are of")
    p.add_argument("--candidates", required=True, help="<evaluation>/candidates/<split>.parquet")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--history", type=int, default=50, help="events sent per request")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--at-wall-clock", action="store_true", help="send no scored_at")
    p.add_argument("--token-env", help="environment variable holding the bearer token")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cands, bodies = requests_for(
        args.prepared, args.candidates, args.split, args.history, not args.at_wall_clock
    )
    headers = {"Authorization": f"Bearer {os.environ[args.token_env]}"} if args.token_env else {}
    t0 = time.time()
    answers = replay(args.url, bodies, headers, args.concurrency)
    seconds = time.time() - t0
    scores = scores_of(answers, cands)
    stats = metrics.rank_stats(scores, np.zeros(len(scores), int))  # the target is listed first
    result = {
        "requests": len(bodies),
        "scored_at": "target's time" if not args.at_wall_clock else "wall clock",
        f"ndcg@{args.k}": metrics.mean_defined(metrics.ndcg(stats, args.k)),
        f"hr@{args.k}": metrics.mean_defined(metrics.hit_rate(stats, args.k)),
        "auc": metrics.mean_defined(metrics.auc(stats)),
        "history_dropped": int(sum(a["history_dropped"] for a in answers)),
        "requests_per_s": round(len(bodies) / seconds, 1),
        "model_version": answers[0]["model_version"] if answers else None,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
