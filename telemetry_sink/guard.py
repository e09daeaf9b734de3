"""The slow-client guard: uvicorn's httptools protocol plus a connection limit, a size limit on
the request head, a deadline for every phase of a connection (head, body, keep-alive) checked
by one sweep per server, and error answers that keep request order on pipelined connections.

uvicorn builds the protocol class itself, with fixed arguments, in every worker process, so the
limits are class attributes set by `configure_guard` in the process that serves. The sweep's
state lives on uvicorn's `ServerState`, which every connection of one server shares.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

import httptools
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

log = logging.getLogger("telemetry_sink.http")

SWEEP_INTERVAL_S = 0.25
LINGER_S = 2.0  # after an answer that closes: how long the rest of the request is read and dropped


def error_bytes(status: str, error: str, detail: str) -> bytes:
    """A complete JSON error response that closes the connection (the guard's own answers)."""
    body = b'{"error":"%s","detail":"%s"}' % (error.encode(), detail.encode())
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body))


TIMEOUT_408 = error_bytes("408 Request Timeout", "request_timeout", "the request body did not arrive in time")
URL_414 = error_bytes("414 URI Too Long", "uri_too_long", "the request URL exceeds [server] max_header_bytes")
HEAD_431 = error_bytes("431 Request Header Fields Too Large", "header_too_large",
                       "the request head exceeds [server] max_header_bytes")
INVALID_400 = error_bytes("400 Bad Request", "invalid_request", "invalid HTTP request")


def _ignore() -> None:
    pass


