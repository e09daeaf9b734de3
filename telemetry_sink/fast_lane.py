"""The fast lane: POST /telemetry answered by the HTTP protocol itself, below ASGI.

When a request can be decided without waiting (`TelemetryService.can_decide_now`: buffered
acks, no delay-mode rate limit), its body is small and plain (Content-Length up to 64 KiB, no
gzip: a single record to a few hundred) and nothing earlier on the connection is still being answered,
the protocol collects the body as the parser delivers it, calls the same `IngestHandler` checks
and the service's synchronous entry point when the message is complete, and writes the answer's
bytes straight to the transport: no task, no ASGI messages, no receive/send coroutines, and no
ASGI scope (uvicorn's is built only for a request that goes to ASGI). Every
other request (other routes, a query string, durable acks, delay mode, an upgrade, a large,
gzip or chunked body, a request pipelined behind one still on ASGI) goes through uvicorn and the
ASGI app as before, so the contract has one implementation and this module only changes how the
bytes move.
"""

from __future__ import annotations

from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from .errors import IngestError
from .guard import GuardedHttpToolsProtocol
from .ingest_http import CLOSE_AFTER, JSON_HEADERS, Answer, Headers, IngestHandler, IngestHead, body_too_large
from .speedups import parse_plain_post

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_PATH = b"/telemetry"
# Larger bodies, gzip and chunked ones (size unknown up front) take ASGI, where the service works
# through big bodies in slices that yield to other connections (TelemetryService.ingest).
FAST_LANE_MAX_BODY = 65536
# After a 503 (buffer full, write failing), the connection's next request is read this much
# later (its Retry-After says 1 s anyway): a client retrying at once would otherwise spin the
# event loop on cheap refusals and take the GIL from the writer thread that frees the buffer.
# 100-record arrays under wrk: 72 % 503s and ~130k accepted records/s without it, 8-9 % and
# ~260k with 0.1 s (0.02 s: 31-45 %, ~206k).
REFUSED_PAUSE_S = 0.1


def _small_plain_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """A Content-Length up to FAST_LANE_MAX_BODY and no Content-Encoding / Transfer-Encoding."""
    small = False
    for name, value in headers:
        if name == b"content-length":
            small = value.isdigit() and int(value) <= FAST_LANE_MAX_BODY
        elif name == b"content-encoding" or name == b"transfer-encoding":
            return False
    return small


class _FastRequest:
    """One POST /telemetry being read on the fast lane."""

    __slots__ = ("answered", "chunks", "head", "http_version", "keep_alive", "size")

    def __init__(self, http_version: str, keep_alive: bool) -> None:
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.head: IngestHead | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.answered = False  # an answer is out: ignore the rest of the body


