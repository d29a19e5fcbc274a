"""The Ranker that serving and the nightly job share, against the model's batch path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ray_app.model.history import make_history
from ray_app.model.ranker import (
    Candidate,
    Event,
    Query,
    Ranker,
    UnknownEventType,
    attention_by_item,
)
from ray_app.protocol.data import load_prepared

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ranker(trained) -> Ranker:
    cfg, _ = trained
    return Ranker.from_path(cfg.output, cache_size=2)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def scorer(trained, ranker, request) -> Ranker:
    """Both forward passes `/v1/rerank` can run: each must give the batch path's scores."""
    return Ranker(ranker.artifact, cache_size=2, scorer=request.param)


@pytest.fixture(scope="module")
def users(prepared):
    """(item_ids, timestamps, event types) of a few valid-split histories."""
    data = load_prepared(prepared)
    t = data.splits["valid"]
    ids = data.items["item_id"].to_numpy()
    types = data.manifest["resolved"]["event_types"]
    out = []
    for i in range(6):
        h = t.histories[i]
        out.append(
            (
                [str(ids[x]) for x in h],
                [int(x) for x in t.history_times[i]],
                [types[int(e) - 1] for e in t.history_events[i]],
            )
        )
    return out


def _query(user, cands, now, k=None):
    items, times, kinds = user
    hist = [Event(i, t, e) for i, t, e in zip(items, times, kinds, strict=True)]
    # In time order: events with equal timestamps keep the order they are given in.
    return Query(hist, [Candidate(c) for c in cands], k=k, now=now)


def _offline_history(art, user, now: int):
    """The user's history as the batch path (`make_history`) reads it."""
    items, times, kinds = user
    return make_history(
        [np.array([art.item_index[i] for i in items])],
        [np.array([art.event_index[e] for e in kinds])],
        [np.array(times)],
        np.array([now]),
        art.model.cfg.max_history,
    )


def test_scores_equal_the_batch_path(scorer, users):
    ranker = scorer
    art = ranker.artifact
    ids = art.items["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    now = max(max(u[1]) for u in users) + 3600
    cand_idx = [rng.choice(np.arange(1, len(ids)), size=n, replace=False) for n in (5, 40, 17)]
    queries = [
        _query(users[j], [str(ids[c]) for c in cand_idx[j % 3]], now) for j in range(len(users))
    ]
    got = ranker.score(queries)
    for j, (q, r) in enumerate(zip(queries, got, strict=True)):
        idx = torch.as_tensor(cand_idx[j % 3])
        hist = _offline_history(art, users[j], now)
        offline = art.model.predict(hist, art.item_vectors[idx])[0].numpy()
        want = {str(ids[c]): float(s) for c, s in zip(cand_idx[j % 3], offline, strict=True)}
        assert len(r.items) == len(q.candidates) and not r.errors
        scores = [s for _, s in r.items]
        assert scores == sorted(scores, reverse=True)
        for item, s in r.items:
            assert s == pytest.approx(want[item], abs=1e-5)
    # A user with no history yet (one padding column).
    none = np.array([], np.int64)
    empty = make_history([none], [none], [none], np.array([now]), art.model.cfg.max_history)
    offline = art.model.predict(empty, art.item_vectors[torch.as_tensor(cand_idx[0])])[0]
    (r,) = ranker.score([Query([], [Candidate(str(ids[c])) for c in cand_idx[0]], now=now)])
    got = dict(r.items)
    for c, s in zip(cand_idx[0], offline.numpy(), strict=True):
        assert got[str(ids[c])] == pytest.approx(float(s), abs=1e-5)


def test_explanations_are_the_models_attention_and_leave_other_rows_alone(scorer, users):
    """Both forward passes explain (ONNX from the graph's attention output); a batch
    mixing explained and plain queries gives the plain ones their scores byte for byte."""
    ranker = scorer
    art = ranker.artifact
    ids = art.items["item_id"].to_numpy()
    now = max(max(u[1]) for u in users) + 3600
    cands = [str(i) for i in ids[1:21]]
    plain = [_query(u, cands, now, k=5) for u in users[:3]]
    asked = [dataclasses.replace(q, explain=2) for q in plain]
    alone = ranker.score(plain)
    mixed = ranker.score([plain[0], asked[0], plain[1], asked[1], asked[2]])
    assert mixed[0].items == alone[0].items and mixed[2].items == alone[1].items
    assert mixed[0].because is None and mixed[0].as_dicts() == alone[0].as_dicts()
    for j, r in enumerate([mixed[1], mixed[3], mixed[4]]):
        assert [i for i, _ in r.items] == [i for i, _ in alone[j].items]
        assert [s for _, s in r.items] == pytest.approx([s for _, s in alone[j].items], abs=1e-5)
        hist = _offline_history(art, users[j], now)
        listed = torch.as_tensor([art.item_index[i] for i, _ in r.items])
        _, att = art.model.explain(hist, art.item_vectors[listed])
        want = attention_by_item(hist.items[0].numpy(), att[0].numpy(), 2)
        assert len(r.because) == len(r.items)
        for got, ref in zip(r.because, want, strict=True):
            assert [h for h, _ in got] == [str(ids[i]) for i, _ in ref]
            assert [w for _, w in got] == pytest.approx([w for _, w in ref], abs=1e-4)


def test_k_cuts_and_unknown_items(ranker, users):
    ids = ranker.artifact.items["item_id"].to_numpy()
    known = [str(x) for x in ids[1:6]]
    text = ranker.artifact.items["text"].iloc[1]
    q = Query(
        [Event("never-seen", 10), Event(known[0], 20, None)],
        [Candidate(c) for c in known]
        + [Candidate("new-with-text", text), Candidate("new-no-text")],
        k=3,
    )
    (r,) = ranker.score([q])
    assert len(r.items) == 3
    assert r.errors == [("new-no-text", "unknown item_id and no text to encode it from")]
    assert r.history_used == 1 and r.history_dropped == 1
    (full,) = ranker.score([Query(q.history, q.candidates, now=q.now)])
    assert "new-with-text" in [i for i, _ in full.items] and len(full.items) == 6


def test_new_item_from_text_matches_the_text_part_of_the_item_table(ranker):
    items = ranker.artifact.items
    idx = [1, 2, 3]
    got = ranker.encode_texts(list(items["text"].iloc[idx]))
    model = ranker.model
    want = model.items.from_text(model.text_table[torch.as_tensor(idx)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cold_cache_is_bounded_and_reused(ranker):
    before = ranker.cold_encoded
    q = Query([], [Candidate(f"n{i}", f"some new item number {i}") for i in range(3)])
    ranker.score([q])
    assert ranker.cold_encoded - before == 3 and len(ranker._cold) == 2
    ranker.score([Query([], [Candidate("n2", "some new item number 2")])])
    assert ranker.cold_encoded - before == 3  # cached


def test_unknown_event_type_is_named(ranker):
    q = Query([Event(str(ranker.artifact.items["item_id"].iloc[1]), 1, "teleport")], [])
    with pytest.raises(UnknownEventType, match="'teleport'"):
        ranker.score([Query(q.history, [Candidate("x", "t")])])
    (r,) = ranker.score([Query(q.history, [Candidate("x", "t")])], strict_events=False)
    assert r.history_used == 1
