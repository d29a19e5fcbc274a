"""Catalogue updates: items registered through the API are scored everywhere from their
stored vectors, follow model swaps, can be retired, and reach the nightly lists.

The store's semantics are checked on both stores in-process (two `Catalogue`s
are two replicas); the service's over HTTP with Redis, two apps standing for two
replicas, one of them killed and restarted by Serve.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests

from ray_app.batch.nightly import end_of_day, run_nightly
from ray_app.data import schema as S
from ray_app.model.artifact import load_artifact
from ray_app.model.catalogue import Catalogue, MemoryItemStore, RedisItemStore, Registered
from ray_app.model.ranker import Candidate, Event, Query, Ranker
from ray_app.storage import read_parquet
from tests.conftest import free_port
from tests.test_nightly import _config as nightly_config
from tests.test_serve import (
    _copy_with_version,
    _deploy,
    _one_replica,
    kill_replica_then_rerank,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NEW_TEXT = "a wooden puzzle box with a hidden drawer"
UNKNOWN = "unknown item_id and no text to encode it from"


@pytest.fixture(scope="module")
def artifact(trained):
    return load_artifact(trained[0].output)


def _query(ranker: Ranker, items: list[str], text: str | None = None) -> dict:
    history = [Event(str(i), 1_700_000_000 + n) for n, i in enumerate(ranker.item_ids[1:6])]
    ranked = ranker.score([Query(history, [Candidate(i, text) for i in items], now=1_700_001_000)])
    return {"items": dict(ranked[0].items), "errors": dict(ranked[0].errors)}


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryItemStore()
    url = request.getfixturevalue("redis_url")
    return RedisItemStore(url, prefix=f"t-{uuid.uuid4().hex[:8]}:")


def test_a_registered_item_is_scored_by_another_process_without_its_text(artifact, store):
    a, b = Catalogue(store), Catalogue(store)
    ra, rb = Ranker(artifact), Ranker(artifact)
    a.load(ra)
    b.load(rb)
    a.register([Registered("new-1", NEW_TEXT)])
    assert "new-1" in _query(ra, ["new-1"])["items"]
    assert _query(rb, ["new-1"])["errors"] == {"new-1": UNKNOWN}  # before b syncs
    assert b.sync() == 1
    got = _query(rb, ["new-1"])["items"]
    assert got == pytest.approx(_query(ra, ["new-1"])["items"], abs=1e-6)
    assert b.encoded == 0  # read from the store, not encoded again
    # The score is the one the text gives a new item sent with it.
    fresh = _query(Ranker(artifact), ["fresh"], NEW_TEXT)["items"]["fresh"]
    assert got["new-1"] == pytest.approx(fresh, abs=1e-5)

    # Retired: unknown without text, a new item again with it.
    assert store.delete("new-1") and not store.delete("new-1")
    b.sync()
    assert _query(rb, ["new-1"])["errors"] == {"new-1": UNKNOWN}
    assert _query(rb, ["new-1"], "another text entirely")["items"]["new-1"] != pytest.approx(
        got["new-1"], abs=1e-6
    )


def test_a_replaced_trained_item_is_scored_from_its_new_text(artifact, store):
    cat, ranker = Catalogue(store), Ranker(artifact)
    cat.load(ranker)
    trained = str(ranker.item_ids[3])
    before = _query(ranker, [trained])["items"][trained]
    cat.register([Registered(trained, NEW_TEXT, replace=True)])
    after = _query(ranker, [trained])["items"][trained]
    as_new = _query(Ranker(artifact), ["fresh"], NEW_TEXT)["items"]["fresh"]
    assert after == pytest.approx(as_new, abs=1e-5) and after != pytest.approx(before, abs=1e-6)
    store.delete(trained)
    cat.sync()
    assert _query(ranker, [trained])["items"][trained] == pytest.approx(before, abs=1e-6)


def test_a_new_model_version_gets_its_own_vectors_and_the_old_ones_go(
    artifact, trained, store, tmp_path
):
    cat, old = Catalogue(store), Ranker(artifact)
    cat.load(old)
    cat.register([Registered("new-1", NEW_TEXT), Registered("new-2", "a kite")])
    new = Ranker(load_artifact(_copy_with_version(trained[0].output, tmp_path / "v2", "v2")))
    assert cat.load(new) == 2  # both re-encoded for v2
    assert set(store.vectors(new.space, ["new-1", "new-2"])) == {"new-1", "new-2"}
    assert "new-1" in _query(new, ["new-1"])["items"]
    store.activate(old.space, None, 3600)
    assert store.activate(new.space, old.space, 3600) == []  # within the grace period
    assert store.activate(new.space, None, 0) == [old.space]
    assert old.space not in store.spaces() and store.vectors(old.space, ["new-1"]) == {}
    # A process that loads v2 later reads them; it encodes nothing.
    later = Catalogue(store)
    assert later.load(Ranker(new.artifact)) == 0


# --- the service --------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    yield free_port()
    serve.shutdown()


def _put(url: str, items: list[dict], replace: bool = False) -> requests.Response:
    return requests.put(f"{url}/v1/items", json={"items": items, "replace": replace}, timeout=60)


def _rerank(url: str, candidates: list[dict]) -> dict:
    r = requests.post(f"{url}/v1/rerank", json={"candidates": candidates}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _scores(body: dict) -> dict[str, float]:
    return {x["item_id"]: x["score"] for x in body["items"]}


def test_items_put_to_one_replica_are_scored_by_another_after_a_restart_and_a_swap(
    trained, serve_port, redis_url, tmp_path
):
    from ray import serve

    from ray_app.serving.app import build_app

    cfg, _ = trained
    settings = {
        "events": {"kind": "redis", "redis_url": redis_url},
        "items": {"key_prefix": f"t-{uuid.uuid4().hex[:8]}:", "grace_s": 0, "sync_s": 0.5},
    }
    a = _one_replica(cfg.output, serve_port, "items-a", **settings)
    b = _one_replica(cfg.output, serve_port, "items-b", **settings)
    url_a, url_b = _deploy(a), _deploy(b)
    trained_id = str(load_artifact(cfg.output).items[S.ITEM_ID].iloc[2])

    r = _put(url_a, [{"item_id": "n1", "title": "Puzzle box", "genres": ["Toys", "Games"]}])
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [{"item_id": "n1", "replaced": False}]
    at_a = _scores(_rerank(url_a, [{"item_id": "n1"}]))
    at_b = _scores(_rerank(url_b, [{"item_id": "n1"}]))  # b never saw the PUT
    assert at_b == pytest.approx(at_a, abs=1e-5)
    assert requests.get(f"{url_b}/readyz", timeout=30).json()["items_encoded"] == 0

    # A trained id: 409 naming it, unless replace.
    r = _put(url_a, [{"item_id": "n2", "text": "x"}, {"item_id": trained_id, "text": NEW_TEXT}])
    assert r.status_code == 409
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "items", 1, "item_id"]]
    assert "n2" in _rerank(url_a, [{"item_id": "n2"}])["errors"][0]["item_id"]  # all or nothing
    r = _put(url_a, [{"item_id": trained_id, "text": NEW_TEXT}], replace=True)
    assert r.status_code == 200 and r.json()["items"][0]["replaced"] is True
    replaced = _scores(
        _rerank(url_a, [{"item_id": trained_id}, {"item_id": "x", "text": NEW_TEXT}])
    )
    assert replaced[trained_id] == pytest.approx(replaced["x"], abs=1e-5)

    # Retired: the unknown-item error without text, a new item with it.
    assert requests.delete(f"{url_a}/v1/items/n1", timeout=30).status_code == 200
    assert requests.delete(f"{url_a}/v1/items/n1", timeout=30).status_code == 404
    body = _rerank(url_a, [{"item_id": "n1"}])
    assert body["errors"] == [{"item_id": "n1", "error": UNKNOWN}]
    r = _put(url_a, [{"item_id": "n1", "text": NEW_TEXT}])
    assert r.status_code == 200

    # b's replica dies; the one Serve starts scores n1 from the store, encoding nothing.
    body = kill_replica_then_rerank(b.app_name, url_b, {"candidates": [{"item_id": "n1"}]})
    assert body is not None and [x["item_id"] for x in body["items"]] == ["n1"], body
    assert requests.get(f"{url_b}/readyz", timeout=30).json()["items_encoded"] == 0

    # A catalogue file through the CLI: the rows the service refuses are kept, with why.
    from ray_app import cli

    csv = tmp_path / "new_items.csv"
    csv.write_text(
        "item_id,title,genres\n"
        f"n3,Kite,Outdoor|Toys\n{trained_id},A trained id,Toys\nn4,,\nn5,Marbles,Games\n"
    )
    assert cli.main(["items", "add", str(csv), "--url", url_a, "--batch-size", "3"]) == 3
    rejected = [json.loads(x) for x in (tmp_path / "new_items.csv.rejected.jsonl").open()]
    assert {(r["item_id"], r["status"]) for r in rejected} == {(trained_id, 409), ("n4", 422)}
    scored = _rerank(url_b, [{"item_id": "n3"}, {"item_id": "n5"}])["items"]
    assert {x["item_id"] for x in scored} == {"n3", "n5"}
    for item_id in ("n3", "n5"):
        assert requests.delete(f"{url_a}/v1/items/{item_id}", timeout=30).status_code == 200

    # A new model version: a's registered items are re-encoded for it before it serves.
    store = RedisItemStore(redis_url, prefix=settings["items"]["key_prefix"])
    v2 = _copy_with_version(cfg.output, tmp_path / "v2", "items-v2")
    app = build_app(a.app_args().model_copy(update={"model": v2}))
    serve.run(app, name=a.app_name, route_prefix=a.route_prefix)
    ready = requests.get(f"{url_a}/readyz", timeout=30).json()
    assert ready["model_version"] == "items-v2" and ready["registered_items"] == 2
    assert set(store.vectors(f"items-v2/{ready['text_encoder']}", ["n1", trained_id])) == {
        "n1",
        trained_id,
    }
    body = _rerank(url_a, [{"item_id": "n1"}])
    assert body["model_version"] == "items-v2" and body["items"][0]["item_id"] == "n1"
    serve.delete(a.app_name)
    serve.delete(b.app_name)


def test_nightly_lists_can_contain_a_registered_item(prepared, trained, redis_url, tmp_path):
    cfg, _ = trained
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    ranker = Ranker(load_artifact(cfg.output), text_encoder="auto")  # as nightly's default
    cat = Catalogue(RedisItemStore(redis_url, prefix=prefix))
    cat.load(ranker)
    cat.register([Registered("brand-new", NEW_TEXT)])
    everything = len(ranker.item_ids) + 1
    items = {"kind": "redis", "redis_url": redis_url, "key_prefix": prefix}
    ncfg = nightly_config(
        prepared, cfg.output, tmp_path / "topk", k=everything, num_candidates=0, items=items
    )
    result = run_nightly(ncfg)
    assert result["registered_items"] == 1
    lists = read_parquet(str(Path(ncfg.output) / "dt=2026-11-23"))
    got = lists[lists[S.ITEM_ID] == "brand-new"]
    assert set(got[S.USER_ID]) == set(lists[S.USER_ID])  # ranked with the whole catalogue
    # Its score is the one /v1/rerank gives the user for it.
    events = read_parquet(str(Path(prepared) / "interactions"))
    user = str(got[S.USER_ID].iloc[0])
    ev = events[events[S.USER_ID] == user]
    names = {v: k for k, v in ranker.events.items()}
    history = [
        Event(i, int(t), names[int(e)])
        for i, t, e in zip(ev[S.ITEM_ID], ev[S.TIMESTAMP], ev[S.EVENT_IDX], strict=True)
    ]
    online = ranker.score([Query(history, [Candidate("brand-new")], now=end_of_day("2026-11-23"))])
    assert float(got[S.SCORE].iloc[0]) == pytest.approx(online[0].items[0][1], abs=1e-5)
