"""The HTTP app: FastAPI for the documented routes (OpenAPI, health, readiness, metrics) behind
`IngestFastPath`, which hands POST /telemetry to the lean handler before routing, dependency
injection or pydantic run; and the lifespan that starts the writer and drains it on shutdown.

The ingest route is declared on the FastAPI app only so that it is documented in the schema.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from . import __version__, otlp
from .auth import TokenTable
from .ingest_http import IngestHandler, Receive, Scope, Send
from .metrics import SinkCollector
from .service import TelemetryService
from .speedups import IMPLEMENTATION

log = logging.getLogger("telemetry_sink.http")


class IngestFastPath:
    """Outermost ASGI app: POST /telemetry (and POST /v1/logs) go straight to their handlers, the
    rest to FastAPI."""

    def __init__(self, api: FastAPI, handler: IngestHandler, otlp_handler: IngestHandler | None = None) -> None:
        """`handler` is also what the protocol's fast lane calls (serve.build_app)."""
        self.api = api
        self.handler = handler
        self.otlp_handler = otlp_handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == "/telemetry":
                return await self.handler(scope, receive, send)
            if scope["path"] == "/v1/logs" and self.otlp_handler is not None:
                return await self.otlp_handler(scope, receive, send)
        await self.api(scope, receive, send)


def _otlp_success(fmt: str, accepted: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    content_type, body = otlp.SUCCESS_BODIES[fmt]
    return 200, [(b"content-type", content_type)], body


class _DelegateResponse(Response):
    """Lets the documented FastAPI route run the very same raw handler."""

    def __init__(self, handler: IngestHandler) -> None:
        super().__init__()
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


_RECORD_SCHEMA = {
    "type": "object",
    "required": ["node_id"],
    "properties": {
        "node_id": {"type": "string", "minLength": 1, "maxLength": 128},
        "ts": {"type": "number", "description": "Unix seconds; the receive time is added when absent"},
    },
    "additionalProperties": True,
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {"error": {"type": "string"}, "index": {"type": "integer"}, "detail": {"type": "string"}},
}
_INGEST_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"oneOf": [_RECORD_SCHEMA, {"type": "array", "minItems": 1, "items": _RECORD_SCHEMA}]}
            },
            "application/x-ndjson": {"schema": {"type": "string", "description": "one record object a line"}},
        },
    },
}


def _response(description: str, schema: dict[str, Any], retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return out


_INGEST_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: _response("All records accepted", {"type": "object", "properties": {"accepted": {"type": "integer"}}}),
    400: _response("The body is not valid JSON / NDJSON, or its gzip encoding is broken", _ERROR_SCHEMA),
    401: _response("Auth is on and the bearer token is missing or unknown", _ERROR_SCHEMA),
    403: _response("The token may not write a record's node_id (index names it)", _ERROR_SCHEMA),
    408: _response("The body did not arrive within body_timeout_s", _ERROR_SCHEMA),
    409: _response("A request with the same Idempotency-Key is still in flight", _ERROR_SCHEMA, retry_after=True),
    413: _response("The body (or its decompressed form) exceeds max_body_bytes, or it holds more than "
                   "max_records_per_request records", _ERROR_SCHEMA),
    414: _response("The request URL exceeds max_header_bytes", _ERROR_SCHEMA),
    415: _response("Unsupported Content-Type or Content-Encoding", _ERROR_SCHEMA),
    422: _response("A record is invalid (index names the first); nothing was stored", _ERROR_SCHEMA),
    429: _response("The global rate limit is exceeded", _ERROR_SCHEMA, retry_after=True),
    431: _response("The request head exceeds max_header_bytes", _ERROR_SCHEMA),
    503: _response("The buffer is full, the log cannot be written, or the server is shutting down",
                   _ERROR_SCHEMA, retry_after=True),
    507: _response("The log disk is full; nothing of this request was stored", _ERROR_SCHEMA, retry_after=True),
}


