"""The Ray Serve application: re-ranking over HTTP, autoscaled, batched across requests.

    serve run ray_app.serving.app:build_app model=runs/demo/model
    serve deploy cluster/serve/rerank.yaml

Each replica loads the model artifact once (`__init__`), scores the requests
that arrive within a few milliseconds of each other in one forward pass
(`@serve.batch`), and swaps to a new artifact in place when `user_config`
names one (`reconfigure`), so a new model goes live without dropping requests.
"""

import asyncio
import ctypes
import ctypes.util
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app.model.ranker import Candidate, Event, Ranked, Ranker
from ray_app.model.ranker import Query as RankQuery
from ray_app.serving.api import (
    ErrorResponse,
    EventIn,
    EventsRequest,
    EventsResponse,
    RecommendationsResponse,
    RerankRequest,
    RerankResponse,
)
from ray_app.serving.config import AppArgs
from ray_app.serving.events import StoreUnavailable, make_store, merge
from ray_app.serving.recommendations import NoRecommendations, TopKReader
from ray_app.storage import absolute
from ray_app.times import parse_time

logger = logging.getLogger(__name__)

api = FastAPI(
    title="rerank",
    version="1",
    description="Re-rank a user's candidates with a fine-tuned language-model re-ranker; "
    "post events; read the nightly top-K.",
)


_KINDS = {401: "unauthorized", 404: "not_found", 413: "too_large", 503: "unavailable"}


