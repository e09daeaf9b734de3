"""HTTP adapter: a FastAPI app (docs, health) with a lean ASGI fast path for POST /telemetry.

The ingest route is declared on the FastAPI app so it is documented in the OpenAPI schema,
but `IngestFastPath` answers it before routing, dependency injection or pydantic run.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import __version__, segment_format
from .auth import TokenTable
from .metrics import SinkCollector, Snapshot
from .service import IngestError, TelemetryService, shutting_down
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
ENCODINGS = (b"identity", b"gzip", b"x-gzip")
_MEDIA_TYPE_DETAIL = "Content-Type must be application/json or application/x-ndjson"
_JSON_HEADERS = [(b"content-type", b"application/json")]
# Statuses after which the rest of the request body may still be in flight: close the
# connection rather than keep reading (or trusting) it.
_CLOSE_AFTER = frozenset((401, 408, 413))


def _error(status: int, error: str, detail: str) -> IngestError:
    return IngestError(status, error, detail)


def _unauthorized() -> IngestError:
    exc = IngestError(401, "unauthorized", "a valid `Authorization: Bearer <token>` header is required")
    exc.headers = [(b"www-authenticate", b'Bearer realm="telemetry-sink"')]
    return exc


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body, doing at most `limit` + 1 bytes of output work (413 past it)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _error(400, "invalid_encoding", f"the gzip body does not decompress: {exc}") from None
    if len(out) > limit:
        raise _error(413, "payload_too_large", f"the decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise _error(400, "invalid_encoding", "the gzip body is truncated")
    if inflater.unused_data.strip(b"\0"):
        raise _error(400, "invalid_encoding", "unexpected bytes after the gzip stream")
    return out


class IngestHandler:
    """The POST /telemetry ASGI handler: headers, auth, bounded body read, service call, reply."""

    def __init__(
        self,
        service: TelemetryService,
        max_body_bytes: int,
        tokens: TokenTable | None = None,
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stats = self.service.stats
        try:
            accepted = await self._handle(scope, receive)
        except IngestError as exc:
            headers = list(_JSON_HEADERS)
            if exc.retry_after is not None:
                headers.append((b"retry-after", exc.retry_after.encode()))
            if exc.headers:
                headers.extend(exc.headers)
            if exc.status in _CLOSE_AFTER:
                headers.append((b"connection", b"close"))
            stats.rejected_by_reason[exc.error] = stats.rejected_by_reason.get(exc.error, 0) + 1
            status = exc.status
            await _reply(send, status, orjson.dumps(exc.body()), headers)
        except _Disconnected:
            if not scope.get(TIMED_OUT_KEY):
                return
            # GuardedHttpToolsProtocol already answered 408 and closed: count it like ours.
            status = 408
            stats.rejected_by_reason["request_timeout"] = stats.rejected_by_reason.get("request_timeout", 0) + 1
        except Exception:
            log.exception("unexpected error while ingesting")
            status = 500
            await _reply(send, 500, b'{"error":"internal_error","detail":"see the server log"}', _JSON_HEADERS)
        else:
            stats.records_accepted += accepted
            status = 202
            await _reply(send, 202, b'{"accepted":%d}' % accepted, _JSON_HEADERS)
        stats.requests_by_status[status] = stats.requests_by_status.get(status, 0) + 1

    async def _handle(self, scope: Scope, receive: Receive) -> int:
        fmt: str | None = None
        length: int | None = None
        encoding = b"identity"
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                fmt = MEDIA_TYPES.get(value.split(b";", 1)[0].strip().lower())
                if fmt is None:
                    raise _error(415, "unsupported_media_type", _MEDIA_TYPE_DETAIL)
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _error(400, "invalid_request", "Content-Length is not a number") from None
            elif name == b"content-encoding":
                encoding = value.strip().lower()
            elif name == b"authorization":
                authorization = value
        principal = None
        if self.tokens is not None:
            principal = self.tokens.authenticate(authorization)
            if principal is None:
                raise _unauthorized()
        if fmt is None:
            raise _error(415, "unsupported_media_type", _MEDIA_TYPE_DETAIL)
        if encoding not in ENCODINGS:
            raise _error(415, "unsupported_media_type",
                         f"Content-Encoding {encoding.decode('latin-1')!r} is not supported (use gzip or none)")
        if self.service.closing:  # before reading a body that would be refused anyway
            raise shutting_down()
        limit = self.max_body_bytes
        if length is not None and length > limit:
            raise _error(413, "payload_too_large", f"the body is {length} bytes; the limit is {limit}")
        # No timer here: GuardedHttpToolsProtocol enforces body_timeout_s (408) for the server.
        wire = await _read_body(receive, limit)
        self.service.stats.bytes_received += len(wire)
        body = wire if encoding == b"identity" else gunzip_bounded(wire, limit)
        client = scope.get("client")
        return await self.service.ingest(body, fmt, len(wire), principal, client[0] if client else None)


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    """Read the whole body, never holding more than `limit` bytes (413 past it).
    The usual single-message body is returned as is, without a copy."""
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise _error(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_SWEEP_INTERVAL_S = 0.25
_TIMEOUT_BODY = b'{"error":"request_timeout","detail":"the request body did not arrive in time"}'
_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)
_sweeping: set[int] = set()  # id() of the event loops that run a deadline sweep
TIMED_OUT_KEY = "telemetry_sink.timed_out"  # set in the ASGI scope when the body deadline passed


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow or piled-up clients: a
    connection limit (excess connections are closed at once), a deadline for the request head
    (a silent or header-trickling client is cut off) and one for the body (408, then close).

    Deadlines are plain timestamps checked by one sweep per event loop every 0.25 s, not
    timers per request: with per-request timers the single-record rate was 17 % lower
    (docs/BENCHMARKS.md). Module-level so uvicorn can hand it to worker processes;
    `configure_guard` sets the limits.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    _deadline: float | None = None  # loop.time() by which the current request phase must end
    _in_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection limit (%d) reached: closing a new connection", self.max_connections)
            transport.close()
            return
        self._deadline = self.loop.time() + self.header_timeout_s
        if id(self.loop) not in _sweeping:
            _sweeping.add(id(self.loop))
            self.loop.call_later(_SWEEP_INTERVAL_S, _sweep, self.loop, self.connections)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request starts its clock
            self._deadline = self.loop.time() + self.header_timeout_s

    def on_headers_complete(self) -> None:
        self._deadline = self.loop.time() + self.body_timeout_s
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = None
        self._in_body = False
        super().on_message_complete()

    def deadline_passed(self) -> None:
        """Cut the connection off: with a 408 if the body is late and no answer has started."""
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._in_body and cycle is not None and not cycle.response_started:
            self.transport.write(_TIMEOUT_408)
            self.scope[TIMED_OUT_KEY] = True  # type: ignore[literal-required]
            cycle.disconnected = True  # the app stops waiting for the body; its answer is dropped
            cycle.message_event.set()
        self.transport.close()


def _sweep(loop: asyncio.AbstractEventLoop, connections: set[Any]) -> None:
    now = loop.time()
    for conn in list(connections):
        deadline = getattr(conn, "_deadline", None)
        if deadline is not None and now > deadline:
            conn.deadline_passed()
    loop.call_later(_SWEEP_INTERVAL_S, _sweep, loop, connections)


def configure_guard(header_timeout_s: float, body_timeout_s: float,
                    max_connections: int) -> type[GuardedHttpToolsProtocol]:
    """Set the limits GuardedHttpToolsProtocol enforces in this process; return the class."""
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.body_timeout_s = body_timeout_s
    GuardedHttpToolsProtocol.max_connections = max_connections
    return GuardedHttpToolsProtocol


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
    400: _response("The body is not valid JSON / NDJSON, or its gzip encoding is broken", _ERROR_SCHEMA),
    401: _response("Auth is on and the bearer token is missing or unknown", _ERROR_SCHEMA),
    403: _response("The token may not write a record's node_id (index names it)", _ERROR_SCHEMA),
    408: _response("The body did not arrive within body_timeout_s", _ERROR_SCHEMA),
    413: _response("The body (or its decompressed form) exceeds max_body_bytes", _ERROR_SCHEMA),
    415: _response("Unsupported Content-Type or Content-Encoding", _ERROR_SCHEMA),
    422: _response("A record is invalid (index names the first); nothing was stored", _ERROR_SCHEMA),
    429: _response("The global rate limit is exceeded", _ERROR_SCHEMA, retry_after=True),
    503: _response("The buffer is full, the log cannot be written, or the server is shutting down",
                   _ERROR_SCHEMA, retry_after=True),
    507: _response("The log disk is full; nothing of this request was stored", _ERROR_SCHEMA, retry_after=True),
}


def _snapshot(service: TelemetryService) -> Snapshot:
    segments = 0
    segment_bytes = 0
    for path in segment_format.list_segments(service.writer.directory):
        try:
            segment_bytes += path.stat().st_size
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        segments += 1
    stats, wstats = service.stats, service.writer.stats
    return Snapshot(
        implementation=IMPLEMENTATION,
        requests_by_status=dict(stats.requests_by_status),
        rejected_by_reason=dict(stats.rejected_by_reason),
        records_accepted=stats.records_accepted,
        bytes_received=stats.bytes_received,
        buffer_records=service.buffer.records,
        buffer_bytes=service.buffer.bytes,
        records_written=wstats.records,
        write_errors=wstats.write_errors,
        segments=segments,
        segment_bytes=segment_bytes,
        extra={"rate_limit_node_buckets": service.rate_limiter.node_buckets,
               "segments_deleted_total": wstats.segments_deleted},
    )


def _nothing_to_reload() -> None:
    log.info("SIGHUP: no [auth] tokens_file to reload")


def readiness(service: TelemetryService, high_water_percent: int) -> list[str]:
    """Why the server should not get traffic now; [] means ready."""
    reasons = []
    if not service.writer_alive:
        reasons.append("the writer is not running")
    if service.closing:
        reasons.append("shutting down")
    if service.writer.stats.last_error is not None:
        reasons.append(f"the last write failed: {service.writer.stats.last_error}")
    buf = service.buffer
    if buf.above(high_water_percent):
        reasons.append(f"the buffer is above {high_water_percent}% of its bounds")
    return reasons


def create_app(
    service: TelemetryService,
    max_body_bytes: int,
    shutdown_timeout_s: float = 30.0,
    *,
    tokens: TokenTable | None = None,
    high_water_percent: int = 90,
    registry: CollectorRegistry | None = None,
) -> ASGIApp:
    """Build the ASGI app; its lifespan starts the writer task and drains it on shutdown."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(SinkCollector(lambda: _snapshot(service)))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        loop = asyncio.get_running_loop()
        # SIGHUP reloads the tokens file; without one it is logged, not fatal (its default).
        loop.add_signal_handler(signal.SIGHUP, tokens.reload if tokens is not None else _nothing_to_reload)
        log.info("telemetry-sink %s ready (speedups: %s, writer series %s, next sequence %d)",
                 __version__, IMPLEMENTATION, service.writer.series, service.writer.next_seq,
                 extra={"event": "ready"})
        yield
        loop.remove_signal_handler(signal.SIGHUP)
        await service.stop(shutdown_timeout_s)

    api = FastAPI(title="telemetry-sink", version=__version__, lifespan=lifespan)
    handler = IngestHandler(service, max_body_bytes, tokens)

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

    @api.get("/readyz", summary="Readiness: 200 only when writes succeed and the buffer has room")
    async def readyz() -> Response:
        reasons = readiness(service, high_water_percent)
        if reasons:
            return JSONResponse({"status": "not_ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    @api.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return IngestFastPath(api, handler)
