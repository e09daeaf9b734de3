"""The POST /telemetry handler as a lean ASGI app: headers, auth, a bounded body read, gzip
decoding, the service call, and the reply (the only place Retry-After is formatted)."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from .auth import Principal, TokenTable
from .errors import IngestError, shutting_down
from .idempotency import Replayed, parse_key
from .service import TelemetryService

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
JSON_HEADERS = [(b"content-type", b"application/json")]
_REPLAYED = (b"idempotent-replayed", b"true")
# Statuses after which the rest of the request body may still be in flight: close the
# connection rather than keep reading (or trusting) it.
CLOSE_AFTER = frozenset((401, 408, 413))


def _error(status: int, error: str, detail: str) -> IngestError:
    return IngestError(status, error, detail)


def body_too_large(limit: int) -> IngestError:
    """413 for a body that grew past `limit` bytes as it arrived."""
    return _error(413, "payload_too_large", f"the body exceeds the limit of {limit} bytes")


def retry_after_header(seconds: float) -> bytes:
    """The Retry-After value for a delay: whole seconds, rounded up, at least 1."""
    if math.isinf(seconds):  # larger than the bucket: config validation prevents it
        return b"3600"
    return b"%d" % max(1, math.ceil(seconds))


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


Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]  # status, headers (without content-length), body


# The bodies of the common counts, built once (formatting one took a few % of a single-record request).
_ACCEPTED_BODIES = tuple(b'{"accepted":%d}' % n for n in range(101))


def telemetry_accepted(fmt: str, accepted: int) -> Answer:
    """POST /telemetry's success: 202 {"accepted": n}."""
    body = _ACCEPTED_BODIES[accepted] if 0 <= accepted <= 100 else b'{"accepted":%d}' % accepted
    return 202, JSON_HEADERS, body


@dataclass(slots=True)
class IngestHead:
    """What the request head says about the body (checked before a byte of it is read)."""

    fmt: str
    encoding: bytes
    principal: Principal | None
    idempotency_key: bytes | None = None
    default_node: str | None = None  # from [ingest] node_id_header


