"""Slow and piled-up clients against a real server: slowloris heads and bodies are cut off by
[server] header_timeout_s / body_timeout_s, idle connections beyond max_connections are closed
at once, and many trickling clients cannot pin the server's memory."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer, wait_for

from telemetry_sink.testing import server_connections

HEADER_TIMEOUT = 1
BODY_TIMEOUT = 1
SLACK = 1.5  # scheduling slack on a loaded 2-core CI machine
TRICKLE_S = 0.3
REQUEST_HEAD = (
    b"POST /telemetry HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
)


def slow_server(start_server: StartServer, **server: int) -> ServerProcess:
    return start_server({
        "server": {"header_timeout_s": HEADER_TIMEOUT, "body_timeout_s": BODY_TIMEOUT, "max_connections": 20,
                   "keep_alive_s": 1, **server},
        "rate_limit": {"bytes_per_second": 0},
    })


@pytest.fixture
def sockets() -> Iterator[Callable[[ServerProcess], socket.socket]]:
    """Open raw client sockets to a server; every one is closed at teardown."""
    with contextlib.ExitStack() as stack:

        def connect(server: ServerProcess) -> socket.socket:
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            return sock

        yield connect


def is_closed(sock: socket.socket, wait: float, peek: bool = False) -> bool:
    """Whether the peer closed `sock` (EOF or reset) within `wait` seconds; data read is dropped.
    With `peek`, any data from the server counts as well and is left unread."""
    deadline = time.monotonic() + wait
    while True:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([sock], [], [], max(0.0, remaining))
        if not readable:
            return False
        try:
            if not sock.recv(65536, socket.MSG_PEEK if peek else 0) or peek:
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        if remaining <= 0:
            return False


def read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def read_one_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole response (head and Content-Length body), leaving the connection open."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    assert len(body) == length
    return head + b"\r\n\r\n" + body


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> float | None:
    """Send `data` a byte every `interval` seconds; return when the server cut us off or answered
    (seconds since the call; an answer is left unread), or None if neither within `limit` seconds."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > limit:
            return None
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        if is_closed(sock, interval, peek=True):
            return time.monotonic() - start
    return None


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- slow request heads --


def test_header_trickle_is_cut_off_at_the_head_deadline(start_server: StartServer, sockets: Callable[
        [ServerProcess], socket.socket]) -> None:
    server = slow_server(start_server)
    sock = sockets(server)
    cut_after = trickle(sock, REQUEST_HEAD, TRICKLE_S, limit=HEADER_TIMEOUT + 5)
    assert cut_after is not None, "the header trickler was never disconnected"
    # Trickling does not extend the deadline: it runs from the connection's start.
    assert HEADER_TIMEOUT - 0.2 <= cut_after <= HEADER_TIMEOUT + SLACK, cut_after
    assert read_response(sock) == b"", "the server answered a request it never fully got"
    assert server.post(b'{"node_id":"after"}').status_code == 202


def test_silent_connection_is_closed(start_server: StartServer,
                                     sockets: Callable[[ServerProcess], socket.socket]) -> None:
    server = slow_server(start_server)
    sock = sockets(server)
    start = time.monotonic()
    assert is_closed(sock, HEADER_TIMEOUT + SLACK + 1), "a silent connection was kept open"
    assert HEADER_TIMEOUT - 0.2 <= time.monotonic() - start <= HEADER_TIMEOUT + SLACK