# The loop each uvicorn server's deadline sweep runs on, keyed by the server's ServerState (gone
# with it): a new server, or the same one on a new loop, always starts its own sweep, so no
# connection's deadline goes unchecked.
_sweeps: weakref.WeakKeyDictionary[ServerState, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()
# TLS connections accepted whose handshake has not finished, per server: id(protocol) -> accept
# time. uvloop creates the protocol at accept but tells it nothing until the handshake is done
# (nor when it fails), so entries also expire after the handshake deadline.
_handshakes: weakref.WeakKeyDictionary[ServerState, dict[int, float]] = weakref.WeakKeyDictionary()


class GuardedLoop(uvloop.Loop):
    """uvloop, with TLS handshakes cut off at the head deadline (`header_timeout_s`): uvicorn
    cannot pass `ssl_handshake_timeout`, whose default (60 s) let silent clients hold
    connections. serve.py names this class as uvicorn's loop factory."""

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.AbstractServer:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs["ssl_handshake_timeout"] = GuardedHttpToolsProtocol.header_timeout_s
        return await super().create_server(*args, **kwargs)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow, piled-up or hostile clients:
    a connection limit (excess connections are closed at once), a deadline in every phase (the
    head, the body: 408 then close, and keep-alive: so a stray CRLF cannot hold a connection), a
    limit on the head's size counted as bytes arrive (414/431, close), and error answers that
    wait for the answers to the requests before them. TLS connections count against the limit
    from the moment they are accepted, and their handshake has the head deadline (GuardedLoop).

    Deadlines are plain timestamps checked by one sweep per server every 0.25 s, not timers
    per request: with per-request timers the single-record rate was 17 % lower
    (docs/BENCHMARKS.md).
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    max_header_bytes: int = 32768
    on_timeout: Callable[[], None] = staticmethod(_ignore)  # counts a 408 the guard answered
    _deadline: float | None = None  # loop.time() by which the current phase must end (None: the app's turn)
    _in_body = False
    _in_head = True  # parsing a head (or waiting for one): bytes fed count against max_header_bytes
    _head_bytes = 0
    _saw_header = False
    _running: RequestResponseCycle | None = None  # the cycle whose ASGI task runs
    _pending_error: bytes | None = None  # to write, then close, once the earlier answers are out
    _broken = False  # the parser failed: nothing more is read

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if config.is_ssl:  # accepted, handshake to come: it counts against max_connections already
            pending = _handshakes.setdefault(server_state, {})
            pending[id(self)] = self.loop.time()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        pending = _handshakes.get(self.server_state)
        handshaking = 0
        if pending is not None:
            pending.pop(id(self), None)
            handshaking = len(pending)
        super().connection_made(transport)
        if len(self.connections) + handshaking > self.max_connections:
            transport.close()
            _count_refusal(self.server_state, self.loop.time(), self.max_connections)
            return
        self._deadline = self.loop.time() + self.header_timeout_s
        state = self.server_state
        if _sweeps.get(state) is not self.loop:
            _sweeps[state] = self.loop
            self.loop.call_later(SWEEP_INTERVAL_S, _sweep, self.loop, state)

    # -- bytes in --

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.fail(INVALID_400)
            return
        # Checked after each feed, so the parser never holds more than the limit plus one read
        # of a head (linear cost, bounded memory), however the client slices it.
        if self._in_head and self._head_bytes > self.max_header_bytes and not self._broken:
            self.fail(HEAD_431 if self._saw_header else URL_414)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_started()

    def head_started(self) -> None:
        """A request begins: the head's deadline starts."""
        self._saw_header = False
        self._deadline = self.loop.time() + self.header_timeout_s

    def on_header(self, name: bytes, value: bytes) -> None:
        self._saw_header = True
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.body_started()
        super().on_headers_complete()

    def body_started(self) -> None:
        """The head is complete: the body's deadline starts."""
        self._deadline = self.loop.time() + self.body_timeout_s
        self._in_body = True
        self._in_head = False

    def on_message_complete(self) -> None:
        self.message_done()
        super().on_message_complete()

    def message_done(self) -> None:
        """The body is complete: the app's turn (no deadline) until its answer is out."""
        self._deadline = None
        self._in_body = False
        self._in_head = True
        self._head_bytes = 0

    # -- answers out --

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        """An answer is out: start the next pipelined request, or write the error that waited
        for it, or wait for the next request under the keep-alive deadline (no timer)."""
        self.server_state.total_requests += 1
        self._running = None
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._pending_error is not None:
            self.close_with(self._pending_error)
        else:
            self.keep_alive_started()

    def keep_alive_started(self) -> None:
        if self._in_head and self._deadline is None:
            self._deadline = self.loop.time() + self.timeout_keep_alive

    def busy(self) -> bool:
        """Whether an earlier request's answer is still to come (ASGI task running or queued)."""
        running = self._running
        return bool(self.pipeline) or (running is not None and not running.response_complete)

    def fail(self, answer: bytes) -> None:
        """Answer the request being read with `answer` and close, but only after every earlier
        request has had its answer (a stored request always gets its 202 first)."""
        self._broken = True
        self._deadline = None
        current = self.cycle if self._in_body else None
        if current is not None:
            current.disconnected = True  # its app stops waiting for the body; its answer is dropped
            current.message_event.set()
            if self.pipeline and self.pipeline[0][0] is current:
                self.pipeline.popleft()
        if current is not self._running and self.busy():
            self._pending_error = answer
            self.flow.pause_reading()
            return
        if not self.transport.is_closing():
            self.close_with(answer)

    def close_with(self, answer: bytes) -> None:
        """Write `answer` and close (lingering, so that it arrives); no answer: close at once."""
        if answer:
            self.transport.write(answer)
            self.linger_close()
        else:
            self._broken = True
            self.transport.close()

    def linger_close(self) -> None:
        """Close after an answer while the client may still be sending: half-close and drop what
        arrives for up to LINGER_S, so that the answer is not lost to a reset (closing with unread
        input makes the kernel send RST, and the client may discard the answer)."""
        self._broken = True
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.can_write_eof():  # TLS
            transport.close()
            return
        transport.write_eof()
        self._deadline = self.loop.time() + LINGER_S
        self.flow.resume_reading()

    def send_400_response(self, msg: str) -> None:
        self.fail(INVALID_400)

    def deadline_passed(self) -> None:
        """Cut the connection off: with a 408 if the body is late and no answer has started."""
        self._deadline = None
        if self.transport.is_closing() or self._broken:  # a lingering close ends here
            self.transport.close()
            return
        if self.body_is_late():
            self.on_timeout()
            self.fail(TIMEOUT_408)
        else:
            self.fail(b"")  # a late head, or an idle keep-alive: just close (after earlier answers)

    def body_is_late(self) -> bool:
        cycle = self.cycle
        return self._in_body and cycle is not None and not cycle.response_started


# Refused connections of each server: [count not yet logged, loop time of the last summary line].
# A flood of refusals is one warning line per interval, not one per connection.
REFUSAL_LOG_INTERVAL_S = 10.0
_refusals: weakref.WeakKeyDictionary[ServerState, list[float]] = weakref.WeakKeyDictionary()


def _count_refusal(state: ServerState, now: float, limit: int) -> None:
    counts = _refusals.setdefault(state, [0, -REFUSAL_LOG_INTERVAL_S])
    counts[0] += 1
    _log_refusals(state, now, limit)


def _log_refusals(state: ServerState, now: float, limit: int) -> None:
    counts = _refusals.get(state)
    if counts is None or not counts[0] or now - counts[1] < REFUSAL_LOG_INTERVAL_S:
        return
    log.warning("connection limit (%d) reached: closed %d new connection(s) since the last such line",
                limit, int(counts[0]), extra={"event": "connections_refused", "connections": int(counts[0])})
    counts[0], counts[1] = 0, now


def _sweep(loop: asyncio.AbstractEventLoop, state: ServerState) -> None:
    now = loop.time()
    _log_refusals(state, now, GuardedHttpToolsProtocol.max_connections)
    pending = _handshakes.get(state)
    if pending:  # handshakes past their deadline were aborted by the loop (GuardedLoop)
        expired = now - GuardedHttpToolsProtocol.header_timeout_s
        for key in [k for k, accepted in pending.items() if accepted < expired]:
            del pending[key]
    conn: Any
    for conn in list(state.connections):
        deadline = getattr(conn, "_deadline", None)
        if deadline is not None and now > deadline:
            conn.deadline_passed()
    if _sweeps.get(state) is loop:
        loop.call_later(SWEEP_INTERVAL_S, _sweep, loop, state)


def configure_guard(header_timeout_s: float, body_timeout_s: float, max_connections: int,
                    on_timeout: Callable[[], None] = _ignore,
                    max_header_bytes: int = 32768) -> type[GuardedHttpToolsProtocol]:
    """Set the limits GuardedHttpToolsProtocol enforces in this process; return the class.
    `on_timeout` is called for every 408 the guard answers (the app never sees those)."""
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.body_timeout_s = body_timeout_s
    GuardedHttpToolsProtocol.max_connections = max_connections
    GuardedHttpToolsProtocol.max_header_bytes = max_header_bytes
    GuardedHttpToolsProtocol.on_timeout = staticmethod(on_timeout)
    return GuardedHttpToolsProtocol
