"""Items registered after training: their text, and their vectors per model version.

`PUT /v1/items` registers items (new ones, or trained ones whose text changed)
and `DELETE /v1/items/{id}` retires them; the nightly job reads them too. The
store keeps each item's text once and its vector once per *space* (model
version and text backend, `Ranker.space`), so a replica that restarts, another
replica, or the nightly job scores the item without encoding it again, and a
new model version gets its own vectors (re-encoded from the stored text).

Every change bumps a generation number and records the item under it; a
process's `Catalogue` pulls the changes since the generation it last saw (a
background sync, and at once when a request names an item it does not know),
and lays the vectors over its `Ranker`'s item table.

Two stores, like the event store: one named Ray actor (one machine), or Redis
(a cluster; the writes are Lua scripts, so a change and its generation land
together). Vectors of a space nobody serves any more are deleted `grace_s`
after the last process using it moved on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from ray_app.config import StrictModel
from ray_app.runtime import redis_client

logger = logging.getLogger(__name__)

ACTOR_NAME = "rerank-item-store"
NAMESPACE = "rerank"


class CatalogueConfig(StrictModel):
    """Where registered items (`PUT /v1/items`) are kept: the serving app takes the event
    store's setting (`events`); the nightly job names it here."""

    kind: Literal["actor", "redis"] = "actor"
    """`actor` (one named Ray actor, on the Ray cluster the job runs on) or `redis`."""
    redis_url: str | None = None
    """redis://host:port/db; default: the RERANK_REDIS_URL environment variable."""
    key_prefix: str = "rerank:items:"
    """Prefix of the Redis keys."""
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Longest wait for the store on each call."""

    @model_validator(mode="after")
    def _redis_has_url(self) -> CatalogueConfig:
        if self.kind == "redis" and not (self.redis_url or os.environ.get("RERANK_REDIS_URL")):
            raise ValueError("kind 'redis' needs redis_url or RERANK_REDIS_URL")
        return self


@dataclass(frozen=True)
class Registered:
    """A registered item: the text its vectors are encoded from, and whether it replaces
    a trained item's (`replace`; otherwise an id the model knows keeps its trained row)."""

    item_id: str
    text: str
    replace: bool = False

    def dumps(self) -> str:
        return json.dumps({"text": self.text, "replace": self.replace}, ensure_ascii=False)

    @classmethod
    def loads(cls, item_id: str, raw: str | bytes) -> Registered:
        d = json.loads(raw)
        return cls(item_id, d["text"], bool(d.get("replace", False)))


class StoreUnavailable(RuntimeError):
    """The item store did not answer in time, or refused the connection."""


