"""The Serve application over real HTTP on 127.0.0.1: scores, events, errors, swaps, scaling.

One app (the session's tiny model, a bearer token, a hand-written nightly
partition) serves most tests; the model swap, the Redis replica kill and
autoscaling deploy their own.
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import quote

import hypothesis
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import schemathesis

from ray_app.data import schema as S
from ray_app.model.artifact import load_artifact
from ray_app.model.history import make_history
from ray_app.protocol.data import load_prepared
from ray_app.serving.config import ServeConfig
from tests.conftest import TEST_TOKEN_ENV, free_port, swap_under_load

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TOKEN = {"Authorization": "Bearer s3cret-test-token"}
NOW = int(time.time())
LIMITS = {
    "max_candidates": 50,
    "max_history": 60,
    "max_text_chars": 200,
    "max_k": 20,
    "max_items": 5,
}


def _write_topk(root: Path, version: str) -> None:
    part = root / "dt=2026-11-22"
    part.mkdir(parents=True)
    table = pa.table(
        {
            S.USER_ID: ["alice", "alice", "alice", "bob"],
            S.RANK: pa.array([2, 1, 3, 1], pa.int32()),
            S.ITEM_ID: ["i2", "i1", "i3", "i9"],
            S.SCORE: pa.array([0.5, 0.9, 0.1, 0.7], pa.float32()),
            S.MODEL_VERSION: [version] * 4,
        },
        schema=S.TOPK_SCHEMA,
    )
    pq.write_table(table, part / "part-0.parquet")
    (root / S.TOPK_LATEST).write_text("dt=2026-11-22\n")


def _deploy(cfg: ServeConfig) -> str:
    from ray_app.serving.run import start

    url = start(cfg)
    for _ in range(600):
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError("the app never became ready")


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def service(trained, serve_port, tmp_path_factory):
    from ray import serve

    cfg, _ = trained
    topk = tmp_path_factory.mktemp("topk")
    _write_topk(topk, "v-test")
    sc = ServeConfig(
        model=cfg.output,
        topk=str(topk),
        port=serve_port,
        app_name="rerank",
        auth_token_env=TEST_TOKEN_ENV,
        limits=LIMITS | {"max_body_bytes": 20_000},
        num_cpus=0.5,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
    )
    url = _deploy(sc)
    yield url, sc
    serve.delete("rerank")


@pytest.fixture(scope="module")
def catalogue(trained):
    cfg, _ = trained
    return load_artifact(cfg.output)


def post(url: str, path: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, headers=TOKEN, timeout=30, **kw)


def test_rerank_scores_equal_the_batch_path(service, catalogue, prepared):
    url, _ = service
    art = catalogue
    data = load_prepared(prepared)
    t = data.splits["valid"]
    ids = art.items["item_id"].to_numpy()
    types = data.manifest["resolved"]["event_types"]
    rng = np.random.default_rng(1)
    for u in range(3):
        cands = rng.choice(np.arange(1, len(ids)), size=30, replace=False)
        history = [
            {"item_id": str(ids[i]), "timestamp": int(ts), "event_type": types[int(e) - 1]}
            for i, ts, e in zip(
                t.histories[u], t.history_times[u], t.history_events[u], strict=True
            )
        ][-40:]
        before = int(time.time())
        r = post(
            url,
            "/v1/rerank",
            {"history": history, "candidates": [{"item_id": str(ids[c])} for c in cands]},
        )
        after = int(time.time())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == art.version and not body["errors"]
        got = {x["item_id"]: x["score"] for x in body["items"]}
        scores = [x["score"] for x in body["items"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 30
        offline = []
        for now in {before, after}:  # the server measures recency to its own clock
            hist = make_history(
                [np.asarray(t.histories[u][-40:])],
                [np.asarray(t.history_events[u][-40:])],
                [np.asarray(t.history_times[u][-40:])],
                np.array([now]),
                art.model.cfg.max_history,
            )
            s = art.model.predict(hist, art.item_vectors[cands])[0].numpy()
            offline.append({str(ids[c]): float(v) for c, v in zip(cands, s, strict=True)})
        assert any(all(abs(got[i] - want[i]) <= 1e-5 for i in got) for want in offline), (
            got,
            offline,
        )


def _replay_tool():
    """jobs/replay.py, the tool a team replays logged traffic with."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / "replay.py"
    spec = importlib.util.spec_from_file_location("replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replaying_the_sampled_protocol_with_scored_at_gives_the_evaluate_scores(
    service, catalogue, prepared, trained, tmp_path, capsys
):
    from ray_app.evaluation.config import EvaluateConfig
    from ray_app.evaluation.evaluate import run_evaluate
    from ray_app.protocol.scorer import NetScorer

    url, _ = service
    art = catalogue
    # The evaluate stage's sampled protocol (49 negatives: the service takes 50 candidates).
    ev = EvaluateConfig(
        prepared=prepared,
        output=str(tmp_path / "eval"),
        baselines=["popularity"],
        models={"tiny": trained[0].output},
        num_negatives=49,
        deltas=[],
        backtest=False,
    )
    metrics = run_evaluate(ev)
    lists = str(tmp_path / "eval" / "candidates" / "test.parquet")
    t = load_prepared(prepared).splits["test"]
    cands = np.stack(pq.read_table(lists).to_pandas()["candidates"].to_numpy()).astype(np.int64)
    want = NetScorer(art.model, art.item_vectors).score_candidates(t, cands)
    tool = _replay_tool()
    n = art.model.cfg.max_history
    ids, bodies = tool.requests_for(prepared, lists, "test", n, scored_at=True)
    answers = tool.replay(url, bodies, TOKEN, 4)
    got = tool.scores_of(answers, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # The tool's own report: the evaluate stage's NDCG@10, to 4 decimals.
    args = ["--url", url, "--prepared", prepared, "--candidates", lists, "--history", str(n)]
    assert tool.main([*args, "--token-env", TEST_TOKEN_ENV]) == 0
    replayed = json.loads(capsys.readouterr().out)
    evaluated = metrics["results"]["test"]["tiny"]["sampled"]
    assert replayed["requests"] == len(t) and replayed["history_dropped"] == 0
    assert round(replayed["ndcg@10"], 4) == round(evaluated["ndcg@10"], 4)
    assert round(replayed["auc"], 4) == round(evaluated["auc"], 4)


def test_scored_at_drops_later_events_and_dates_the_undated(service, catalogue):
    url, _ = service
    ids = [str(x) for x in catalogue.items["item_id"].iloc[1:31]]
    at = 1_717_000_000  # 2024-05-29
    cands = [{"item_id": i} for i in ids[:20]]
    early = [{"item_id": ids[20], "timestamp": at - 7200}, {"item_id": ids[21], "timestamp": at}]
    late = [
        {"item_id": ids[22], "timestamp": at + 1},
        {"item_id": ids[23], "timestamp": at + 86_400},
    ]
    both = post(url, "/v1/rerank", {"history": early + late, "candidates": cands, "scored_at": at})
    only = post(url, "/v1/rerank", {"history": early, "candidates": cands, "scored_at": at})
    assert both.status_code == only.status_code == 200, both.text
    b, o = both.json(), only.json()
    assert (b["history_used"], b["history_dropped"]) == (2, 2)
    assert b["items"] == o["items"]
    iso = post(
        url,
        "/v1/rerank",
        {"history": early, "candidates": cands, "scored_at": "2024-05-29T16:26:40Z"},
    ).json()
    assert iso["items"] == o["items"]  # ISO-8601 and epoch seconds name the same moment
    # An event without a timestamp happened at the moment of scoring.
    undated = [early[0], {"item_id": ids[21]}]
    u = post(url, "/v1/rerank", {"history": undated, "candidates": cands, "scored_at": at}).json()
    assert u["items"] == o["items"]


def test_a_posted_event_changes_the_next_ranking(service, catalogue):
    url, _ = service
    ids = [str(x) for x in catalogue.items["item_id"].iloc[1:41]]
    req = {"user_id": "carol", "candidates": [{"item_id": i} for i in ids[:20]]}
    first = post(url, "/v1/rerank", req).json()
    assert first["history_used"] == 0
    now = int(time.time())
    events = [{"item_id": i, "timestamp": now - 60 * (5 - j)} for j, i in enumerate(ids[20:25])]
    r = post(url, "/v1/events", {"user_id": "carol", "events": events})
    assert r.status_code == 200 and r.json()["history_length"] == 5
    second = post(url, "/v1/rerank", req).json()
    assert second["history_used"] == 5
    assert [x["score"] for x in second["items"]] != [x["score"] for x in first["items"]]


def test_explanations_name_only_the_users_history_with_sorted_weights(service, catalogue):
    url, _ = service
    ids = [str(x) for x in catalogue.items["item_id"].iloc[1:15]]
    now = int(time.time()) - 3600
    stored = [{"item_id": i, "timestamp": now - 600 * (3 - j)} for j, i in enumerate(ids[:2])]
    r = post(url, "/v1/events", {"user_id": "erin", "events": stored})
    assert r.status_code == 200
    # ids[2] twice: its weights are summed into one entry.
    sent = [{"item_id": i, "timestamp": now - 60 * (3 - j)} for j, i in enumerate(ids[2:4])]
    sent.append({"item_id": ids[2], "timestamp": now - 30})
    history = set(ids[:4])
    plain = {
        "user_id": "erin",
        "history": sent,
        "candidates": [{"item_id": i} for i in ids[6:14]],
        "k": 5,
        "scored_at": now,
    }
    explained = post(url, "/v1/rerank", {**plain, "explain": True}).json()
    assert explained["history_used"] == 5 and len(explained["items"]) == 5
    for item in explained["items"]:
        names = [b["item_id"] for b in item["because"]]
        weights = [b["weight"] for b in item["because"]]
        assert len(names) == 3 and len(set(names)) == 3 and set(names) <= history
        assert all(0 <= w <= 1 for w in weights) and weights == sorted(weights, reverse=True)
    everything = post(url, "/v1/rerank", {**plain, "explain": True, "explain_top": 10}).json()
    for item in everything["items"]:
        # Every history item once, the attention over them summing to 1.
        assert sorted(b["item_id"] for b in item["because"]) == sorted(history)
        # (each weight rounded to 4 decimals)
        assert sum(b["weight"] for b in item["because"]) == pytest.approx(1, abs=1e-3)
    # The explained ranking is the plain one.
    base = post(url, "/v1/rerank", plain)
    assert [x["item_id"] for x in base.json()["items"]] == [
        x["item_id"] for x in explained["items"]
    ]
    # Without explain, or with explain false, the body is what it was before explanations.
    off = post(url, "/v1/rerank", {**plain, "explain": False, "explain_top": 4})
    assert base.content == off.content and b"because" not in base.content
    r = post(url, "/v1/rerank", {**plain, "explain": True, "explain_top": 11})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "explain_top"
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
    assert "explain" in spec["RankedItem"]["properties"]["because"]["description"]
    assert {"explain", "explain_top"} <= set(spec["RerankRequest"]["properties"])


def test_unknown_items_get_a_per_item_error_or_are_encoded_from_text(service, catalogue):
    url, _ = service
    known = str(catalogue.items["item_id"].iloc[1])
    r = post(
        url,
        "/v1/rerank",
        {
            "candidates": [
                {"item_id": known},
                {"item_id": "brand-new", "text": "a brand new item about space travel"},
                {"item_id": "mystery"},
            ],
            "k": 5,
        },
    )
    assert r.status_code == 200
    body = r.json()
    assert {x["item_id"] for x in body["items"]} == {known, "brand-new"}
    assert body["errors"] == [
        {"item_id": "mystery", "error": "unknown item_id and no text to encode it from"}
    ]


GOOD = [{"item_id": "x", "text": "t"}]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/rerank", {}, 422, "candidates"),
        ("/v1/rerank", {"candidates": []}, 422, "candidates"),
        ("/v1/rerank", {"candidates": "x"}, 422, "candidates"),
        ("/v1/rerank", {"candidates": [{"item_id": ""}]}, 422, "item_id"),
        ("/v1/rerank", {"candidates": [{"item_id": "  "}]}, 422, "item_id"),
        ("/v1/rerank", {"candidates": [{"item_id": 7}]}, 422, "item_id"),
        ("/v1/rerank", {"candidates": GOOD, "k": 0}, 422, "k"),
        ("/v1/rerank", {"candidates": GOOD, "k": "ten"}, 422, "k"),
        ("/v1/rerank", {"candidates": GOOD, "k": 21}, 422, "k"),
        ("/v1/rerank", {"candidates": GOOD, "extra": 1}, 422, "extra"),
        ("/v1/rerank", {"candidates": GOOD * 2}, 422, "item_id"),
        (
            "/v1/rerank",
            {"candidates": GOOD, "history": [{"item_id": "a", "event_type": "teleport"}]},
            422,
            "event_type",
        ),
        (
            "/v1/rerank",
            {"candidates": GOOD, "history": [{"item_id": "a", "timestamp": "yesterday"}]},
            422,
            "timestamp",
        ),
        (
            "/v1/rerank",
            {"candidates": [{"item_id": f"c{i}"} for i in range(51)]},
            413,
            "candidates",
        ),
        ("/v1/rerank", {"candidates": [{"item_id": "c", "text": "w" * 201}]}, 413, "text"),
        ("/v1/rerank", {"candidates": GOOD, "history": [{"item_id": "a"}] * 61}, 413, "history"),
        ("/v1/rerank", {"candidates": GOOD, "scored_at": "1970-01-02"}, 422, "scored_at"),
        ("/v1/rerank", {"candidates": GOOD, "scored_at": 4_102_444_800}, 422, "scored_at"),
        ("/v1/rerank", {"candidates": GOOD, "scored_at": "someday"}, 422, "scored_at"),
        ("/v1/events", {"user_id": "u", "events": []}, 422, "events"),
        ("/v1/events", {"events": [{"item_id": "a"}]}, 422, "user_id"),
        ("/v1/events", {"user_id": "", "events": [{"item_id": "a"}]}, 422, "user_id"),
    ],
)
def test_bad_payloads_get_a_4xx_that_names_the_field(service, path, body, status, field):
    url, _ = service
    r = post(url, path, body)
    assert r.status_code == status, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in [str(p) for p in loc] for loc in locs), locs


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "items"),
        ({"items": []}, 422, "items"),
        ({"items": "x"}, 422, "items"),
        ({"items": [{"item_id": ""}]}, 422, "item_id"),
        ({"items": [{"text": "t"}]}, 422, "item_id"),
        ({"items": [{"item_id": "..", "text": "t"}]}, 422, "item_id"),
        ({"items": [{"item_id": "a\nb", "text": "t"}]}, 422, "item_id"),
        ({"items": [{"item_id": "x"}]}, 422, "text"),
        ({"items": [{"item_id": "x", "text": ""}]}, 422, "text"),
        ({"items": [{"item_id": "x", "title": "  "}]}, 422, "text"),
        ({"items": [{"item_id": "x", "title": 5}]}, 422, "title"),
        ({"items": [{"item_id": "x", "text": "w" * 201}]}, 413, "text"),
        ({"items": [{"item_id": "x", "text": "t"}] * 2}, 422, "item_id"),
        ({"items": [{"item_id": "x", "text": "t", "price": 3}]}, 422, "price"),
        ({"items": [{"item_id": f"x{i}", "text": "t"} for i in range(6)]}, 413, "items"),
        ({"items": [{"item_id": "x", "text": "t"}], "replace": "maybe"}, 422, "replace"),
    ],
)
def test_bad_item_payloads_get_a_4xx_that_names_the_field(service, body, status, field):
    url, _ = service
    r = requests.put(f"{url}/v1/items", json=body, headers=TOKEN, timeout=30)
    assert r.status_code == status, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in [str(p) for p in loc] for loc in locs), locs
    gone = requests.delete(f"{url}/v1/items/x", headers=TOKEN, timeout=30)
    assert gone.status_code == 404  # nothing of a refused batch was stored