class FastLaneProtocol(GuardedHttpToolsProtocol):
    """GuardedHttpToolsProtocol plus the fast lane for POST /telemetry (`handler` None: off)."""

    handler: ClassVar[IngestHandler | None] = None
    _fast: _FastRequest | None = None
    _idle = True  # the HTTP parser is between requests: it holds no part of one
    # The status line and default headers (date, server) of a 202, rebuilt when uvicorn renews
    # its default header list (once a second): keyed by that list's identity, which it holds.
    _prefix_for: ClassVar[list[tuple[bytes, bytes]] | None] = None
    _prefix: ClassVar[bytes] = b""

    # A request that arrives whole and plain (speedups.parse_plain_post: the common single record or
    # small array, in one read) is answered from the compiled parse, without httptools' callbacks
    # and their bookkeeping; anything else, and everything while the parser holds part of a
    # request or an earlier answer is still to come, is fed to httptools as before.
    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if (handler is not None and self._idle and not self._broken and handler.service.can_decide_now
                and not self.busy() and not self.parser.should_upgrade()):
            limit = self.max_header_bytes
            while (plain := parse_plain_post(data, _PATH, limit, FAST_LANE_MAX_BODY)) is not None:
                used, headers, body, keep_alive = plain
                self._answer_plain(handler, headers, body, keep_alive)
                if used == len(data) or self._broken:
                    return  # all taken, or an answer that closes: the rest is not read
                data = data[used:]
        super().data_received(data)

    def _answer_plain(self, handler: IngestHandler, headers: Headers, body: bytes, keep_alive: bool) -> None:
        """What on_headers_complete and on_message_complete do for a fast-lane request, in one go."""
        fast = _FastRequest("1.1", keep_alive)
        try:
            head = handler.check_head(headers)
        except IngestError as exc:
            answer = handler.refusal(exc)
        else:
            client = self.client
            answer = handler.answer_now(head, body, client[0] if client else None)
        self._answer(fast, answer)
        self.server_state.total_requests += 1
        if not self._broken:  # the next request may take the keep-alive time (from now) to come
            self._deadline = self.loop.time() + self.timeout_keep_alive

    def message_done(self) -> None:
        self._idle = True
        super().message_done()

    # uvicorn's on_message_begin builds the request's ASGI scope, for every request; the fast lane
    # needs none, so with the lane on the scope is built only when a request goes to ASGI
    # (`_to_asgi`), and on_header appends without the extra layer: 1.2 against 4.2 µs a request
    # for the head callbacks of a 4-header POST (this machine, timeit).
    def on_message_begin(self) -> None:
        self._idle = False
        if self.handler is None:
            super().on_message_begin()
            return
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]  # built by _to_asgi when needed
        self.head_started()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.scope is not None:  # lane off (or a scope already built): uvicorn's own
            super().on_header(name, value)
            return
        self._saw_header = True
        name = name.lower()  # what uvicorn's on_header does, without the two calls around it
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _to_asgi(self) -> None:
        """Hand the request whose head is complete to uvicorn's handling (and so to ASGI)."""
        if self.scope is None:
            # uvicorn's on_message_begin makes the scope (and a fresh url, header list and expect
            # flag): keep what this head set, in the list the scope refers to.
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.expect_100_continue = url, expect
            self.headers.extend(headers)
        super().on_headers_complete()

    def on_headers_complete(self) -> None:
        handler = self.handler
        parser = self.parser
        if self._broken or self.transport.is_closing():
            return  # the rest of a read after an answer that closes: nothing more is taken
        if (handler is None or self.url != _PATH or parser.get_method() != b"POST" or self.busy()
                or not handler.service.can_decide_now or parser.should_upgrade()
                or not _small_plain_body(self.headers)):
            self._to_asgi()
            return
        self.body_started()
        version = parser.get_http_version()
        fast = self._fast = _FastRequest(version, version != "1.0" and parser.should_keep_alive())
        try:
            fast.head = handler.check_head(self.headers)
        except IngestError as exc:
            if self.expect_100_continue:
                fast.keep_alive = False  # the client may wait for a 100 that never comes: don't read on
            self._answer(fast, handler.refusal(exc))
            return
        if self.expect_100_continue:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        fast = self._fast
        if fast is None:
            super().on_body(body)
            return
        if fast.answered:
            return
        fast.size += len(body)
        handler = self.handler
        assert handler is not None
        if fast.size > handler.max_body_bytes:
            self._answer(fast, handler.refusal(body_too_large(handler.max_body_bytes)))
            return
        fast.chunks.append(body)

    def on_message_complete(self) -> None:
        fast = self._fast
        if fast is None:
            super().on_message_complete()
            return
        self._fast = None
        self.message_done()
        if not fast.answered:
            handler = self.handler
            assert handler is not None and fast.head is not None
            chunks = fast.chunks
            wire = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            client = self.client
            self._answer(fast, handler.answer_now(fast.head, wire, client[0] if client else None))
        self.server_state.total_requests += 1
        if not self.transport.is_closing():
            self.keep_alive_started()

    def _answer(self, fast: _FastRequest, answer: Answer) -> None:
        fast.answered = True
        status, headers, body = answer
        handler = self.handler
        assert handler is not None
        handler.service.stats.fast_lane_requests += 1
        transport = self.transport
        if transport.is_closing():
            return
        close = not fast.keep_alive or status in CLOSE_AFTER
        if status == 202 and not close and headers is JSON_HEADERS:  # the plain 202: prebuilt head
            transport.write(b"%s%d\r\n\r\n%s" % (self._prefix_202(), len(body), body))
        else:
            out = [STATUS_LINE[status]]
            for name, value in [*self.server_state.default_headers, *headers]:
                out += (name, b": ", value, b"\r\n")
            if close and status not in CLOSE_AFTER:  # those carry `connection: close` already
                out.append(b"connection: close\r\n")
            out.append(b"content-length: %d\r\n\r\n" % len(body))
            out.append(body)
            transport.write(b"".join(out))
        if self.access_log:
            client = self.client  # as uvicorn's get_client_addr words it (no scope on this lane)
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', f"{client[0]}:{client[1]}" if client else "", "POST",
                                    "/telemetry", fast.http_version, status)
        if close:
            self.linger_close()
        elif self.flow.write_paused:
            self.flow.pause_reading()  # the client does not read its answers: stop taking requests
        elif status == 503 and not self.flow.read_paused:
            self.flow.pause_reading()
            self.loop.call_later(REFUSED_PAUSE_S, self._resume_after_refusal)

    def _prefix_202(self) -> bytes:
        defaults = self.server_state.default_headers
        cls = FastLaneProtocol
        if cls._prefix_for is not defaults:
            lines = [STATUS_LINE[202], *(b"%s: %s\r\n" % pair for pair in defaults)]
            cls._prefix = b"".join(lines) + b"content-type: application/json\r\ncontent-length: "
            cls._prefix_for = defaults
        return cls._prefix

    def _resume_after_refusal(self) -> None:
        if not self.transport.is_closing() and not self.flow.write_paused and not self.busy() and not self._broken:
            self.flow.resume_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.busy() and not self._broken:
            self.flow.resume_reading()

    def body_is_late(self) -> bool:
        fast = self._fast
        if fast is not None:
            return not fast.answered
        return super().body_is_late()

    def fail(self, answer: bytes) -> None:
        if self._fast is not None:
            self._fast.answered = True
        super().fail(answer)

    def shutdown(self) -> None:
        if self._fast is not None:  # answer the request being read, then close
            self._fast.keep_alive = False
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fast = None
        super().connection_lost(exc)


def configure_fast_lane(handler: IngestHandler | None) -> type[FastLaneProtocol]:
    """Turn the fast lane on (with the app's ingest handler) or off (None) in this process."""
    FastLaneProtocol.handler = handler
    return FastLaneProtocol