class ItemStore(Protocol):
    def put(self, items: Sequence[Registered], space: str, vectors: np.ndarray) -> int:
        """Register `items` with their vectors in `space` (their vectors in any other
        space are dropped: they were encoded from the old text); the new generation."""

    def delete(self, item_id: str) -> bool:
        """Retire an item (text and every vector); False if it was not registered."""

    def changes(self, since: int) -> tuple[int, dict[str, Registered | None]]:
        """The generation now, and every item changed after `since` (None: retired)."""

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of `ids` in `space` (missing ones left out)."""

    def add_vectors(self, space: str, vectors: dict[str, np.ndarray]) -> None:
        """Store vectors encoded for `space` from the registered text."""

    def activate(self, space: str, previous: str | None, grace_s: float) -> list[str]:
        """`space` is in use; `previous` (if any) is not by this process any more. Deletes
        the vectors of spaces left more than `grace_s` ago; returns those spaces."""

    def spaces(self) -> dict[str, float]:
        """Every space with stored vectors -> when it was left (0: in use)."""


def _pack(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def _unpack(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4").copy()


class MemoryItemStore:
    """In-process store: the actor's state, and tests."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.changed: dict[str, int] = {}
        self.gen = 0
        self.vecs: dict[str, dict[str, bytes]] = {}
        self.left: dict[str, float] = {}

    def put(self, items: Sequence[Registered], space: str, vectors: np.ndarray) -> int:
        self.gen += 1
        self.left.setdefault(space, 0.0)
        for item, v in zip(items, vectors, strict=True):
            self.texts[item.item_id] = item.dumps()
            for name, table in self.vecs.items():
                if name != space:
                    table.pop(item.item_id, None)
            self.vecs.setdefault(space, {})[item.item_id] = _pack(v)
            self.changed[item.item_id] = self.gen
        return self.gen

    def delete(self, item_id: str) -> bool:
        if self.texts.pop(item_id, None) is None:
            return False
        for table in self.vecs.values():
            table.pop(item_id, None)
        self.gen += 1
        self.changed[item_id] = self.gen
        return True

    def changes(self, since: int) -> tuple[int, dict[str, Registered | None]]:
        out: dict[str, Registered | None] = {}
        for item_id, gen in self.changed.items():
            if gen > since:
                raw = self.texts.get(item_id)
                out[item_id] = None if raw is None else Registered.loads(item_id, raw)
        return self.gen, out

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        table = self.vecs.get(space, {})
        return {i: _unpack(table[i]) for i in ids if i in table}

    def add_vectors(self, space: str, vectors: dict[str, np.ndarray]) -> None:
        self.left.setdefault(space, 0.0)
        table = self.vecs.setdefault(space, {})
        for item_id, v in vectors.items():
            if item_id in self.texts:
                table[item_id] = _pack(v)

    def activate(self, space: str, previous: str | None, grace_s: float) -> list[str]:
        now = time.time()
        self.left[space] = 0.0
        if previous and previous != space and self.left.get(previous) == 0.0:
            self.left[previous] = now
        gone = [s for s, t in self.left.items() if t > 0 and now - t >= grace_s]
        for s in gone:
            self.vecs.pop(s, None)
            self.left.pop(s, None)
        return gone

    def spaces(self) -> dict[str, float]:
        return dict(self.left)


class ActorItemStore:
    """A client of the one named, detached actor holding the registered items."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        import ray

        self._ray = ray
        self.timeout_s = timeout_s
        remote = ray.remote(num_cpus=0, max_restarts=-1)(MemoryItemStore)
        self._actor = remote.options(
            name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._actor, method).remote(*args)
            return self._ray.get(ref, timeout=self.timeout_s)
        except (self._ray.exceptions.GetTimeoutError, self._ray.exceptions.RayActorError) as e:
            raise StoreUnavailable(f"item store actor: {type(e).__name__}") from e

    def put(self, items: Sequence[Registered], space: str, vectors: np.ndarray) -> int:
        return self._call("put", list(items), space, vectors)

    def delete(self, item_id: str) -> bool:
        return self._call("delete", item_id)

    def changes(self, since: int) -> tuple[int, dict[str, Registered | None]]:
        return self._call("changes", since)

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return self._call("vectors", space, list(ids))

    def add_vectors(self, space: str, vectors: dict[str, np.ndarray]) -> None:
        self._call("add_vectors", space, vectors)

    def activate(self, space: str, previous: str | None, grace_s: float) -> list[str]:
        return self._call("activate", space, previous, grace_s)

    def spaces(self) -> dict[str, float]:
        return self._call("spaces")


# KEYS: texts, gen, changed, spaces. ARGV: space, vector key prefix, then (id, text, vector)...
_PUT = """
local g = redis.call('INCR', KEYS[2])
redis.call('HSETNX', KEYS[4], ARGV[1], '0')
local others = redis.call('HKEYS', KEYS[4])
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  redis.call('HSET', KEYS[1], id, ARGV[i + 1])
  for _, s in ipairs(others) do
    if s ~= ARGV[1] then redis.call('HDEL', ARGV[2] .. s, id) end
  end
  redis.call('HSET', ARGV[2] .. ARGV[1], id, ARGV[i + 2])
  redis.call('ZADD', KEYS[3], g, id)