BIG = str(2**70)
# Raw bodies that JSON parsers accept but that once answered 500: a non-finite
# number, a lone surrogate, an integer beyond 64 bits, each in a field.
HOSTILE = [
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "k": NaN}', "k"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "k": 1e400}', "k"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "k": -Infinity}', "k"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "k": ' + BIG + "}", "k"),
    ("/v1/rerank", '{"candidates": [{"item_id": "\\ud800"}]}', "item_id"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a", "text": "caf\\udcff"}]}', "text"),
    ("/v1/rerank", '{"user_id": "\\udfff", "candidates": [{"item_id": "a"}]}', "user_id"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "scored_at": ' + BIG + "}", "scored_at"),
    ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "scored_at": NaN}', "scored_at"),
    *(
        ("/v1/rerank", '{"candidates": [{"item_id": "a"}], "history": [' + e + "]}", field)
        for e, field in (
            ('{"item_id": "b", "timestamp": NaN}', "timestamp"),
            ('{"item_id": "b", "timestamp": 1e400}', "timestamp"),
            ('{"item_id": "b", "timestamp": ' + BIG + "}", "timestamp"),
            ('{"item_id": "b", "timestamp": 12}', "timestamp"),  # 1970: before min_timestamp
            ('{"item_id": "b", "event_type": "\\ud800"}', "event_type"),
        )
    ),
    *(
        ("/v1/events", '{"user_id": "u", "events": [' + e + "]}", field)
        for e, field in (
            ('{"item_id": "b", "timestamp": NaN}', "timestamp"),
            ('{"item_id": "b", "timestamp": ' + BIG + "}", "timestamp"),
            ('{"item_id": "b", "timestamp": 12}', "timestamp"),
            ('{"item_id": "\\ud800"}', "item_id"),
        )
    ),
    ("/v1/events", '{"user_id": "\\ud800", "events": [{"item_id": "b"}]}', "user_id"),
    ("/v1/rerank", "[" * 5000 + "]" * 5000, "body"),  # deeper than the JSON parser goes
]