def test_keep_alive_connection_trickling_its_next_head_is_cut_off(
        start_server: StartServer, sockets: Callable[[ServerProcess], socket.socket]) -> None:
    server = slow_server(start_server, keep_alive_s=30)
    sock = sockets(server)
    body = b'{"node_id":"ka"}'
    sock.sendall(REQUEST_HEAD[:-2] + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    first = read_one_response(sock)
    assert first.startswith(b"HTTP/1.1 202"), first
    # The next request's head starts its own clock, even on an open keep-alive connection.
    cut_after = trickle(sock, REQUEST_HEAD, TRICKLE_S, limit=HEADER_TIMEOUT + 5)
    assert cut_after is not None, "the keep-alive header trickler was never disconnected"
    assert HEADER_TIMEOUT - 0.2 <= cut_after <= HEADER_TIMEOUT + SLACK, cut_after
    assert read_response(sock) == b"", "the server answered a request it never fully got"


def test_idle_keep_alive_connection_is_closed(start_server: StartServer,
                                              sockets: Callable[[ServerProcess], socket.socket]) -> None:
    server = slow_server(start_server, header_timeout_s=30)  # only keep_alive_s = 1 can close it
    sock = sockets(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_one_response(sock).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    assert is_closed(sock, 1 + SLACK + 1)
    assert time.monotonic() - start <= 1 + SLACK


# -- slow bodies --


@pytest.mark.parametrize("style", ["trickled", "stalled"])
def test_slow_body_gets_408_and_stores_nothing(start_server: StartServer, tmp_path: Path,
                                               sockets: Callable[[ServerProcess], socket.socket],
                                               style: str) -> None:
    server = slow_server(start_server)
    sock = sockets(server)
    body = orjson.dumps({"node_id": "slow-body", "pad": "z" * 100})
    sock.sendall(REQUEST_HEAD[:-2] + b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    start = time.monotonic()
    if style == "trickled":
        cut_after = trickle(sock, body[5:], TRICKLE_S, limit=BODY_TIMEOUT + 5)
        assert cut_after is not None, "the body trickler was never answered or disconnected"
    response = read_response(sock)
    elapsed = time.monotonic() - start
    assert BODY_TIMEOUT - 0.2 <= elapsed <= BODY_TIMEOUT + SLACK, elapsed
    assert response.startswith(b"HTTP/1.1 408 "), response
    head, _, payload = response.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert orjson.loads(payload)["error"] == "request_timeout"
    # Nothing of it is stored, and the server is fine.
    assert server.post(b'{"node_id":"probe"}').status_code == 202
    wait_for(lambda: metric(server, "telemetry_sink_records_written_total") >= 1, what="the probe written")
    assert metric(server, "telemetry_sink_records_written_total") == 1
    assert metric(server, "telemetry_sink_records_accepted_total") == 1
    assert metric(server, 'telemetry_sink_requests_total{status="408"}') == 1
    server.stop()
    log = server.log()
    assert "Traceback" not in log


# -- the connection limit --


def test_connection_limit_closes_the_excess_at_once(start_server: StartServer,
                                                    sockets: Callable[[ServerProcess], socket.socket]) -> None:
    header_timeout = 3  # long enough to tell "closed at once" from "timed out"
    server = slow_server(start_server, header_timeout_s=header_timeout, max_connections=20)
    wait_for(lambda: server_connections(server.port) == (0, 0), what="the readiness probe's connection to go")
    idle = [sockets(server) for _ in range(30)]
    start = time.monotonic()
    wait_for(lambda: server_connections(server.port) == (20, 0), what="the server to take all 30 and keep 20")

    def closed_by_server() -> list[socket.socket] | None:
        closed = [s for s in idle if is_closed(s, 0)]
        return closed if len(closed) >= 10 else None

    closed = wait_for(closed_by_server, what="10 connections to see the server close them")
    open_ = [s for s in idle if s not in closed]
    assert len(closed) == 10, f"{len(closed)} of 30 idle connections closed at once (limit 20)"
    # At once, not by the head deadline: the 20 others, with the same deadline, are still open.
    assert len(open_) == 20 and not any(is_closed(s, 0) for s in open_)

    # While 20 idle connections hold every slot, a new one is refused too (closed at once, not timed out) ...
    with pytest.raises(httpx.TransportError) as refused:
        httpx.get(server.url + "/healthz", timeout=header_timeout + 10)
    assert not isinstance(refused.value, httpx.TimeoutException), refused.value
    assert server.proc.poll() is None

    # ... until the head deadline frees them; then the server answers normally.
    deadline = start + header_timeout + SLACK + 1
    for s in open_:
        assert is_closed(s, max(0.0, deadline - time.monotonic())), "an idle connection outlived its deadline"
    assert server.post(b'{"node_id":"after-the-flood"}').status_code == 202
    assert "connection limit (20) reached" in server.log()


def test_a_flood_of_refused_connections_is_one_log_line_per_interval(
        start_server: StartServer, sockets: Callable[[ServerProcess], socket.socket]) -> None:
    server = slow_server(start_server, header_timeout_s=5, max_connections=5)
    held = [sockets(server) for _ in range(5)]
    wait_for(lambda: server_connections(server.port)[0] >= 5, what="the server to hold 5 connections")
    flood = [sockets(server) for _ in range(200)]
    wait_for(lambda: sum(is_closed(s, 0) for s in flood) >= 200, timeout=20, what="all 200 to be refused")
    lines = [line for line in server.log().splitlines() if "connection limit (5) reached" in line]
    assert 1 <= len(lines) <= 2, lines  # not 200: the first at once, the rest summed up per 10 s
    for s in held + flood:
        s.close()


@pytest.mark.slow
def test_many_trickling_clients_do_not_pin_memory(start_server: StartServer) -> None:
    clients = 200
    server = start_server({
        "server": {"header_timeout_s": HEADER_TIMEOUT, "body_timeout_s": BODY_TIMEOUT, "max_connections": 250},
        "ingest": {"max_body_bytes": 65536},
        "rate_limit": {"bytes_per_second": 0},
    })
    assert server.post(b'{"node_id":"warm-up"}').status_code == 202
    baseline = vm_rss_kib(server.proc.pid)
    declared = 60000
    prefix = b'{"node_id":"hog","pad":"' + b"h" * 16000  # 16 KB each sent up front: 3.2 MB in all
    head = REQUEST_HEAD[:-2] + b"Content-Length: %d\r\n\r\n" % declared
    peak = baseline
    with contextlib.ExitStack() as stack:
        socks = []
        for i in range(clients):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=5))
            # Half trickle their heads, half declare a big body and trickle it.
            s.sendall(REQUEST_HEAD[: 20 + i % 7] if i % 2 else head + prefix)
            s.setblocking(False)
            socks.append(s)
        start = time.monotonic()
        live = set(range(clients))
        while live and time.monotonic() - start < HEADER_TIMEOUT + BODY_TIMEOUT + 10:
            for i in list(live):
                try:
                    socks[i].send(b"h")
                    data = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    live.discard(i)
                    continue
                if not data or data.startswith(b"HTTP/1.1 408"):
                    live.discard(i)
            peak = max(peak, vm_rss_kib(server.proc.pid))
            time.sleep(TRICKLE_S)
        elapsed = time.monotonic() - start
    assert not live, f"{len(live)} trickling clients still connected after {elapsed:.1f}s"
    assert elapsed <= max(HEADER_TIMEOUT, BODY_TIMEOUT) + SLACK + 2 * TRICKLE_S, elapsed
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 32, f"RSS grew by {growth_mib:.1f} MiB with {clients} trickling clients"
    assert server.post(b'{"node_id":"after-the-hogs"}').status_code == 202
    assert metric(server, "telemetry_sink_records_accepted_total") == 2
    print(f"RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, cut off in {elapsed:.1f}s")


def test_stray_crlf_after_a_request_does_not_hold_the_connection(
        start_server: StartServer, sockets: Callable[[ServerProcess], socket.socket]) -> None:
    """A bare CRLF after a keep-alive request starts no message: the keep-alive deadline still
    closes the connection, so such clients cannot use up max_connections (here 20) for good."""
    server = slow_server(start_server, header_timeout_s=30)  # only keep_alive_s = 1 can close them
    socks = [sockets(server) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_one_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\r\n")
    for sock in socks:
        assert is_closed(sock, 1 + SLACK + 2), "a connection that sent a stray CRLF was kept open"
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


def test_a_stored_request_gets_its_202_before_the_next_ones_408(
        start_server: StartServer, sockets: Callable[[ServerProcess], socket.socket]) -> None:
    """Durable acks keep the first answer back (longer than body_timeout_s) while the pipelined
    second request's body is late: the 408 waits for the 202."""
    server = start_server({
        "server": {"header_timeout_s": HEADER_TIMEOUT, "body_timeout_s": BODY_TIMEOUT, "keep_alive_s": 1},
        "rate_limit": {"bytes_per_second": 0},
        "ingest": {"ack": "durable"},
        "writer": {"flush_interval_ms": 2500, "batch_size": 1000},
    })
    sock = sockets(server)
    body = b'{"node_id":"first"}'
    sock.sendall(REQUEST_HEAD[:-2] + b"Content-Length: %d\r\n\r\n" % len(body) + body
                 + REQUEST_HEAD[:-2] + b"Content-Length: 100\r\n\r\n{")
    answers = read_response(sock, timeout=15)
    assert answers.startswith(b"HTTP/1.1 202"), answers
    assert b"HTTP/1.1 408" in answers and answers.index(b"HTTP/1.1 408") > 0, answers
