"""The slow-client guard: uvicorn's httptools protocol plus a connection limit and deadlines for
the request head and body, checked by one sweep per server.

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

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger("telemetry_sink.http")

SWEEP_INTERVAL_S = 0.25
TIMEOUT_BODY = b'{"error":"request_timeout","detail":"the request body did not arrive in time"}'
TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)


def _ignore() -> None:
    pass


# The loop each uvicorn server's deadline sweep runs on, keyed by the server's ServerState (gone
# with it): a new server, or the same one on a new loop, always starts its own sweep, so no
# connection's deadline goes unchecked.
_sweeps: weakref.WeakKeyDictionary[ServerState, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow or piled-up clients: a
    connection limit (excess connections are closed at once), a deadline for the request head
    (a silent or header-trickling client is cut off) and one for the body (408, then close).

    Deadlines are plain timestamps checked by one sweep per server every 0.25 s, not timers
    per request: with per-request timers the single-record rate was 17 % lower
    (docs/BENCHMARKS.md).
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1024
    on_timeout: Callable[[], None] = staticmethod(_ignore)  # counts a 408 the guard answered
    _deadline: float | None = None  # loop.time() by which the current request phase must end
    _in_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("connection limit (%d) reached: closing a new connection", self.max_connections)
            transport.close()
            return
        self._deadline = self.loop.time() + self.header_timeout_s
        state = self.server_state
        if _sweeps.get(state) is not self.loop:
            _sweeps[state] = self.loop
            self.loop.call_later(SWEEP_INTERVAL_S, _sweep, self.loop, state)

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
            self.transport.write(TIMEOUT_408)
            self.on_timeout()
            cycle.disconnected = True  # the app stops waiting for the body; its answer is dropped
            cycle.message_event.set()
        self.transport.close()


def _sweep(loop: asyncio.AbstractEventLoop, state: ServerState) -> None:
    now = loop.time()
    conn: Any
    for conn in list(state.connections):
        deadline = getattr(conn, "_deadline", None)
        if deadline is not None and now > deadline:
            conn.deadline_passed()
    if _sweeps.get(state) is loop:
        loop.call_later(SWEEP_INTERVAL_S, _sweep, loop, state)


def configure_guard(header_timeout_s: float, body_timeout_s: float, max_connections: int,
                    on_timeout: Callable[[], None] = _ignore) -> type[GuardedHttpToolsProtocol]:
    """Set the limits GuardedHttpToolsProtocol enforces in this process; return the class.
    `on_timeout` is called for every 408 the guard answers (the app never sees those)."""
    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.body_timeout_s = body_timeout_s
    GuardedHttpToolsProtocol.max_connections = max_connections
    GuardedHttpToolsProtocol.on_timeout = staticmethod(on_timeout)
    return GuardedHttpToolsProtocol
