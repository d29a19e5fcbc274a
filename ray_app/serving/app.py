"""The Ray Serve application: re-ranking over HTTP, autoscaled, batched across requests.

    serve run ray_app.serving.app:build_app model=runs/demo/model
    serve deploy cluster/serve/rerank.yaml

Each replica loads the model artifact once (`__init__`), scores the requests
that arrive within a few milliseconds of each other in one forward pass
(`@serve.batch`), and swaps to a new artifact in place when `user_config`
names one (`reconfigure`), so a new model goes live without dropping requests.
Items registered through `PUT /v1/items` live in the item store
(`model/catalogue.py`); each replica keeps them laid over its model, loads them
(encoding what a new model version lacks) before a model takes traffic, and
pulls the other replicas' changes in a background thread.
"""

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException
from ray import serve
from ray.serve import Application

from ray_app.model.catalogue import Catalogue, Registered, make_item_store
from ray_app.model.catalogue import StoreUnavailable as ItemStoreUnavailable
from ray_app.model.ranker import Candidate, Event, Ranked, Ranker
from ray_app.model.ranker import Query as RankQuery
from ray_app.serving.api import (
    EventIn,
    EventsRequest,
    EventsResponse,
    ItemsRequest,
    ItemsResponse,
    RecommendationsResponse,
    RegisteredItem,
    RerankRequest,
    RetiredResponse,
)
from ray_app.serving.config import AppArgs
from ray_app.serving.events import StoreUnavailable, make_store, merge
from ray_app.serving.http import error, error_detail, make_api
from ray_app.serving.metrics import ServeMetrics
from ray_app.serving.recommendations import NoRecommendations, TopKReader
from ray_app.storage import absolute
from ray_app.times import parse_time

logger = logging.getLogger(__name__)