end
return g
"""
# KEYS: texts, gen, changed, spaces. ARGV: id, vector key prefix.
_DELETE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, s in ipairs(redis.call('HKEYS', KEYS[4])) do redis.call('HDEL', ARGV[2] .. s, ARGV[1]) end
local g = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[3], g, ARGV[1])
return 1
"""
# KEYS: gen, changed. ARGV: since. -> {gen, id1, id2, ...}
_CHANGES = """
local g = tonumber(redis.call('GET', KEYS[1]) or '0')
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], g)
table.insert(ids, 1, tostring(g))
return ids
"""


class RedisItemStore:
    """Registered items in Redis: `<prefix>texts` (id -> text), `<prefix>gen`,
    `<prefix>changed` (a sorted set: id by the generation of its last change),
    `<prefix>spaces` and one hash of vectors per space, `<prefix>vec:<space>`.
    The scripts name keys they compute, so they need one Redis, not Redis Cluster."""

    def __init__(self, url: str, prefix: str = "rerank:items:", timeout_s: float = 5.0) -> None:
        self.client, self._errors = redis_client(url, timeout_s)
        self.p = prefix
        self.keys = [prefix + "texts", prefix + "gen", prefix + "changed", prefix + "spaces"]
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._changes = self.client.register_script(_CHANGES)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as e:
            raise StoreUnavailable(f"Redis: {type(e).__name__}: {e}") from e

    def put(self, items: Sequence[Registered], space: str, vectors: np.ndarray) -> int:
        args: list[Any] = [space, self.p + "vec:"]
        for item, v in zip(items, vectors, strict=True):
            args += [item.item_id, item.dumps(), _pack(v)]
        return int(self._call(self._put, keys=[self.keys[i] for i in (0, 1, 2, 3)], args=args))

    def delete(self, item_id: str) -> bool:
        return bool(self._call(self._delete, keys=self.keys, args=[item_id, self.p + "vec:"]))

    def changes(self, since: int) -> tuple[int, dict[str, Registered | None]]:
        raw = self._call(self._changes, keys=self.keys[1:3], args=[since])
        gen, ids = int(raw[0]), [r.decode() for r in raw[1:]]
        out: dict[str, Registered | None] = {}
        for lo in range(0, len(ids), 10_000):
            chunk = ids[lo : lo + 10_000]
            texts = self._call(self.client.hmget, self.keys[0], chunk)
            for item_id, t in zip(chunk, texts, strict=True):
                out[item_id] = None if t is None else Registered.loads(item_id, t)
        return gen, out

    def vectors(self, space: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        ids = list(ids)
        for lo in range(0, len(ids), 10_000):
            chunk = ids[lo : lo + 10_000]
            found = self._call(self.client.hmget, self.p + "vec:" + space, chunk)
            out.update({i: _unpack(v) for i, v in zip(chunk, found, strict=True) if v is not None})
        return out

    def add_vectors(self, space: str, vectors: dict[str, np.ndarray]) -> None:
        if not vectors:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self.keys[3], space, "0")
        pipe.hset(self.p + "vec:" + space, mapping={i: _pack(v) for i, v in vectors.items()})
        self._call(pipe.execute)

    def activate(self, space: str, previous: str | None, grace_s: float) -> list[str]:
        now = time.time()
        self._call(self.client.hset, self.keys[3], space, "0")
        if previous and previous != space:
            left = self._call(self.client.hget, self.keys[3], previous)
            if left is not None and float(left) == 0:
                self._call(self.client.hset, self.keys[3], previous, repr(now))
        gone = [s for s, t in self.spaces().items() if t > 0 and now - t >= grace_s]
        for s in gone:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.p + "vec:" + s)
            pipe.hdel(self.keys[3], s)
            self._call(pipe.execute)
        return gone

    def spaces(self) -> dict[str, float]:
        raw = self._call(self.client.hgetall, self.keys[3])
        return {k.decode(): float(v) for k, v in raw.items()}


def make_item_store(cfg: CatalogueConfig) -> ItemStore:
    if cfg.kind == "redis":
        url = cfg.redis_url or os.environ["RERANK_REDIS_URL"]
        return RedisItemStore(url, cfg.key_prefix, cfg.timeout_s)
    return ActorItemStore(cfg.timeout_s)


