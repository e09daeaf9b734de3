"""A loopback HTTP/1.1 proxy for tests: records every request's headers and body and every answer's status,
and can lose an answer after the server got the request, or cut a connection mid-request (the faults a
client meets on a real network, produced here because a real network cannot be told when to fail)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Exchange:
    """One request through the proxy and what came of it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    sent_at: float
    status: int | None = None  # None: no answer reached the client (fault, or the server was down)
    server_status: int | None = None  # the server's answer, also when the proxy then lost it
    answered_at: float | None = None
    answer_headers: dict[str, str] = field(default_factory=dict)
    fault: str = ""


# A fault for the n-th request (0-based): "" pass through, "drop_response" forward it and lose the answer,
# "cut_request" close the client's connection after half the body, never forwarding it.
FaultPlan = Callable[[int, Exchange], str]


@dataclass
class RecordingProxy:
    upstream_port: int
    faults: FaultPlan = field(default=lambda n, ex: "")
    exchanges: list[Exchange] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("proxy did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[Exchange]:
        with self._lock:
            return list(self.exchanges)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # Connections still open: end their handlers here, so each closes its sockets while the loop
        # runs (left pending, they would be destroyed with the loop, their writers unclosed).
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                first, headers = _parse_head(head)
                method, path, _ = first.split(" ", 2)
                length = int(headers.get("content-length", "0"))
                ex = Exchange(method, path, headers, b"", time.monotonic())
                with self._lock:
                    n = len(self.exchanges)
                    self.exchanges.append(ex)
                ex.fault = self.faults(n, ex)
                if ex.fault == "cut_request":
                    await reader.readexactly(length // 2)
                    return
                ex.body = await reader.readexactly(length)
                try:
                    if upstream is None:
                        upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                    upstream[1].write(head + ex.body)
                    await upstream[1].drain()
                    status, answer_headers, answer = await _read_response(upstream[0])
                    ex.server_status = status
                except (OSError, asyncio.IncompleteReadError):
                    return  # the server is down or went away: the client sees its connection close
                if ex.fault == "drop_response":
                    return
                ex.status, ex.answered_at, ex.answer_headers = status, time.monotonic(), answer_headers
                writer.write(answer)
                await writer.drain()
                if answer_headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            # Both closed before either is awaited: a handler cancelled (at proxy.close) while it
            # waits for the first would otherwise leave the second's socket to the garbage collector.
            writers = [w for w in (writer, upstream[1] if upstream else None) if w is not None]
            for w in writers:
                w.close()
            for w in writers:
                with contextlib.suppress(OSError):
                    await w.wait_closed()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    first, headers = _parse_head(head)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(first.split(" ", 2)[1]), headers, head + body


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (names in lower case) of a request or response head."""
    lines = head.decode("latin-1").split("\r\n")
    return lines[0], {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