class IngestHandler:
    """An ingest route (POST /telemetry by default; POST /v1/logs brings its media types and success
    answer): the head checks, the body's decoding, the service call and the answers, shared by the
    ASGI handler (`__call__`) and the protocol's fast lane (`check_head`, `answer_now`), so both
    lanes follow one implementation of the contract."""

    def __init__(
        self,
        service: TelemetryService,
        max_body_bytes: int,
        tokens: TokenTable | None = None,
        *,
        media_types: Mapping[bytes, str] = MEDIA_TYPES,
        media_type_detail: str = _MEDIA_TYPE_DETAIL,
        success: Callable[[str, int], Answer] = telemetry_accepted,
        node_id_header: str | None = None,
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.tokens = tokens
        self.media_types = media_types
        self.media_type_detail = media_type_detail
        self.success = success
        # The header (lower case, as the parser gives names) naming the node of records without one.
        self.node_id_header = node_id_header.lower().encode("latin-1") if node_id_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            head = self.check_head(scope["headers"])
            wire = await _read_body(receive, self.max_body_bytes)
            client = scope.get("client")
            accepted = await self.service.ingest(self.decode(head, wire), head.fmt, len(wire), head.principal,
                                                 client[0] if client else None, head.idempotency_key,
                                                 head.default_node)
        except _Disconnected:
            return  # the client went away, or the guard answered 408 (and counted it)
        except Exception as exc:
            status, headers, body = self.refusal(exc)
        else:
            status, headers, body = self.accepted(head.fmt, accepted)
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def answer_now(self, head: IngestHead, wire: bytes, client: str | None) -> Answer:
        """The whole ingest of a complete body without awaiting (needs `service.can_decide_now`)."""
        try:
            accepted = self.service.ingest_now(self.decode(head, wire), head.fmt, len(wire), head.principal, client,
                                               head.idempotency_key, head.default_node)
        except Exception as exc:
            return self.refusal(exc)
        return self.accepted(head.fmt, accepted)

    def accepted(self, fmt: str, count: int) -> Answer:
        """The success answer for `count` stored records (counted for /metrics); a `Replayed` count is
        the first answer again, marked as such, with nothing stored this time."""
        service = self.service
        status, headers, body = self.success(fmt, count)
        if isinstance(count, Replayed):
            headers = [*headers, _REPLAYED]
        else:
            service.stats.records_accepted += count
        service.count_response(status)
        return status, headers, body

    def refusal(self, exc: BaseException) -> Answer:
        """The answer for an IngestError (or a 500 for anything else), counted for /metrics."""
        if not isinstance(exc, IngestError):
            log.error("unexpected error while ingesting", exc_info=exc)
            self.service.count_response(500, "internal_error")
            return 500, JSON_HEADERS, b'{"error":"internal_error","detail":"see the server log"}'
        headers = list(JSON_HEADERS)
        if exc.retry_after_s is not None:
            headers.append((b"retry-after", retry_after_header(exc.retry_after_s)))
        if exc.headers:
            headers.extend(exc.headers)
        if exc.status in CLOSE_AFTER:
            headers.append((b"connection", b"close"))
        self.service.count_response(exc.status, exc.error)
        return exc.status, headers, orjson.dumps(exc.body())

    def check_head(self, raw_headers: Headers) -> IngestHead:
        """Media type, encoding, auth, shutdown and declared length: refuse before the body."""
        fmt: str | None = None
        length: int | None = None
        encoding = b"identity"
        authorization: bytes | None = None
        idempotency_key: bytes | None = None
        default_node: bytes | None = None
        node_header = self.node_id_header
        for name, value in raw_headers:
            if name == b"content-type":
                media_type, _, params = value.partition(b";")
                fmt = self.media_types.get(media_type.strip().lower())
                if fmt is None:
                    raise _error(415, "unsupported_media_type", self.media_type_detail)
                if params:
                    _check_charset(params)
            elif name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _error(400, "invalid_request", "Content-Length is not a number") from None
            elif name == b"content-encoding":
                encoding = value.strip().lower()
            elif name == b"authorization":
                authorization = value
            elif name == b"idempotency-key":
                idempotency_key = value
            elif name == node_header:
                default_node = value
        principal = None
        if self.tokens is not None:
            principal = self.tokens.authenticate(authorization)
            if principal is None:
                raise _unauthorized()
        if fmt is None:
            raise _error(415, "unsupported_media_type", self.media_type_detail)
        if encoding not in ENCODINGS:
            raise _error(415, "unsupported_media_type",
                         f"Content-Encoding {encoding.decode('latin-1')!r} is not supported (use gzip or none)")
        key = parse_key(idempotency_key) if idempotency_key is not None else None
        if self.service.closing:  # before reading a body that would be refused anyway
            raise shutting_down()
        limit = self.max_body_bytes
        if length is not None and length > limit:
            raise _error(413, "payload_too_large", f"the body is {length} bytes; the limit is {limit}")
        node = default_node.decode("utf-8", "replace").strip() if default_node is not None else None
        return IngestHead(fmt, encoding, principal, key, node or None)

    def decode(self, head: IngestHead, wire: bytes) -> bytes:
        """Count the wire bytes and undo the content encoding (bounded by max_body_bytes)."""
        self.service.stats.bytes_received += len(wire)
        return wire if head.encoding == b"identity" else gunzip_bounded(wire, self.max_body_bytes)


def _check_charset(params: bytes) -> None:
    """415 for a charset other than UTF-8 (the body would be parsed as UTF-8 all the same)."""
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"charset":
            charset = value.strip().strip(b'"').lower()
            if charset not in (b"utf-8", b"utf8"):
                raise _error(415, "unsupported_media_type",
                             f"charset {charset.decode('latin-1')!r} is not supported: send UTF-8 (charset=utf-8)")


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
            raise body_too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