Encoder = Callable[[Sequence[str]], np.ndarray]


class Catalogue:
    """One process's view of the registered items, for one `Ranker` at a time (the one
    `load` was last given: a new model version is loaded before it takes traffic).

    `sync()` pulls the changes since the last generation seen, reads their
    vectors in the ranker's space (encoding from the stored text, and storing,
    those the space lacks) and sets the ranker's overlay. A trained item is laid
    over only when it was registered with `replace`."""

    def __init__(self, store: ItemStore, batch: int = 256) -> None:
        self.store = store
        self.batch = batch
        self.gen = 0
        self.items: dict[str, Registered] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.encoded = 0
        self.ranker: Any = None
        self._lock = threading.Lock()

    def _encode(self, ranker: Any, items: list[Registered]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for lo in range(0, len(items), self.batch):
            chunk = items[lo : lo + self.batch]
            vecs = ranker.encode_texts([r.text for r in chunk]).float().cpu().numpy()
            out.update({r.item_id: v for r, v in zip(chunk, vecs, strict=True)})
        self.encoded += len(out)
        return out

    def _wanted(self, ranker: Any, item: Registered) -> bool:
        return item.replace or not ranker.knows(item.item_id)

    def sync(self) -> int:
        """Apply the store's changes since the last sync to the ranker; how many changed."""
        with self._lock:
            ranker = self.ranker
            if ranker is None:
                return 0
            gen, changed = self.store.changes(self.gen)
            if gen < self.gen:  # the store was emptied (a new Redis, the actor restarted)
                logger.warning("item store restarted at generation %d: reloading", gen)
                gen, changed = self.store.changes(0)
                changed = {**dict.fromkeys(self.items), **changed}
            if not changed:
                self.gen = gen
                return 0
            for item_id, item in changed.items():
                self.vectors.pop(item_id, None)
                if item is None:
                    self.items.pop(item_id, None)
                else:
                    self.items[item_id] = item
            self._fill(ranker, [i for i in changed if i in self.items])
            self.gen = gen
            return len(changed)

    def _fill(self, ranker: Any, ids: list[str]) -> None:
        wanted = [self.items[i] for i in ids if self._wanted(ranker, self.items[i])]
        found = self.store.vectors(ranker.space, [r.item_id for r in wanted])
        missing = [r for r in wanted if r.item_id not in found]
        if missing:
            encoded = self._encode(ranker, missing)
            self.store.add_vectors(ranker.space, encoded)
            found.update(encoded)
        self.vectors.update(found)
        ranker.set_overlay(dict(self.vectors))

    def load(self, ranker: Any) -> int:
        """Everything registered, for a ranker about to take traffic (start-up, a new
        model version): vectors of its space, encoding what the space lacks. Returns
        how many items were encoded."""
        with self._lock:
            self.ranker, self.gen, self.items, self.vectors = ranker, 0, {}, {}
            ranker.set_overlay({})
            gen, changed = self.store.changes(0)
            self.items = {i: r for i, r in changed.items() if r is not None}
            self.vectors = {}
            before = self.encoded
            self._fill(ranker, list(self.items))
            self.gen = gen
            return self.encoded - before

    def register(self, items: Sequence[Registered]) -> int:
        """Encode and store `items` (the caller checked them), then apply them here."""
        ranker = self.ranker
        vecs = self._encode(ranker, list(items))
        gen = self.store.put(items, ranker.space, np.stack([vecs[r.item_id] for r in items]))
        with self._lock:
            if self.ranker is not ranker:  # a new model went live meanwhile: sync reads it
                return gen
            for r in items:
                self.items[r.item_id] = r
                if self._wanted(ranker, r):
                    self.vectors[r.item_id] = vecs[r.item_id]
                else:
                    self.vectors.pop(r.item_id, None)
            ranker.set_overlay(dict(self.vectors))
            if gen == self.gen + 1:
                self.gen = gen
        return gen