@pytest.mark.parametrize(("path", "raw", "field"), HOSTILE)
def test_hostile_json_gets_a_422_naming_the_field_never_a_500(service, path, raw, field):
    url, _ = service
    r = requests.post(
        f"{url}{path}",
        data=raw.encode(),
        headers={**TOKEN, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]  # the body parses: JSON-safe, whatever the input was
    assert all(set(d) == {"loc", "msg", "type"} for d in detail), detail
    assert any(field in [str(p) for p in d["loc"]] for d in detail), detail


def test_every_status_is_declared_with_the_one_error_model(service):
    url, _ = service
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert spec["openapi"].startswith("3.1")
    expected = {
        ("/v1/rerank", "post"): {"401", "413", "422"},  # a store outage degrades it, no 503
        ("/v1/events", "post"): {"401", "413", "422", "503"},
        ("/v1/users/{user_id}/recommendations", "get"): {"401", "404", "422"},
    }
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, sorted(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse", (path, status, ref)


# Requests schemathesis sent, per operation, and what failed (the terminal summary prints it).
SCHEMATHESIS_CALLS: collections.Counter = collections.Counter()
EXAMPLES_PER_MODE = 50


def test_generated_requests_get_no_5xx_and_match_the_documented_schema(service):
    """Requests generated from the OpenAPI 3.1 document the running app publishes,
    for every operation: valid ones (schemathesis's positive mode) and ones that
    break the schema (negative mode). Every answer must be below 500, have a status
    the operation declares, and a body valid against that status's schema. Bounded
    and derandomized: the same requests on every run."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url, _ = service
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/rerank", "/v1/events"}

    def examples(op, mode):
        @hypothesis.given(case=op.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_MODE,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def run(case) -> None:
            response = case.call(headers=TOKEN, timeout=30)
            SCHEMATHESIS_CALLS[f"{op.method.upper()} {op.path}"] += 1
            SCHEMATHESIS_CALLS["server errors"] += response.status_code >= 500
            try:
                case.validate_response(response, checks=checks)
            except BaseException:  # schemathesis raises a group, with a curl to reproduce
                SCHEMATHESIS_CALLS["failed checks"] += 1
                raise

        return run

    for op in operations:
        examples(op, GenerationMode.POSITIVE)()
        try:
            examples(op, GenerationMode.NEGATIVE)()
        except hypothesis.errors.Unsatisfiable:  # nothing to break: no parameters, no body
            assert not op.body and not list(op.iter_parameters()), op.path
    # The items generated requests registered go, so later tests see the catalogue as it was.
    from ray_app.model.catalogue import ActorItemStore

    _, registered = ActorItemStore().changes(0)
    for item_id, item in registered.items():
        if item is not None:
            gone = requests.delete(f"{url}/v1/items/{quote(item_id, safe='')}", headers=TOKEN)
            assert gone.status_code == 200, (item_id, gone.text)


def test_bad_json_and_oversized_bodies(service):
    url, _ = service
    r = requests.post(
        f"{url}/v1/rerank",
        data=b"{not json",
        headers={**TOKEN, "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422
    big = {"candidates": [{"item_id": "c" * 500 + str(i)} for i in range(45)]}
    r = post(url, "/v1/rerank", big)
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]


def test_bearer_token_guards_the_api_but_not_health(service):
    url, _ = service
    body = {"candidates": GOOD}
    assert requests.post(f"{url}/v1/rerank", json=body, timeout=30).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        requests.post(f"{url}/v1/rerank", json=body, headers=wrong, timeout=30).status_code == 401
    )
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=30).json()["status"] == "ready"
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/rerank", "/v1/events", "/v1/users/{user_id}/recommendations"} <= set(spec["paths"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_guard_refuses_before_the_endpoint_and_passes_the_body_on_whole():
    """The ASGI guard in front of every route: a chunked body (no Content-Length) is
    refused once it passes the limit; the token is asked for under a route prefix
    too; an accepted body reaches the endpoint byte for byte."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from ray_app.serving.http import Guard

    async def echo(request):
        return PlainTextResponse((await request.body()).decode())

    app = Guard(Starlette(routes=[Route("/v1/echo", echo, methods=["POST"])]), 100, "tok")
    client = TestClient(app, root_path="/shop")
    ok = {"Authorization": "Bearer tok"}

    def chunks(n: int):
        for _ in range(n):
            yield b"x" * 30

    r = client.post("/v1/echo", content=chunks(3), headers=ok)
    assert r.status_code == 200 and r.text == "x" * 90
    r = client.post("/v1/echo", content=chunks(4), headers=ok)
    assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]
    assert client.post("/v1/echo", content=b"{}").status_code == 401
    assert (
        client.post("/v1/echo", content=b"{}", headers={"Authorization": "Bearer no"}).status_code
        == 401
    )


def test_recommendations_read_the_latest_nightly_partition(service):
    url, _ = service
    r = requests.get(f"{url}/v1/users/alice/recommendations", headers=TOKEN, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["item_id"] for x in body["items"]] == ["i1", "i2", "i3"]
    assert body["partition"] == "dt=2026-11-22" and body["model_version"] == "v-test"
    r = requests.get(f"{url}/v1/users/alice/recommendations?k=2", headers=TOKEN, timeout=30)
    assert len(r.json()["items"]) == 2
    r = requests.get(f"{url}/v1/users/nobody/recommendations", headers=TOKEN, timeout=30)
    assert r.status_code == 404 and "nobody" in r.json()["detail"][0]["msg"]
    assert r.json()["detail"][0]["loc"] == ["path", "user_id"]


def _copy_with_version(src: str, dst: Path, version: str) -> str:
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf["version"] = version
    (dst / "config.json").write_text(json.dumps(conf))
    return str(dst)


def test_model_swap_under_load_drops_no_request(service, trained, tmp_path):
    from ray import serve

    from ray_app.serving.app import build_app

    url, sc = service
    cfg, _ = trained
    new = _copy_with_version(cfg.output, tmp_path / "v2", "v2-swapped")
    ids = [{"item_id": "x", "text": "some text"}]

    def send() -> tuple[int, str | None]:
        r = post(url, "/v1/rerank", {"candidates": ids})
        return r.status_code, r.json().get("model_version")

    def swap() -> None:
        serve.run(build_app(sc.app_args().model_copy(update={"model": new})), name=sc.app_name)

    results, _ = swap_under_load(send, swap, "v2-swapped", clients=4, timeout_s=120)
    failures = [r for r in results if r[0] != 200]
    versions = [v for _, v in results]
    assert not failures, failures[:5]
    assert versions[0] != "v2-swapped" and versions[-1] == "v2-swapped"
    # Back to the session model for the tests after this one.
    serve.run(build_app(sc.app_args()), name=sc.app_name)


def _one_replica(model: str, port: int, name: str, **settings) -> ServeConfig:
    """An app of a test's own (`rerank-<name>` at `/<name>`) beside the session's
    service: one replica, half a CPU."""
    return ServeConfig(
        model=model,
        port=port,
        app_name=f"rerank-{name}",
        route_prefix=f"/{name}",
        num_cpus=0.5,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        **settings,
    )


def kill_replica_then_rerank(app_name: str, url: str, body: dict) -> dict | None:
    """Kill the app's (one) replica, then send `body` to /v1/rerank until the replica
    Serve starts in its place answers 200 (its body), or 2 minutes pass (None)."""
    import ray

    replica = [a for a in ray.util.list_named_actors(all_namespaces=True) if app_name in a["name"]]
    assert replica, "no replica actor found"
    ray.kill(ray.get_actor(replica[0]["name"], namespace=replica[0]["namespace"]), no_restart=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            r = requests.post(f"{url}/v1/rerank", json=body, timeout=10)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return None


def test_redis_store_keeps_every_acknowledged_event_when_the_replica_dies(
    trained, serve_port, redis_url
):
    from ray import serve

    from ray_app.serving.events import RedisEventStore

    cfg, _ = trained
    sc = _one_replica(
        cfg.output, serve_port, "redis", events={"kind": "redis", "redis_url": redis_url}
    )
    url = _deploy(sc)
    ids = [str(x) for x in load_artifact(cfg.output).items["item_id"].iloc[1:30]]
    acked = []
    for j, item in enumerate(ids[:10]):
        r = requests.post(
            f"{url}/v1/events",
            json={"user_id": "dave", "events": [{"item_id": item, "timestamp": NOW - 100 + j}]},
            timeout=30,
        )
        assert r.status_code == 200
        acked.append(item)
    body = kill_replica_then_rerank(
        sc.app_name, url, {"user_id": "dave", "candidates": [{"item_id": ids[-1]}]}
    )
    assert body is not None and body["history_used"] == 10
    stored = RedisEventStore(redis_url, 200).get("dave")
    assert [e.item_id for e in stored] == acked
    serve.delete(sc.app_name)


def test_autoscaling_goes_up_to_max_under_load_and_back_down_when_idle(trained, serve_port):
    from ray import serve

    from ray_app.serving.run import running_replicas

    cfg, _ = trained
    sc = ServeConfig(
        model=cfg.output,
        port=serve_port,
        app_name="rerank-scale",
        route_prefix="/scale",
        num_cpus=0.25,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    )
    url = _deploy(sc)
    body = {"candidates": [{"item_id": f"n{i}", "text": f"new item {i}"} for i in range(40)]}
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{url}/v1/rerank", json=body, timeout=30)

    threads = [threading.Thread(target=load) for _ in range(8)]
    t0 = time.time()
    for th in threads:
        th.start()
    seen = [(0.0, running_replicas(sc.app_name))]
    while time.time() - t0 < 120 and seen[-1][1] < 2:
        time.sleep(1)
        seen.append((round(time.time() - t0, 1), running_replicas(sc.app_name)))
    stop.set()
    for th in threads:
        th.join()
    up = seen[-1]
    t1 = time.time()
    while time.time() - t1 < 120 and seen[-1][1] > 1:
        time.sleep(1)
        seen.append((round(time.time() - t0, 1), running_replicas(sc.app_name)))
    print(f"\nautoscaling (s since load began, running replicas): {seen}")
    assert up[1] == 2, seen
    assert seen[-1][1] == 1, seen
    serve.delete(sc.app_name)


class RedisProcess:
    """A redis-server of this test alone, on a fixed port and folder, with the
    append-only file fsynced on every write: stopped and started again, it comes
    back with every write it acknowledged."""

    def __init__(self, folder: Path) -> None:
        import shutil

        self.exe = shutil.which("redis-server")
        self.folder, self.port, self.proc = folder, free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import subprocess

        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_a_redis_outage_degrades_and_loses_no_acknowledged_event(
    trained, serve_port, redis_url, tmp_path
):
    """Two faults: Redis refusing connections (stopped) and Redis hanging (SIGSTOP).
    During each, /v1/rerank answers from the request's own history and says so,
    /v1/events answers 503 with Retry-After; after each, both work again without a
    restart; at the end Redis holds every acknowledged event and nothing never posted."""
    import os
    import signal

    from ray import serve

    from ray_app.serving.events import RedisEventStore

    del redis_url  # the session's server: only for its skip-or-fail rule
    server = RedisProcess(tmp_path)
    server.start()
    cfg, _ = trained
    events = {"kind": "redis", "redis_url": server.url, "timeout_s": 0.5, "retry_after_s": 3}
    sc = _one_replica(cfg.output, serve_port, "outage", events=events)
    url = _deploy(sc)
    ids = [str(x) for x in load_artifact(cfg.output).items["item_id"].iloc[1:40]]
    posted, acked, seq = [], [], iter(range(10_000))

    def post_event(expect: int) -> requests.Response:
        n = next(seq)
        event = {"item_id": ids[n % 30], "timestamp": NOW - 10_000 + n}
        posted.append((event["item_id"], event["timestamp"]))
        t = time.time()
        r = requests.post(
            f"{url}/v1/events", json={"user_id": "erin", "events": [event]}, timeout=30
        )
        assert time.time() - t < 10, "a store call must be bounded by events.timeout_s"
        assert r.status_code == expect, r.text
        if r.status_code == 200:
            acked.append((event["item_id"], event["timestamp"]))
        else:
            assert r.headers["Retry-After"] == "3"
            assert r.json()["detail"][0]["type"] == "unavailable"
        return r

    def rerank(expect_stored: str) -> dict:
        own = [
            {"item_id": ids[35], "timestamp": NOW - 5},
            {"item_id": ids[36], "timestamp": NOW - 4},
        ]
        r = requests.post(
            f"{url}/v1/rerank",
            json={"user_id": "erin", "history": own, "candidates": [{"item_id": ids[38]}]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["stored_history"] == expect_stored, body
        return body

    for _ in range(3):
        post_event(200)
    assert rerank("used")["history_used"] == 3 + 2

    def until_back() -> None:
        """The first calls after a fault may still meet a dead connection; the
        app recovers by itself within a few seconds."""
        deadline = time.time() + 30
        while time.time() < deadline:
            if rerank_ok():
                return
            time.sleep(0.5)
        raise AssertionError("the app did not recover after Redis came back")

    def rerank_ok() -> bool:
        r = requests.post(
            f"{url}/v1/rerank",
            json={"user_id": "erin", "candidates": [{"item_id": ids[38]}]},
            timeout=30,
        )
        return r.status_code == 200 and r.json()["stored_history"] == "used"

    # Fault 1: refused connections.
    server.stop()
    for _ in range(3):
        post_event(503)
    assert rerank("unavailable")["history_used"] == 2  # the request's own events
    server.start()
    until_back()
    for _ in range(3):
        post_event(200)

    # Fault 2: a hung server (accepts connections, never answers).
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            post_event(503)
        assert rerank("unavailable")["history_used"] == 2
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    until_back()
    for _ in range(3):
        post_event(200)

    stored = [(e.item_id, e.timestamp) for e in RedisEventStore(server.url, 500).get("erin")]
    assert set(acked) <= set(stored), "an acknowledged event is missing"
    assert set(stored) <= set(posted), "Redis holds an event that was never posted"
    assert len(stored) == len(set(stored))
    assert rerank("used")["history_used"] == len(stored) + 2
    print(
        f"\nredis outage: {len(posted)} events posted, {len(acked)} acknowledged, "
        f"{len(stored)} stored ({len(stored) - len(acked)} of the 503'd ones landed late)"
    )
    serve.delete(sc.app_name)
    server.stop()


def _scrape(metrics_url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the Prometheus endpoint: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(metrics_url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _total(samples: dict, name: str, app: str = "rerank", **labels: str) -> float:
    """Sum of `name` over the app's samples that carry `labels` (every replica)."""
    want = {("application", app), *labels.items()}
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def test_prometheus_shows_every_app_metric_with_the_counts_sent(service, catalogue, metrics_url):
    from ray_app.serving.metrics import APP_METRICS, SERVE_METRICS

    url, _ = service
    known = [str(i) for i in catalogue.items["item_id"].iloc[1:4]]
    before = _scrape(metrics_url)
    new = {"item_id": "metrics-new", "text": "a kite for windy beaches"}
    sent = [
        {
            "candidates": [{"item_id": i} for i in known],
            "history": [{"item_id": known[0]}, {"item_id": known[1]}],
        },
        {"candidates": [{"item_id": known[0]}, new, {"item_id": "metrics-mystery"}]},
        {"candidates": [new, {"item_id": "metrics-mystery"}], "user_id": "metrics-user"},
        {"candidates": [{"item_id": "metrics-reg"}], "history": [{"item_id": "nobody-knows"}]},
    ]
    r = requests.put(
        f"{url}/v1/items",
        json={"items": [{"item_id": "metrics-reg", "title": "a registered puzzle"}]},
        headers=TOKEN,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    for body in sent:
        r = post(url, "/v1/rerank", body)
        assert r.status_code == 200, r.text
    assert post(url, "/v1/rerank", {"candidates": GOOD, "k": 0}).status_code == 422
    version = r.json()["model_version"]

    # Histograms by their counts: Ray exports a histogram's sum from bucket midpoints.
    expect = {
        ("ray_rerank_candidates_count", ()): len(sent),
        ("ray_rerank_candidates_bucket", (("le", "1.0"),)): 1,
        ("ray_rerank_candidates_bucket", (("le", "5.0"),)): len(sent),
        ("ray_rerank_history_events_bucket", (("le", "1.0"),)): len(sent) - 1,
        ("ray_rerank_history_events_bucket", (("le", "2.0"),)): len(sent),
        ("ray_rerank_history_dropped_total", ()): 1,
        ("ray_rerank_new_items_total", (("source", "encoded"),)): 1,
        ("ray_rerank_new_items_total", (("source", "cache"),)): 1,
        ("ray_rerank_new_items_total", (("source", "registered"),)): 1,
        ("ray_rerank_unknown_items_total", ()): 2,
        ("ray_rerank_stored_history_reads_total", (("result", "used"),)): 1,
        # Sent one at a time: one batch of one each.
        ("ray_serve_actual_batch_size_bucket", (("function_name", "_score"), ("le", "1.0"))): 4,
        ("ray_serve_actual_batch_size_count", (("function_name", "_score"),)): len(sent),
        (
            "ray_serve_num_http_requests_total",
            (("route", "/v1/rerank"), ("status_code", "422")),
        ): 1,
        (
            "ray_serve_num_http_requests_total",
            (("route", "/v1/rerank"), ("status_code", "200")),
        ): len(sent),
    }

    def got(after: dict) -> dict:
        return {
            key: _total(after, key[0], **dict(key[1])) - _total(before, key[0], **dict(key[1]))
            for key in expect
        }

    deadline = time.monotonic() + 90
    while True:
        after = _scrape(metrics_url)
        if got(after) == expect or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert got(after) == expect
    assert _total(after, "ray_rerank_model_info", model_version=version) == 1
    names = {n for n, _ in after}
    for m in APP_METRICS + SERVE_METRICS:
        shown = (
            {m.name + s for s in ("_bucket", "_count", "_sum")}
            if m.kind == "histogram"
            else {m.name}
        )
        assert shown & names, f"{m.name} is documented but not exported"
