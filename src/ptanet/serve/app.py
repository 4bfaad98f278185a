"""The HTTP liveness service: ``create_app(checker)`` builds it, ``run_server`` runs it with uvicorn.

Endpoints: ``POST /v1/liveness`` (the image as a multipart file field or as the raw body),
``GET /v1/configs``, ``PUT /v1/config``, ``/healthz``, ``/readyz``, OpenAPI docs at ``/docs`` and the
web page at ``/``.

Limits, so that one client cannot take the service down:
- A body over ``max_body`` bytes is answered 413 before it is read whole: from its Content-Length, or
  (chunked uploads) as soon as the bytes counted while streaming pass the limit.
- An image whose header says more than ``max_pixels`` pixels (a decompression bomb) is answered 413
  without decoding it; a body that is not an image, or a truncated one, 422 (415 for a media type
  that cannot hold an image), each with a message.
- At most ``queue`` requests are checked or waiting at once; beyond that 503 with Retry-After.
- Decoding and inference run in a thread pool of ``workers`` threads, never on the event loop, so
  health checks and rejections stay fast while images are checked.
- An exception inside one request is answered 500 and logged; the server goes on.
- On SIGTERM uvicorn stops accepting and finishes the requests in flight before exiting.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from ptanet.liveness import ImageTooLargeError, LivenessChecker
from ptanet.preprocess import ImageReadError

log = logging.getLogger("ptanet.serve")
IMAGE_TYPES = ("image/", "application/octet-stream", "multipart/form-data")


class _TooLarge(Exception):
    """Raised from the counting receive channel once a body passes the limit."""


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers or None)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit before reading anything,
    and for a body that passes the limit while it streams in (chunked uploads)."""

    def __init__(self, app, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error(413, f"request body over the limit of {self.max_body:,} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await too_large(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await too_large(scope, receive, send)


class ConfigRequest(BaseModel):
    config: str


class Service:
    """State of one running service: the checker, the pool, the queue bound, latency per config."""

    def __init__(self, checker: LivenessChecker, queue: int, workers: int) -> None:
        self.checker, self.queue = checker, queue
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ptanet-check")
        self.in_flight = 0
        self.ready = False
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=200))

    def configs(self) -> dict:
        val = getattr(self.checker.predictor._backend, "meta", {}).get("val", {})
        rows = []
        for cfg in self.checker.configs:
            times = self.latency.get(cfg)
            quality = {k: val[cfg][k] for k in ("acer", "apcer", "bpcer", "auc") if k in val.get(cfg, {})}
            rows.append({"config": cfg, "model_ms_median": statistics.median(times) if times else None,
                         "measured_requests": len(times) if times else 0, "validation": quality or None})
        return {"current": self.checker.config, "threshold": self.checker.threshold, "detect": self.checker.detect,
                "configs": rows}


async def _read_image(request: Request) -> bytes | JSONResponse:
    """The image bytes of a request: the first file field of a multipart form, or the raw body."""
    ctype = request.headers.get("content-type", "application/octet-stream").lower()
    if not ctype.startswith(IMAGE_TYPES):
        return _error(415, f"unsupported media type {ctype!r}: send an image (image/*, application/octet-stream) "
                           "or a multipart form with a file field")
    if not ctype.startswith("multipart/form-data"):
        return await request.body()
    try:
        form = await request.form(max_files=1, max_fields=10)
    except _TooLarge:
        raise
    except Exception as exc:  # python-multipart's parse errors; starlette wraps them differently by version
        return _error(422, f"malformed multipart body: {exc}")
    for value in form.values():
        if hasattr(value, "read"):
            return await value.read()
    return _error(422, "multipart form without a file field: send the image as a file (e.g. -F image=@face.jpg)")


def create_app(checker: LivenessChecker, max_body: int = 10 * 1024 * 1024, queue: int = 16, workers: int = 2) -> FastAPI:
    """The FastAPI app around a loaded checker (the page, the API, the limits)."""
    service = Service(checker, queue, workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import numpy as np

        # One check before reporting ready, so the first real request does not pay for warm-up.
        await asyncio.get_running_loop().run_in_executor(service.pool, checker.check, np.zeros((64, 64, 3), np.uint8))
        service.ready = True
        yield
        service.ready = False
        service.pool.shutdown(wait=True)

    app = FastAPI(title="ptanet liveness", version="1", lifespan=lifespan,
                  description="Face anti-spoofing with a Post-Train Adaptive MobileNetV2: every face of an image "
                              "with its box, spoof probability and decision.")
    app.state.service = service
    app.add_middleware(BodyLimit, max_body=max_body)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error(500, f"internal error while handling the request ({type(exc).__name__}); the service goes on")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("ptanet.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/healthz", summary="the process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="the model is loaded and warmed up")
    async def readyz():
        if not service.ready:
            return _error(503, "not ready", **{"Retry-After": "1"})
        return {"status": "ready", "config": checker.config}

    @app.get("/v1/configs", summary="configurations this model runs, with measured speed and stored quality")
    async def configs():
        return service.configs()

    @app.put("/v1/config", summary="switch the configuration at run time (no reload)")
    async def set_config(body: ConfigRequest):
        try:
            await asyncio.get_running_loop().run_in_executor(service.pool, checker.set_config, body.config)
        except ValueError as exc:
            return _error(422, str(exc))
        return {"config": checker.config}

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/liveness", summary="check every face of an image", openapi_extra=upload_doc, responses={
        413: {"description": "body or image too large"}, 415: {"description": "not an image media type"},
        422: {"description": "not an image, or a truncated one"}, 503: {"description": "queue full"}})
    async def liveness(request: Request):
        if not service.ready:
            return _error(503, "model not ready yet", **{"Retry-After": "1"})
        if service.in_flight >= service.queue:
            return _error(503, f"busy: {service.queue} requests in progress or waiting", **{"Retry-After": "1"})
        service.in_flight += 1  # the event loop is one thread: no lock needed
        try:
            data = await _read_image(request)
            if isinstance(data, JSONResponse):
                return data
            start = time.perf_counter()
            try:
                result = await asyncio.get_running_loop().run_in_executor(service.pool, checker.check, data)
            except ImageTooLargeError as exc:
                return _error(413, str(exc))
            except ImageReadError as exc:
                return _error(422, str(exc))
            body = result.to_dict()
            body["server_ms"] = (time.perf_counter() - start) * 1000.0
            if result.config:
                service.latency[result.config].append(result.timings["model"])
            return body
        finally:
            service.in_flight -= 1

    return app


def run_server(model: str, host: str = "127.0.0.1", port: int = 8000, detect: str | None = "haar",
               config: str | None = None, threshold: float | None = None, max_body: int = 10 * 1024 * 1024,
               max_pixels: int | None = None, queue: int = 16, workers: int = 2, threads: int = 1) -> None:
    """Load the model once and serve until SIGTERM/SIGINT (requests in flight are finished)."""
    import uvicorn

    from ptanet.liveness import MAX_PIXELS

    checker = LivenessChecker(model, detect=detect, config=config, threshold=threshold,
                              max_pixels=max_pixels or MAX_PIXELS, threads=threads)
    app = create_app(checker, max_body=max_body, queue=queue, workers=workers)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
