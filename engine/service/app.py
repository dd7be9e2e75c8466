"""The service's routes: top-K for known and new users (one or a batch), items, the case-study page,
health, readiness, metrics.

Every request is answered from a `ServingRun` (cached per-group tables, SASRec, the snapshot table that
places new users); no adapter runs online. Concurrent requests are answered together (`MicroBatcher`). Bad input is a 4xx with a one-line JSON body ``{"error": ...}``:
malformed JSON 400, unknown item 404, an oversized body or batch 413, anything else invalid 422.
"""

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from perpeft.engine.analysis.case import CaseStudies, case_study_html
from perpeft.engine.config.choices import DEFAULT_K
from perpeft.engine.errors import InputError
from perpeft.engine.serve.recommend import (
    KNOWN_USER,
    NEAREST_CENTROID,
    Prepared,
    Recommendations,
    ServingRun,
    printable,
)
from perpeft.engine.serve.recommend import Query as UserQuery
from perpeft.engine.service.batching import MicroBatcher
from perpeft.engine.service.live import LiveRun
from perpeft.engine.service.metrics import RequestMetrics, SharedMetrics

MAX_K = 1000
MAX_BATCH = 256
MAX_IDS = 10_000  # history items or exclusions in one request
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CASE_K = 50
RELOAD_SECONDS = 2.0  # how often a running service looks for a new catalog version


class RecommendRequest(BaseModel):
    """A known ``user``, or a new user's ``history`` (original item ids, oldest first); ``k`` items; item ids
    to ``exclude`` beside the user's own purchases."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user": "u00042", "k": 10}, {"history": ["i0003", "i0117"], "k": 10}]},
    )

    user: str | None = Field(None, description="A known user's original id.")
    history: list[str] | None = Field(None, max_length=MAX_IDS, description="A new user's item ids, oldest first.")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="How many items.")
    exclude: list[str] = Field(default_factory=list, max_length=MAX_IDS, description="Item ids never to return.")

    @model_validator(mode="after")
    def _one_user(self) -> "RecommendRequest":
        if (self.user is None) == (self.history is None):
            raise ValueError("give exactly one of user and history")
        return self

    def query(self) -> UserQuery:
        return UserQuery(self.user, self.history, self.k, self.exclude)


class RecommendResponse(BaseModel):
    """Items best first with their scores, the group whose table served them, and why that group."""

    items: list[str]
    scores: list[float]
    group: int
    assigned_by: Literal["known_user", "nearest_centroid"]

    @classmethod
    def of(cls, answer: Recommendations) -> "RecommendResponse":
        return cls(items=answer.items, scores=answer.scores, group=answer.group, assigned_by=answer.assigned_by)


class Item(BaseModel):
    item: str
    title: str
    has_image: bool


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    run: str
    index: str
    groups: int
    items: int
    users: int
    catalog_version: int = Field(description="Additions since training (`embed --add-items`); 0: none.")


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 404, 413, 422)}


def one_line(error: RequestValidationError) -> tuple[int, str]:
    """The status and a one-line message for a request that failed validation (its first problem)."""
    first = error.errors()[0]
    where = [printable(str(part)) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('msg', 'cannot be parsed')}"
    if first.get("type") == "too_long" and not where:
        return 413, f"batch: at most {MAX_BATCH} requests"
    message = printable(str(first.get("msg", "invalid")).removeprefix("Value error, "))
    return 422, f"{'.'.join(where)}: {message}" if where else message


def route_of(scope: dict[str, Any]) -> str:
    """The route template a request matched (``/items/{item_id}``), so metrics do not grow per id."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and counts it by route and status; refuses bodies
    declared larger than ``MAX_BODY_BYTES`` with 413 before they are read."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        try:
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                response = JSONResponse({"error": f"body: at most {MAX_BODY_BYTES} bytes"}, status_code=413)
                await response(scope, receive, record_status)
            else:
                await self.app(scope, receive, record_status)
        finally:
            self.metrics.observe(route_of(scope), scope["method"], status, time.perf_counter() - started)