_OTLP_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary",
                                                  "description": "ExportLogsServiceRequest"}},
            "application/json": {"schema": {"type": "object", "description": "ExportLogsServiceRequest, OTLP JSON"}},
        },
    },
}
_OTLP_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "All log records stored: an empty ExportLogsServiceResponse (partial success is never "
                         "used)", "content": {"application/x-protobuf": {}, "application/json": {}}},
    **{status: spec for status, spec in _INGEST_RESPONSES.items() if status != 202},
}


def _nothing_to_reload() -> None:
    log.info("SIGHUP: no [auth] tokens_file to reload")


def _refuse_on_exit_signals(service: TelemetryService) -> Callable[[], None]:
    """From the first SIGTERM/SIGINT on, refuse new ingests (503 shutting_down) while uvicorn's
    own handler, chained after ours, drains in-flight requests. Installed by the lifespan, so it
    runs in whichever process serves: the only process, or each worker under the supervisor.
    Returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach the main thread only (an in-process test client)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_exit(sig: int, frame: FrameType | None) -> None:
        service.begin_shutdown()
        handler = previous[signal.Signals(sig)]
        if callable(handler):
            handler(sig, frame)
        elif handler != signal.SIG_IGN:  # the default action, as if we had not been here
            signal.signal(sig, handler)
            signal.raise_signal(sig)

    for sig in previous:
        signal.signal(sig, on_exit)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def create_app(
    service: TelemetryService,
    max_body_bytes: int,
    shutdown_timeout_s: float = 30.0,
    *,
    tokens: TokenTable | None = None,
    registry: CollectorRegistry | None = None,
    node_id_header: str | None = None,
) -> IngestFastPath:
    """Build the ASGI app; its lifespan starts the writer task and drains it on shutdown."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(SinkCollector(service.metrics_snapshot))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        loop = asyncio.get_running_loop()
        # SIGHUP reloads the tokens file; without one it is logged, not fatal (its default).
        loop.add_signal_handler(signal.SIGHUP, tokens.reload if tokens is not None else _nothing_to_reload)
        restore_signals = _refuse_on_exit_signals(service)
        log.info("telemetry-sink %s ready (speedups: %s, writer series %s, next sequence %d)",
                 __version__, IMPLEMENTATION, service.writer.series, service.writer.next_seq,
                 extra={"event": "ready"})
        yield
        loop.remove_signal_handler(signal.SIGHUP)
        restore_signals()
        await service.stop(shutdown_timeout_s)

    # No slash redirects: a 307 for /telemetry/ would build its Location from the client's Host header.
    api = FastAPI(title="telemetry-sink", version=__version__, lifespan=lifespan, redirect_slashes=False)
    handler = IngestHandler(service, max_body_bytes, tokens, node_id_header=node_id_header)
    otlp_handler = IngestHandler(service, max_body_bytes, tokens, media_types=otlp.MEDIA_TYPES,
                                 media_type_detail=otlp.MEDIA_TYPE_DETAIL, success=_otlp_success)

    @api.post("/telemetry", status_code=202, openapi_extra=_INGEST_OPENAPI, responses=_INGEST_RESPONSES,
              summary="Ingest telemetry records (all or nothing)")
    async def telemetry(request: Request) -> Response:
        return _DelegateResponse(handler)

    @api.post("/v1/logs", status_code=200, openapi_extra=_OTLP_OPENAPI, responses=_OTLP_RESPONSES,
              summary="OTLP/HTTP logs: one stored record per log record (all or nothing; docs/otlp.md)")
    async def otlp_logs(request: Request) -> Response:
        return _DelegateResponse(otlp_handler)

    @api.get("/healthz", summary="Liveness: 200 while the writer task is alive")
    async def healthz() -> Response:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @api.get("/readyz", summary="Readiness: 200 only when writes succeed and the buffer has room")
    async def readyz() -> Response:
        reasons = service.readiness()
        if reasons:
            return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    @api.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return IngestFastPath(api, handler, otlp_handler)
