"""FastAPI routes: each is a thin call of a `RagService` method. OpenAPI at /docs, the page at /.

Bad input never gets a 500: validation errors are 422, bad JSON 400, oversized bodies 413, unknown
indexes 404, a swap to an index of another document encoder 409 — each with {"error": "..."} that says
what was wrong. Only a fault of the server itself is a 500, and it carries no traceback. Admission control
(`admission.py`): a request over the cost bound is a 422, a full queue a 429, a spent cost budget, a passed
deadline or a server shutting down a 503 (429 and 503 with Retry-After). A request whose client leaves is
dropped, streamed or not.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from latentrag.errors import LatentRagError
from latentrag.serving.schemas import (
    AskRequest,
    AskResponse,
    ErrorBody,
    IndexList,
    RetrieveRequest,
    RetrieveResponse,
    SwapRequest,
)
from latentrag.serving.service import ClientLeft, RagService, ServiceError

WEB = Path(__file__).parent / "web"
DOCS_ASSETS = Path(importlib.util.find_spec("fastapi_offline").origin).parent / "static"  # Swagger UI 5
MAX_BODY = 16 * 1024  # bytes; a question is at most 2,000 characters
log = logging.getLogger("latentrag.serving")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)}
CLIENT_LEFT = 499  # nginx's "client closed request": recorded in the metrics, never received by anyone


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return 400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return 422, "; ".join(parts) or "invalid request"


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before any route reads them (pure ASGI)."""

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _error(413, f"the request body is larger than {self.limit} bytes")
        if declared is not None:
            if not declared.isdigit():
                return await _error(400, "bad Content-Length header")(scope, receive, send)
            if int(declared) > self.limit:
                return await too_big(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: a disconnect still reaches a stream

        await self.app(scope, replay, send)


class Measure:
    """Count requests and errors per route and time them to the response's headers (pure ASGI: streams pass)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        started = False

        async def timed_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.request(route, message["status"], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:  # answered 500 by the server-error middleware outside this one: count it here
            if not started:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.request(route, 500, time.perf_counter() - start)
            raise


@asynccontextmanager
async def _disconnect(request: Request):
    """A future that completes when the client disconnects (the body is read: the next ASGI message can only
    be `http.disconnect`)."""
    waiter = asyncio.ensure_future(request.receive())
    try:
        yield waiter
    finally:
        waiter.cancel()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service: RagService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="latentrag", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Retrieval-Augmented Generation (Lewis et al. 2020): answers with their evidence.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(*_validation_message(exc))

    @app.exception_handler(LatentRagError)
    async def _refused(request: Request, exc: LatentRagError):
        status = exc.status if isinstance(exc, ServiceError) else 400
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else getattr(exc, "headers", None)
        return _error(status, str(exc), headers)

    @app.exception_handler(ClientLeft)
    async def _left(request: Request, exc: ClientLeft):
        return Response(status_code=CLIENT_LEFT)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal server error (logged by the server)")

    app.add_middleware(BodyLimit)
    app.add_middleware(Measure, metrics=service.metrics)  # outermost: counts 413s too

    @app.post("/v1/ask", response_model=AskResponse, responses=ERRORS,
              summary="Answer a question with its passages, p(z|x) and the posterior (stream: server-sent events)")
    async def ask(body: AskRequest, request: Request):
        if not body.stream:
            async with _disconnect(request) as left:
                return await service.ask(body, left)
        job = service.submit_ask(body)
        return StreamingResponse(_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job):
        """`passages` once retrieved, a `token` event per decoded token, then `answer` (the non-streamed body)
        or `error` (a passed deadline among them). A client that leaves is dropped (Starlette stops this
        generator when the client disconnects)."""
        deadline = job.enqueued + service.limits.timeout_s
        finished = False
        try:
            while True:
                getter = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.perf_counter()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield _sse(*getter.result())
                    continue
                getter.cancel()
                if not done:  # the deadline passed
                    job.abandoned = True
                    service.metrics.cancelled("deadline")
                    finished = True
                    yield _sse("error", {"error": f"no answer within the server's deadline of "
                                                  f"{service.limits.timeout_s:g} s (--request-timeout)"})
                    return
                while not job.events.empty():
                    yield _sse(*job.events.get_nowait())
                finished = True
                try:
                    yield _sse("answer", job.future.result())
                except LatentRagError as e:
                    yield _sse("error", {"error": str(e)})
                except Exception:
                    log.exception("internal error while streaming")
                    service.metrics.request("/v1/ask", 500, 0.0)
                    yield _sse("error", {"error": "internal server error (logged by the server)"})
                return
        finally:
            if not finished and not job.future.done():
                service.metrics.cancelled("client_left")
            job.abandoned = True  # done or disconnected: nothing more is sent to this client

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS,
              summary="The top-k passages for a question with p(z|x)")
    async def retrieve(body: RetrieveRequest, request: Request):
        async with _disconnect(request) as left:
            return await service.retrieve(body, left)

    @app.get("/v1/indexes", response_model=IndexList, summary="The indexes under the root, with their manifests")
    async def indexes():
        return await asyncio.to_thread(service.index_list)

    @app.post("/v1/index", responses=ERRORS,
              summary="Hot-swap to another index under the root (Authorization: Bearer <admin token>)")
    async def swap(body: SwapRequest, authorization: str | None = Header(None)):
        return await service.swap_async(body.name, authorization)

    @app.get("/healthz", summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model and an index are loaded and the service can take a request now")
    async def readyz():
        load = {"queue_depth": service.batcher.depth, "in_flight": service.batcher.in_flight,
                "pending_cost": service.batcher.pending_cost, "max_pending_cost": service.limits.max_pending_cost}
        if not service.ready:
            return JSONResponse({"error": "not ready", "status": "stopping" if service.stopping else "starting",
                                 **load}, status_code=503)
        saturated = service.saturation()
        if saturated:
            return JSONResponse({"error": f"saturated: {saturated}", "status": "saturated", **load},
                                status_code=503, headers={"Retry-After": str(service.rate.seconds(load["pending_cost"]))})
        return {"status": "ready", "index": service.active.ref(), **load}

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(WEB / "index.html")

    # /docs: Swagger UI 5 from assets served here (the fastapi-offline package ships them): no CDN, works offline
    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="latentrag API",
                                   swagger_js_url="/static-docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static-docs/swagger-ui.css",
                                   swagger_favicon_url="/static-docs/favicon.png")

    app.mount("/static-docs", StaticFiles(directory=DOCS_ASSETS), name="static-docs")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app
