"""HTTP adapter: a FastAPI app (docs, health) with a lean ASGI fast path for POST /telemetry.

The ingest route is declared on the FastAPI app so it is documented in the OpenAPI schema,
but `IngestFastPath` answers it before routing, dependency injection or pydantic run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from . import __version__
from .service import IngestError, TelemetryService
from .speedups import IMPLEMENTATION

log = logging.getLogger("telemetry_sink.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MEDIA_TYPES = {
    b"application/json": "json",
    b"application/x-ndjson": "ndjson",
    b"application/ndjson": "ndjson",
}
_JSON_HEADERS = [(b"content-type", b"application/json")]


def _error(status: int, error: str, detail: str) -> IngestError:
    return IngestError(status, error, detail)


class IngestHandler:
    """The POST /telemetry ASGI handler: headers, bounded body read, service call, reply."""

    def __init__(self, service: TelemetryService, max_body_bytes: int) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            accepted = await self._handle(scope, receive)
        except IngestError as exc:
            headers = list(_JSON_HEADERS)
            if exc.retry_after is not None:
                headers.append((b"retry-after", exc.retry_after.encode()))
            await _reply(send, exc.status, orjson.dumps(exc.body()), headers)
        except _Disconnected:
            return
        except Exception:
            log.exception("unexpected error while ingesting")
            await _reply(send, 500, b'{"error":"internal_error","detail":"see the server log"}', _JSON_HEADERS)
        else:
            await _reply(send, 202, b'{"accepted":%d}' % accepted, _JSON_HEADERS)

    async def _handle(self, scope: Scope, receive: Receive) -> int:
        fmt: str | None = None
        length: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                fmt = MEDIA_TYPES.get(value.split(b";", 1)[0].strip().lower())
                if fmt is None:
                    raise _error(415, "unsupported_media_type",
                                 "Content-Type must be application/json or application/x-ndjson")
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _error(400, "invalid_request", "Content-Length is not a number") from None
        if fmt is None:
            raise _error(415, "unsupported_media_type",
                         "Content-Type must be application/json or application/x-ndjson")
        if self.service.closing:
            raise _error(503, "shutting_down", "the server is shutting down")
        limit = self.max_body_bytes
        if length is not None and length > limit:
            raise _error(413, "payload_too_large", f"the body is {length} bytes; the limit is {limit}")
        body = await _read_body(receive, limit)
        return await self.service.ingest(body, fmt)


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole body, never holding more than `limit` bytes (413 past it)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _error(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
        return body
    chunks = [body]
    total = len(body)
    while True:
        if total > limit:
            raise _error(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        chunks.append(chunk)
        total += len(chunk)
        if not message.get("more_body", False):
            break
    if total > limit:
        raise _error(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
    return b"".join(chunks)


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class IngestFastPath:
    """Outermost ASGI app: POST /telemetry goes straight to the handler, the rest to FastAPI."""

    def __init__(self, api: FastAPI, handler: IngestHandler) -> None:
        self.api = api
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/telemetry" and scope["method"] == "POST":
            await self.handler(scope, receive, send)
        else:
            await self.api(scope, receive, send)


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
    400: _response("The body is not valid JSON / NDJSON", _ERROR_SCHEMA),
    413: _response("The body exceeds max_body_bytes", _ERROR_SCHEMA),
    415: _response("Unsupported Content-Type", _ERROR_SCHEMA),
    422: _response("A record is invalid (index names the first); nothing was stored", _ERROR_SCHEMA),
    429: _response("The global rate limit is exceeded", _ERROR_SCHEMA, retry_after=True),
    503: _response("The buffer is full, the log cannot be written, or the server is shutting down",
                   _ERROR_SCHEMA, retry_after=True),
    507: _response("The log disk is full; nothing of this request was stored", _ERROR_SCHEMA, retry_after=True),
}


def create_app(service: TelemetryService, max_body_bytes: int, shutdown_timeout_s: float = 30.0) -> ASGIApp:
    """Build the ASGI app; its lifespan starts the writer task and drains it on shutdown."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        log.info("telemetry-sink %s ready (speedups: %s, writer series %s, next sequence %d)",
                 __version__, IMPLEMENTATION, service.writer.series, service.writer.next_seq)
        yield
        await service.stop(shutdown_timeout_s)

    api = FastAPI(title="telemetry-sink", version=__version__, lifespan=lifespan)
    handler = IngestHandler(service, max_body_bytes)

    @api.post("/telemetry", status_code=202, openapi_extra=_INGEST_OPENAPI, responses=_INGEST_RESPONSES,
              summary="Ingest telemetry records (all or nothing)")
    async def telemetry(request: Request) -> Response:
        return _DelegateResponse(handler)

    @api.get("/healthz", summary="Liveness: 200 while the writer task is alive")
    async def healthz() -> Response:
        alive = service.writer_alive
        body = {
            "status": "ok" if alive else "writer_stopped",
            "implementation": IMPLEMENTATION,
            "buffer_records": service.buffer.records,
            "records_written": service.writer.stats.records,
            "last_write_error": service.writer.stats.last_error,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    return IngestFastPath(api, handler)