def create_app(
    serving: ServingRun, reload_seconds: float | None = RELOAD_SECONDS, metrics_directory: Path | None = None
) -> FastAPI:
    """The ASGI app answering from ``serving`` (already opened and checked: `ServingRun.open`), looking
    for a new catalog version every ``reload_seconds`` while it runs (None: never; `LiveRun`). One of
    several server processes shares its metrics through ``metrics_directory`` (`SharedMetrics`)."""
    live = LiveRun(serving)
    metrics = RequestMetrics()
    shared = SharedMetrics(metrics, metrics_directory) if metrics_directory is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything alive at start-up (the run's id lists, torch's and the app's modules) leaves the
        # collector's reach: a full collection over it stalled the loop for 210–280 ms, the whole p99 of
        # a load test (RESULTS); requests' short-lived objects are collected as before.
        gc.collect()
        gc.freeze()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(live.watch(reload_seconds))] if reload_seconds else []
        if shared is not None:
            tasks.append(loop.create_task(shared.publish()))
        yield
        for task in tasks:
            task.cancel()
        gc.unfreeze()

    app = FastAPI(
        title="perpeft-engine",
        summary="Top-K recommendations from a PerPEFT run's per-group item tables.",
        version="1",
        lifespan=lifespan,
    )
    app.state.live = live
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        status, message = one_line(error)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    batcher = MicroBatcher[Prepared, Recommendations](lambda prepared: live.serving.answer(prepared), MAX_BATCH)

    async def answer(requests: list[RecommendRequest]) -> list[RecommendResponse]:
        # Checked here, so a bad request is refused alone; the valid ones join the next batch.
        prepared = [live.serving.prepare(request.query()) for request in requests]
        answers = await batcher.submit(prepared)
        for rule in (KNOWN_USER, NEAREST_CENTROID):
            metrics.served(rule, sum(answer.assigned_by == rule for answer in answers))
        return [RecommendResponse.of(answer) for answer in answers]

    @app.post("/recommend", responses=ERRORS)
    async def recommend(request: RecommendRequest) -> RecommendResponse:
        """Top-K for a known user (group from the run's grouping) or a new user (nearest centroid)."""
        return (await answer([request]))[0]

    @app.post("/recommend/batch", responses=ERRORS)
    async def recommend_batch(
        requests: Annotated[list[RecommendRequest], Body(min_length=1, max_length=MAX_BATCH)],
    ) -> list[RecommendResponse]:
        """A JSON list of `/recommend` bodies, answered in one pass, in order."""
        return await answer(requests)

    @app.get("/items/{item_id}", responses={404: {"model": ErrorBody}})
    async def item(item_id: str) -> Item:
        """An item of the catalog (added items included) by its original id."""
        dataset = live.serving.dataset
        row = live.serving.item_positions.get(item_id)
        if row is None:
            raise HTTPException(404, f"item: unknown id {printable(item_id)}")
        return Item(item=item_id, title=dataset.titles[row], has_image=dataset.image_paths[row] is not None)

    trained = serving.trained_dataset, serving.trained_embeddings
    cases = CaseStudies(serving.run, *trained, serving.model) if serving.groups > 1 else None

    json_error = {"content": {"application/json": {"schema": ErrorBody.model_json_schema()}}}

    @app.get("/case/{user_id}", response_class=HTMLResponse, responses={404: json_error, 422: json_error})
    def case(
        user_id: str,
        k: Annotated[int, Query(ge=1, le=MAX_CASE_K)] = 10,
        other_group: Annotated[int | None, Query(ge=0)] = None,
    ) -> str:
        """The case study page of a known user (paper §4.4): the user's recent history beside the top-K of
        Global PEFT, of the user's group and of another group, with thumbnails, over the training catalog
        (Global PEFT has no table of added items). The first request encodes Global PEFT's item table
        (seconds); later ones reuse it."""
        if user_id not in serving.user_positions:
            raise HTTPException(404, f"user: unknown id {printable(user_id)}")
        if cases is None:
            raise HTTPException(422, "the run has one group: the case study compares the user's group with another")
        return case_study_html(cases.study(user_id, k, other_group))

    @app.get("/health")
    async def health() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/ready")
    async def ready() -> Readiness:
        """Readiness: the run's tables are loaded and checked; which catalog version is served."""
        current = live.serving
        return Readiness(
            ready=True,
            run=str(current.run.path),
            index=current.index_kind,
            groups=current.groups,
            items=current.dataset.num_items,
            users=current.dataset.num_users,
            catalog_version=current.catalog.version,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def exposition() -> str:
        """Request counts and latency histograms (Prometheus text format), of every server process."""
        return shared.exposition() if shared is not None else metrics.exposition()

    return app


RUN_VARIABLE, INDEX_VARIABLE = "PERPEFT_SERVE_RUN", "PERPEFT_SERVE_INDEX"
RELOAD_VARIABLE, METRICS_VARIABLE = "PERPEFT_SERVE_RELOAD", "PERPEFT_SERVE_METRICS"


def app_from_environment() -> FastAPI:
    """The app of the run named by ``$PERPEFT_SERVE_RUN`` (index ``$PERPEFT_SERVE_INDEX``, catalog polled
    every ``$PERPEFT_SERVE_RELOAD`` seconds, 0 never, metrics shared in ``$PERPEFT_SERVE_METRICS``): the
    factory each of uvicorn's worker processes calls (`serve --workers N`)."""
    serving = ServingRun.open(Path(os.environ[RUN_VARIABLE]), os.environ.get(INDEX_VARIABLE, "exact"))
    shared = os.environ.get(METRICS_VARIABLE)
    reload_seconds = float(os.environ.get(RELOAD_VARIABLE, RELOAD_SECONDS)) or None
    return create_app(serving, reload_seconds, Path(shared) if shared else None)
