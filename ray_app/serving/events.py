"""Users' recent events between requests: a Ray actor on one machine, Redis on a cluster.

Every store keeps at most `max_events_per_user` events per user (the newest)
and answers `append` only after the events are stored, so an acknowledged
event is never lost when a Serve replica restarts. With Redis the events also
outlive the Ray cluster.

Every call is bounded by `events.timeout_s` and a store that does not answer in
time, or refuses the connection, raises `StoreUnavailable`: the service then
scores from the request's own history and refuses new events with 503, and the
next call tries the store again (no restart needed once it is back).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import Protocol

from ray_app.model.ranker import Event
from ray_app.runtime import redis_client
from ray_app.serving.config import EventStoreConfig

logger = logging.getLogger(__name__)

ACTOR_NAME = "rerank-event-store"
NAMESPACE = "rerank"


class StoreUnavailable(RuntimeError):
    """The event store did not answer within its timeout, or refused the connection.

    For `append` it means the events may or may not have been stored: the caller
    reports them as not stored, and the client posts them again."""


class EventStore(Protocol):
    def append(self, user_id: str, events: Sequence[Event]) -> int:
        """Store events; returns how many the user has now (after trimming)."""

    def get(self, user_id: str) -> list[Event]:
        """The user's stored events, oldest first (empty for an unknown user)."""

    def bulk_load(self, histories: dict[str, Sequence[Event]]) -> None:
        """Seed many users at once (start-up)."""


def _to_json(e: Event) -> str:
    return json.dumps([e.item_id, e.timestamp, e.event_type], separators=(",", ":"))


def _from_json(s: str | bytes) -> Event:
    item_id, ts, kind = json.loads(s)
    return Event(item_id, int(ts), kind)


class MemoryEventStore:
    """In-process store (the actor's state; tests)."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._users: dict[str, deque[Event]] = defaultdict(lambda: deque(maxlen=max_events))

    def append(self, user_id: str, events: Sequence[Event]) -> int:
        q = self._users[user_id]
        q.extend(events)
        return len(q)

    def get(self, user_id: str) -> list[Event]:
        q = self._users.get(user_id)
        return sorted(q, key=lambda e: e.timestamp) if q else []

    def bulk_load(self, histories: dict[str, Sequence[Event]]) -> None:
        for user, events in histories.items():
            self.append(user, events)

    def users(self) -> int:
        return len(self._users)


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class _EventsActor(MemoryEventStore):
        pass

    return _EventsActor


class ActorEventStore:
    """A client of the one named, detached actor holding every user's events."""

    def __init__(self, max_events: int, timeout_s: float = 2.0) -> None:
        import ray

        self._ray = ray
        self.timeout_s = timeout_s
        self._actor = (
            _actor_class()
            .options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
            .remote(max_events)
        )

    def _get(self, ref):
        try:
            return self._ray.get(ref, timeout=self.timeout_s)
        except (self._ray.exceptions.GetTimeoutError, self._ray.exceptions.RayActorError) as e:
            raise StoreUnavailable(f"event store actor: {type(e).__name__}") from e

    async def _await(self, ref):
        import asyncio

        try:
            return await asyncio.wait_for(ref, self.timeout_s)
        except (asyncio.TimeoutError, self._ray.exceptions.RayActorError) as e:
            raise StoreUnavailable(f"event store actor: {type(e).__name__}") from e

    def append(self, user_id: str, events: Sequence[Event]) -> int:
        return self._get(self._actor.append.remote(user_id, list(events)))

    def get(self, user_id: str) -> list[Event]:
        return self._get(self._actor.get.remote(user_id))

    def bulk_load(self, histories: dict[str, Sequence[Event]]) -> None:
        self._ray.get(self._actor.bulk_load.remote({u: list(e) for u, e in histories.items()}))

    async def append_async(self, user_id: str, events: Sequence[Event]) -> int:
        return await self._await(self._actor.append.remote(user_id, list(events)))

    async def get_async(self, user_id: str) -> list[Event]:
        return await self._await(self._actor.get.remote(user_id))


class RedisEventStore:
    """One capped Redis list per user (RPUSH + LTRIM in one transaction).

    The client does not retry: a retried append whose first attempt reached a
    paused server would store the events twice. Each call waits at most
    `timeout_s` to connect and to read the answer."""

    def __init__(
        self,
        url: str,
        max_events: int,
        prefix: str = "rerank:events:",
        timeout_s: float = 1.0,
    ) -> None:
        self.client, self._errors = redis_client(url, timeout_s)
        self.max_events = max_events
        self.prefix = prefix
        try:
            self.client.ping()
        except self._errors as e:  # a replica that starts during an outage still serves
            logger.warning("Redis event store at %s is not answering yet: %s", url, e)

    def _key(self, user_id: str) -> str:
        return self.prefix + user_id

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._errors as e:
            raise StoreUnavailable(f"Redis: {type(e).__name__}: {e}") from e

    def append(self, user_id: str, events: Sequence[Event]) -> int:
        key = self._key(user_id)
        if not events:
            return self._call(self.client.llen, key)
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, *[_to_json(e) for e in events])
        pipe.ltrim(key, -self.max_events, -1)
        pipe.llen(key)
        return int(self._call(pipe.execute)[-1])

    def get(self, user_id: str) -> list[Event]:
        raw = self._call(self.client.lrange, self._key(user_id), 0, -1)
        return sorted((_from_json(r) for r in raw), key=lambda e: e.timestamp)

    def bulk_load(self, histories: dict[str, Sequence[Event]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for n, (user, events) in enumerate(histories.items(), 1):
            key = self._key(user)
            pipe.delete(key)
            if events:
                pipe.rpush(key, *[_to_json(e) for e in events[-self.max_events :]])
            if n % 1000 == 0:
                pipe.execute()
        pipe.execute()


def make_store(cfg: EventStoreConfig) -> EventStore:
    if cfg.kind == "redis":
        url = cfg.redis_url or os.environ["RERANK_REDIS_URL"]
        return RedisEventStore(url, cfg.max_events_per_user, cfg.key_prefix, cfg.timeout_s)
    return ActorEventStore(cfg.max_events_per_user, cfg.timeout_s)


def histories_from_prepared(prepared: str, max_events: int) -> dict[str, list[Event]]:
    """Every user's events from a prepare output (all splits), newest `max_events` kept."""
    from ray_app.data import schema
    from ray_app.storage import join, live, read_parquet

    df = read_parquet(
        join(live(prepared), "interactions"),
        columns=[schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, schema.EVENT_TYPE],
    ).sort_values([schema.USER_ID, schema.TIMESTAMP], kind="stable")
    out: dict[str, list[Event]] = {}
    for user, g in df.groupby(schema.USER_ID, sort=False):
        g = g.tail(max_events)
        out[str(user)] = [
            Event(str(i), int(t), str(k))
            for i, t, k in zip(
                g[schema.ITEM_ID], g[schema.TIMESTAMP], g[schema.EVENT_TYPE], strict=True
            )
        ]
    return out


def merge(stored: Iterable[Event], sent: Iterable[Event]) -> list[Event]:
    """Stored plus request events, oldest first, exact duplicates counted once."""
    return sorted(dict.fromkeys([*stored, *sent]), key=lambda e: e.timestamp)