def _malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@serve.deployment(name="RerankService", health_check_period_s=10)
@serve.ingress()
class RerankService:
    """One replica: the model (swappable), the event store, the nightly lists, and the
    request handlers its HTTP app (`http.make_api`) routes to."""

    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.device = "cuda" if self.args.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.ranker = self._load(self.args.model)
        self.model_path = self.args.model
        self.metrics = ServeMetrics()
        self.metrics.model_live(self.ranker.version)
        self.store = make_store(self.args.events)
        self.topk = TopKReader(self.args.topk)
        self.limits = self.args.limits
        env = self.args.auth_token_env
        self.token = os.environ.get(env) if env else None
        if env and not self.token:
            logger.warning("auth_token_env=%s is not set: /v1/* is open", env)
        # One scoring thread: the model's allocations stay in one malloc arena
        # (a pool of threads spreads them over several, each fragmenting apart).
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="rerank-score")
        self._trim = _malloc_trim() if self.args.memory_trim_s > 0 else None
        self._trimmed = time.monotonic()
        self._score.set_max_batch_size(self.args.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.catalogue = Catalogue(make_item_store(self.args.catalogue()))
        self._take_items(self.ranker, None)
        self._stop = threading.Event()
        threading.Thread(target=self._sync_items, name="rerank-items", daemon=True).start()
        logger.info(
            "serving model %s from %s (new items encoded by %s)",
            self.ranker.version,
            self.model_path,
            self.ranker.text_backend,
        )

    def _load(self, path: str) -> Ranker:
        return Ranker.from_path(
            path, self.args.cold_cache_size, self.device, self.args.text_encoder, self.args.scorer
        )

    def _take_items(self, ranker: Ranker, previous: Ranker | None) -> None:
        """Lay the registered items over `ranker` (encoding those its version has no
        vectors for) before it takes traffic. A store that does not answer leaves the
        items to the background sync, which loads them all once it does."""
        t0 = time.monotonic()
        try:
            encoded = self.catalogue.load(ranker)
            gone = self.catalogue.store.activate(
                ranker.space, previous.space if previous else None, self.args.items.grace_s
            )
        except ItemStoreUnavailable as e:
            logger.warning("item store unavailable, registered items come later: %s", e)
            return
        logger.info(
            "%d registered items for %s (%d encoded, %.1fs); vectors deleted for %s",
            len(self.catalogue.items),
            ranker.space,
            encoded,
            time.monotonic() - t0,
            gone or "none",
        )

    def _sync_items(self) -> None:
        """Pull the other replicas' item changes every `items.sync_s`; and re-set the
        live-model gauge, which Ray's metrics agent drops once it goes unreported for
        two export intervals."""
        while not self._stop.wait(self.args.items.sync_s):
            self.metrics.model_live(self.ranker.version)
            try:
                self.catalogue.sync()
            except ItemStoreUnavailable as e:
                logger.debug("item sync: %s", e)
            except Exception:  # the thread must outlive one bad sync
                logger.exception("item sync failed")

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def __serve_build_asgi_app__(self) -> Any:
        """Serve asks each replica for its app once the replica is constructed."""
        return make_api(self)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {model: <artifact>}` swaps the model; requests keep being served
        by the old one until the new one is loaded."""
        path = (user_config or {}).get("model")
        if not path or path == self.model_path:
            # Serve calls this once after __init__, in the replica's metrics context.
            self.metrics.model_live(self.ranker.version)
            return
        new = await asyncio.to_thread(self._load, path)
        old = self.ranker
        await asyncio.to_thread(self._take_items, new, old)
        self.ranker, self.model_path = new, path
        self.metrics.model_live(new.version, old.version)
        logger.info("swapped to model %s from %s", new.version, path)

    def status(self) -> dict[str, Any]:
        return {
            "model_version": self.ranker.version,
            "text_encoder": self.ranker.text_backend,
            "scorer": self.ranker.scorer_backend,
            "registered_items": len(self.catalogue.items),
            "items_encoded": self.catalogue.encoded,
        }

    def check_health(self) -> None:
        if self.ranker is None:
            raise RuntimeError("no model loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _score(self, batch: list[tuple[RankQuery, bool]]) -> list[Ranked]:
        """Score a batch of (query, whether it sends new items' text). A batch of known
        items is scored right here (a fraction of a millisecond a query): handing it
        to a thread cost more than the forward pass. One with text to encode goes to
        the scoring thread, so the replica keeps answering while it encodes."""
        ranker = self.ranker
        queries = [q for q, _ in batch]
        if not any(encodes for _, encodes in batch):
            return self._score_batch(ranker, queries)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scorer, self._score_new, ranker, queries)

    def _score_new(self, ranker: Ranker, queries: list[RankQuery]) -> list[Ranked]:
        """`_score_batch` on the scoring thread, the one that encodes new items (and so
        the one place their counters move)."""
        encoded, hits = ranker.cold_encoded, ranker.cold_hits
        try:
            return self._score_batch(ranker, queries)
        finally:
            self.metrics.new("encoded", ranker.cold_encoded - encoded)
            self.metrics.new("cache", ranker.cold_hits - hits)

    def _score_batch(self, ranker: Ranker, queries: list[RankQuery]) -> list[Ranked]:
        try:
            return ranker.score(queries, False)
        finally:
            if (
                self._trim is not None
                and time.monotonic() - self._trimmed > self.args.memory_trim_s
            ):
                self._trim(0)
                self._trimmed = time.monotonic()

    async def _stored(self, user_id: str | None) -> tuple[list[Event], str]:
        """The user's stored events and `stored_history`: what a response says of them."""
        if user_id is None:
            return [], "not_requested"
        try:
            getter = getattr(self.store, "get_async", None)
            if getter is not None:
                events = await getter(user_id)
            else:
                events = await asyncio.to_thread(self.store.get, user_id)
        except StoreUnavailable as e:
            logger.warning("stored history of a request unavailable: %s", e)
            self.metrics.stored_read("unavailable")
            return [], "unavailable"
        self.metrics.stored_read("used")
        return events, "used"

    def _bounds(self) -> tuple[int, int]:
        """The accepted moments (epoch seconds): limits.min_timestamp .. max_timestamp,
        the latter by default the request's arrival + 1 day, as prepare validates."""
        lim = self.limits
        lo = parse_time(lim.min_timestamp)
        hi = (
            parse_time(lim.max_timestamp)
            if lim.max_timestamp is not None
            else int(time.time()) + 86_400
        )
        return lo, hi

    def _moment(self, scored_at: int | None) -> int:
        """The request's moment of scoring: `scored_at` within the configured bounds
        (422 naming it otherwise), or the wall clock."""
        if scored_at is None:
            return int(time.time())
        lo, hi = self._bounds()
        if not lo <= scored_at <= hi:
            raise error(422, ["scored_at"], f"{scored_at} is outside {lo} .. {hi} (epoch seconds)")
        return scored_at

    def _events(self, events: list[EventIn], field: str, now: int) -> list[Event]:
        lo, hi = self._bounds()
        out = []
        for i, e in enumerate(events):
            try:
                self.ranker.event_idx(e.event_type)
            except ValueError as err:
                raise error(422, [field, i, "event_type"], str(err)) from None
            if e.timestamp is not None and not lo <= e.timestamp <= hi:
                raise error(
                    422,
                    [field, i, "timestamp"],
                    f"{e.timestamp} is outside {lo} .. {hi} (epoch seconds)",
                )
            out.append(
                Event(e.item_id, e.timestamp if e.timestamp is not None else now, e.event_type)
            )
        return out

    async def rerank(self, req: RerankRequest) -> dict[str, Any]:
        """The response body (`RerankResponse`'s fields, in its order), serialised once
        by the route."""
        lim = self.limits
        if len(req.candidates) > lim.max_candidates:
            raise error(413, ["candidates"], f"{len(req.candidates)} > {lim.max_candidates}")
        if len(req.history) > lim.max_history:
            raise error(413, ["history"], f"{len(req.history)} events > {lim.max_history}")
        if req.k is not None and req.k > lim.max_k:
            raise error(422, ["k"], f"k={req.k} > {lim.max_k}")
        if req.explain and req.explain_top > lim.max_explain_top:
            raise error(
                422, ["explain_top"], f"explain_top={req.explain_top} > {lim.max_explain_top}"
            )
        seen: set[str] = set()
        for i, c in enumerate(req.candidates):
            if c.text is not None and len(c.text) > lim.max_text_chars:
                raise error(
                    413, ["candidates", i, "text"], f"{len(c.text)} chars > {lim.max_text_chars}"
                )
            if c.item_id in seen:
                raise error(422, ["candidates", i, "item_id"], f"duplicate {c.item_id!r}")
            seen.add(c.item_id)
        now = self._moment(req.scored_at)
        sent = self._events(req.history, "history", now)
        ranker = self.ranker
        rows = ranker.overlay.rows
        registered = sum(c.item_id in rows for c in req.candidates)
        unknown = any(c.item_id not in rows and not ranker.knows(c.item_id) for c in req.candidates)
        if unknown:
            await self._catch_up()
        stored, stored_history = await self._stored(req.user_id)
        history = merge(stored, sent)
        query = RankQuery(
            history=history,
            candidates=[Candidate(c.item_id, c.text) for c in req.candidates],
            k=req.k,
            now=now,
            drop_later=req.scored_at is not None,
            explain=req.explain_top if req.explain else 0,
        )
        version = self.ranker.version
        ranked = await self._score((query, unknown))
        self.metrics.new("registered", registered)
        self.metrics.request(
            len(req.candidates), ranked.history_used, ranked.history_dropped, len(ranked.errors)
        )
        return {
            "user_id": req.user_id,
            "model_version": version,
            "items": ranked.as_dicts(),
            "errors": [{"item_id": i, "error": e} for i, e in ranked.errors],
            "history_used": ranked.history_used,
            "history_dropped": ranked.history_dropped,
            "stored_history": stored_history,
        }

    async def _catch_up(self) -> None:
        """A request names an item this replica does not know: another replica may have
        just registered it, so pull the changes now rather than at the next sync."""
        try:
            await asyncio.to_thread(self.catalogue.sync)
        except ItemStoreUnavailable as e:
            logger.warning("item store unavailable: %s", e)

    def _unavailable(self, what: str, e: Exception) -> HTTPException:
        """The 503 of a write a store did not confirm in time (events or items): the
        client sends it again after Retry-After."""
        logger.warning("%s: %s", what, e)
        return HTTPException(
            503,
            detail=[error_detail(["store"], f"{what}: {e}", "unavailable")],
            headers={"Retry-After": str(self.args.events.retry_after_s)},
        )

    def _registrations(self, req: ItemsRequest, ranker: Ranker) -> list[Registered]:
        """The request's items as registrations, or the 4xx naming the first bad field
        (409 naming every trained id, when `replace` is not set)."""
        lim = self.limits
        if len(req.items) > lim.max_items:
            raise error(413, ["items"], f"{len(req.items)} > {lim.max_items}")
        if ranker.model.text is None:
            raise error(422, ["items"], "this model has no text tower: it cannot read new items")
        out, seen = [], set()
        for i, item in enumerate(req.items):
            if item.item_id in seen:
                raise error(422, ["items", i, "item_id"], f"duplicate {item.item_id!r}")
            seen.add(item.item_id)
            text = item.text if item.text is not None else ranker.renderer.render(item.fields())
            if not text.strip():
                raise error(422, ["items", i, "text"], "no text: send text or title, genres, ...")
            if len(text) > lim.max_text_chars:
                raise error(413, ["items", i, "text"], f"{len(text)} chars > {lim.max_text_chars}")
            out.append(Registered(item.item_id, text, req.replace))
        known = [i for i, r in enumerate(out) if ranker.knows(r.item_id)]
        if known and not req.replace:
            raise HTTPException(
                409,
                detail=[
                    error_detail(
                        ["body", "items", i, "item_id"],
                        f"{out[i].item_id!r} is a trained item: send replace: true to score "
                        "it from this text",
                        "conflict",
                    )
                    for i in known
                ],
            )
        return out

    async def put_items(self, req: ItemsRequest) -> ItemsResponse:
        ranker = self.ranker
        items = self._registrations(req, ranker)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._scorer, self.catalogue.register, items)
        except ItemStoreUnavailable as e:
            raise self._unavailable("item store unavailable", e) from None
        return ItemsResponse(
            model_version=ranker.version,
            registered=len(items),
            items=[
                RegisteredItem(item_id=r.item_id, replaced=ranker.knows(r.item_id)) for r in items
            ],
        )

    async def delete_item(self, item_id: str) -> RetiredResponse:
        try:
            retired = await asyncio.to_thread(self.catalogue.store.delete, item_id)
            await asyncio.to_thread(self.catalogue.sync)
        except ItemStoreUnavailable as e:
            raise self._unavailable("item store unavailable", e) from None
        if not retired:
            raise HTTPException(
                404,
                detail=[
                    error_detail(["path", "item_id"], f"{item_id!r} is not registered", "not_found")
                ],
            )
        return RetiredResponse(item_id=item_id, retired=True)

    async def events(self, req: EventsRequest) -> EventsResponse:
        if len(req.events) > self.limits.max_events:
            raise error(413, ["events"], f"{len(req.events)} > {self.limits.max_events}")
        events = self._events(req.events, "events", int(time.time()))
        try:
            appender = getattr(self.store, "append_async", None)
            if appender is not None:
                n = await appender(req.user_id, events)
            else:
                n = await asyncio.to_thread(self.store.append, req.user_id, events)
        except StoreUnavailable as e:
            raise self._unavailable("event store unavailable", e) from None
        return EventsResponse(user_id=req.user_id, stored=len(events), history_length=n)

    async def recommendations(self, user_id: str, k: int | None) -> RecommendationsResponse:
        if k is not None and k > self.limits.max_k:
            raise HTTPException(
                422, detail=[error_detail(["query", "k"], f"k > {self.limits.max_k}", "invalid")]
            )
        try:
            found = await asyncio.to_thread(self.topk.get, user_id, k)
        except NoRecommendations as e:
            raise HTTPException(
                404, detail=[error_detail(["path", "user_id"], str(e), "not_found")]
            ) from None
        return RecommendationsResponse(**found)


def build_app(args: AppArgs) -> Application:
    """The application for `serve run`/`serve deploy` and `rerank serve`."""
    a = args.autoscaling
    model = absolute(args.model)
    resolved = args.model_copy(
        update={"model": model, "topk": absolute(args.topk) if args.topk else None}
    )
    return RerankService.options(
        autoscaling_config={
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "metrics_interval_s": a.metrics_interval_s,
            "look_back_period_s": a.look_back_period_s,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        user_config={"model": model},
    ).bind(resolved.model_dump(mode="json"))