def _text(value: Any) -> str:
    """`value` as text any JSON encoder accepts: a lone surrogate from the request
    becomes its escape, so an error that quotes the input can always be sent."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _detail(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {
        "loc": [p if isinstance(p, int) and not isinstance(p, bool) else _text(p) for p in loc],
        "msg": _text(msg),
        "type": kind,
    }


def _error_response(
    status: int, details: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": details}, status_code=status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """The one place a malformed request becomes an answer: 422, the field and the
    reason, never the input itself (it may be NaN, 1e400 or a lone surrogate, which
    JSON cannot carry back)."""
    return _error_response(
        422,
        [
            _detail(list(e.get("loc", [])), e.get("msg", ""), e.get("type", ""))
            for e in exc.errors()
        ],
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Raised errors (413, 422 from the service's own checks, 404, 405 ...) in the same
    shape as validation errors."""
    detail = exc.detail
    if exc.status_code == 400:  # FastAPI: a body it could not parse (e.g. nested too deep)
        return _error_response(422, [_detail(["body"], str(detail), "json_invalid")])
    kind = _KINDS.get(exc.status_code, "invalid" if exc.status_code == 422 else "error")
    if isinstance(detail, list):
        details = [_detail(d.get("loc", []), d.get("msg", ""), d.get("type", kind)) for d in detail]
    else:
        details = [_detail([], str(detail), kind)]
    return _error_response(exc.status_code, details, getattr(exc, "headers", None))


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of an endpoint: each status it can answer, one error model."""
    why = {
        401: "Missing or wrong bearer token (when the deployment has one).",
        404: "Nothing published for this user.",
        413: "Body, candidates, history, events or a text over the deployment's limits.",
        422: "A field is malformed or outside the deployment's bounds: `loc` names it.",
        503: "The event store did not confirm the write in time: post the events again "
        "after `Retry-After` seconds.",
    }
    return {s: {"model": ErrorResponse, "description": why[s]} for s in statuses}


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Body size (413) and bearer token (401) before any body is parsed."""
    state = request.app.state
    limit = getattr(state, "max_body_bytes", None)
    if limit is not None and request.method in ("POST", "PUT"):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large("body", f"request body of {declared} bytes > {limit}")
        body = await request.body()  # cached by Starlette for the endpoint
        if len(body) > limit:
            return _too_large("body", f"request body of {len(body)} bytes > {limit}")
    token = getattr(state, "token", None)
    if token and request.url.path.startswith("/v1/"):
        sent = request.headers.get("authorization", "")
        scheme, _, value = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.encode("utf-8", "backslashreplace"), token.encode()
        ):
            return _error_response(
                401,
                [
                    _detail(
                        ["header", "authorization"], "missing or wrong bearer token", "unauthorized"
                    )
                ],
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await call_next(request)


def _too_large(field: str, msg: str) -> JSONResponse:
    return _error_response(413, [_detail([field], msg, "too_large")])


def _error(status: int, loc: list[Any], msg: str) -> HTTPException:
    kind = _KINDS.get(status, "invalid")
    return HTTPException(status_code=status, detail=[_detail(["body", *loc], msg, kind)])


def _malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


@serve.deployment(name="RerankService", health_check_period_s=10)
@serve.ingress(api)
class RerankService:
    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.device = "cuda" if self.args.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.ranker = Ranker.from_path(self.args.model, self.args.cold_cache_size, self.device)
        self.model_path = self.args.model
        self.store = make_store(self.args.events)
        self.topk = TopKReader(self.args.topk)
        self.limits = self.args.limits
        api.state.max_body_bytes = self.limits.max_body_bytes
        env = self.args.auth_token_env
        api.state.token = os.environ.get(env) if env else None
        if env and not api.state.token:
            logger.warning("auth_token_env=%s is not set: /v1/* is open", env)
        # One scoring thread: the model's allocations stay in one malloc arena
        # (a pool of threads spreads them over several, each fragmenting apart).
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="rerank-score")
        self._trim = _malloc_trim() if self.args.memory_trim_s > 0 else None
        self._trimmed = time.monotonic()
        self._score.set_max_batch_size(self.args.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        logger.info("serving model %s from %s", self.ranker.version, self.model_path)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {model: <artifact>}` swaps the model; requests keep being served
        by the old one until the new one is loaded."""
        path = (user_config or {}).get("model")
        if not path or path == self.model_path:
            return
        new = await asyncio.to_thread(
            Ranker.from_path, path, self.args.cold_cache_size, self.device
        )
        self.ranker, self.model_path = new, path
        logger.info("swapped to model %s from %s", new.version, path)

    def check_health(self) -> None:
        if self.ranker is None:
            raise RuntimeError("no model loaded")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score(self, queries: list[RankQuery]) -> list[Ranked]:
        ranker = self.ranker
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scorer, self._score_batch, ranker, queries)

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
                return await getter(user_id), "used"
            return await asyncio.to_thread(self.store.get, user_id), "used"
        except StoreUnavailable as e:
            logger.warning("stored history of a request unavailable: %s", e)
            return [], "unavailable"

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
            raise _error(422, ["scored_at"], f"{scored_at} is outside {lo} .. {hi} (epoch seconds)")
        return scored_at

    def _events(self, events: list[EventIn], field: str, now: int) -> list[Event]:
        lo, hi = self._bounds()
        out = []
        for i, e in enumerate(events):
            try:
                self.ranker.event_idx(e.event_type)
            except ValueError as err:
                raise _error(422, [field, i, "event_type"], str(err)) from None
            if e.timestamp is not None and not lo <= e.timestamp <= hi:
                raise _error(
                    422,
                    [field, i, "timestamp"],
                    f"{e.timestamp} is outside {lo} .. {hi} (epoch seconds)",
                )
            out.append(
                Event(e.item_id, e.timestamp if e.timestamp is not None else now, e.event_type)
            )
        return out

    @api.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="Ready once the model is loaded")
    async def readyz(self) -> dict[str, str]:
        return {"status": "ready", "model_version": self.ranker.version}

    @api.post(
        "/v1/rerank",
        response_model=RerankResponse,
        summary="Re-rank candidates",
        responses=_responses(401, 413, 422),
    )
    async def rerank(self, req: RerankRequest) -> RerankResponse:
        lim = self.limits
        if len(req.candidates) > lim.max_candidates:
            raise _error(413, ["candidates"], f"{len(req.candidates)} > {lim.max_candidates}")
        if len(req.history) > lim.max_history:
            raise _error(413, ["history"], f"{len(req.history)} events > {lim.max_history}")
        if req.k is not None and req.k > lim.max_k:
            raise _error(422, ["k"], f"k={req.k} > {lim.max_k}")
        seen: set[str] = set()
        for i, c in enumerate(req.candidates):
            if c.text is not None and len(c.text) > lim.max_text_chars:
                raise _error(
                    413, ["candidates", i, "text"], f"{len(c.text)} chars > {lim.max_text_chars}"
                )
            if c.item_id in seen:
                raise _error(422, ["candidates", i, "item_id"], f"duplicate {c.item_id!r}")
            seen.add(c.item_id)
        now = self._moment(req.scored_at)
        sent = self._events(req.history, "history", now)
        stored, stored_history = await self._stored(req.user_id)
        history = merge(stored, sent)
        query = RankQuery(
            history=history,
            candidates=[Candidate(c.item_id, c.text) for c in req.candidates],
            k=req.k,
            now=now,
            drop_later=req.scored_at is not None,
        )
        version = self.ranker.version
        ranked = await self._score(query)
        return RerankResponse(
            user_id=req.user_id,
            model_version=version,
            items=ranked.as_dicts(),
            errors=[{"item_id": i, "error": e} for i, e in ranked.errors],
            history_used=ranked.history_used,
            history_dropped=ranked.history_dropped,
            stored_history=stored_history,
        )

    @api.post(
        "/v1/events",
        response_model=EventsResponse,
        summary="Append a user's events",
        responses=_responses(401, 413, 422, 503),
    )
    async def events(self, req: EventsRequest) -> EventsResponse:
        """200 only once the events are stored. A 503 means they may not be: post them
        again after `Retry-After` seconds (the history counts an exact duplicate once)."""
        if len(req.events) > self.limits.max_events:
            raise _error(413, ["events"], f"{len(req.events)} > {self.limits.max_events}")
        events = self._events(req.events, "events", int(time.time()))
        try:
            appender = getattr(self.store, "append_async", None)
            if appender is not None:
                n = await appender(req.user_id, events)
            else:
                n = await asyncio.to_thread(self.store.append, req.user_id, events)
        except StoreUnavailable as e:
            logger.warning("events of a request not stored: %s", e)
            raise HTTPException(
                503,
                detail=[_detail(["store"], f"event store unavailable: {e}", "unavailable")],
                headers={"Retry-After": str(self.args.events.retry_after_s)},
            ) from None
        return EventsResponse(user_id=req.user_id, stored=len(events), history_length=n)

    @api.get(
        "/v1/users/{user_id}/recommendations",
        response_model=RecommendationsResponse,
        summary="The latest nightly top-K of a user",
        responses=_responses(401, 404, 422),
    )
    async def recommendations(
        self, user_id: str, k: int | None = Query(default=None, ge=1)
    ) -> RecommendationsResponse:
        if k is not None and k > self.limits.max_k:
            raise HTTPException(
                422, detail=[_detail(["query", "k"], f"k > {self.limits.max_k}", "invalid")]
            )
        try:
            found = await asyncio.to_thread(self.topk.get, user_id, k)
        except NoRecommendations as e:
            raise HTTPException(
                404, detail=[_detail(["path", "user_id"], str(e), "not_found")]
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


app = build_app(AppArgs())
