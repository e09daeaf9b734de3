"""The HTTP contract on raw connections, on both lanes (the protocol's fast lane and ASGI only):
keep-alive, `Connection: close`, HTTP/1.0, pipelining in order, `Expect: 100-continue`, flow
control, the access log, and that the fast lane really answers POST /telemetry when it is on."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

import httpx
import orjson
import pytest
from conftest import ServerProcess, shared_server, wait_for

StartServer = Callable[..., ServerProcess]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lane: str) -> Iterator[ServerProcess]:
    with shared_server(tmp_path_factory, "lane-sink", None, lane) as (srv, _, _):
        yield srv


def post_bytes(body: bytes, *, version: str = "1.1", extra: str = "", content_type: str = "application/json") -> bytes:
    head = (f"POST /telemetry HTTP/{version}\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def record(node: str) -> bytes:
    return orjson.dumps({"node_id": node, "ts": 1})


def read_response(f: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One response off a buffered socket file: status, headers (lower-case names), body."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_pipelined_requests_are_answered_in_order_on_one_connection(server: ServerProcess, lane: str) -> None:
    before = metric(server, "telemetry_sink_fast_lane_requests_total")
    nodes = [uuid.uuid4().hex for _ in range(3)]
    batch = (post_bytes(record(nodes[0])) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post_bytes(record(nodes[1]))
             + post_bytes(b"{broken") + post_bytes(b"[" + record(nodes[2]) + b"," + record(nodes[2]) + b"]"))
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(batch)
        answers = [read_response(f) for _ in range(5)]
    assert [a[0] for a in answers] == [202, 200, 202, 400, 202]
    assert answers[1][2].startswith(b'{"status":"ok"')
    assert answers[4][2] == b'{"accepted":2}'
    assert all(a[1]["content-type"] == "application/json" for a in answers)
    # The first POST is answered by the fast lane (when on); those pipelined behind the GET, which
    # is ASGI's, queue behind it on ASGI so that the answers keep their order.
    counted = metric(server, "telemetry_sink_fast_lane_requests_total") - before
    assert counted == (1 if lane == "fast" else 0)


def test_plain_requests_in_one_read_are_all_answered_on_the_lane(server: ServerProcess, lane: str) -> None:
    """Plain POSTs pipelined in one write, each whole (what the compiled parse takes), are each
    answered, in order, and counted on the fast lane when it is on."""
    before = metric(server, "telemetry_sink_fast_lane_requests_total")
    pair = b"[" + record("a") + b"," + record("b") + b"]"
    batch = post_bytes(record("one")) + post_bytes(b"{broken") + post_bytes(pair)
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(batch)
        answers = [read_response(f) for _ in range(3)]
    assert [(a[0], a[2][:16]) for a in answers] == [(202, b'{"accepted":1}'), (400, b'{"error":"invali'),
                                                  (202, b'{"accepted":2}')]
    assert metric(server, "telemetry_sink_fast_lane_requests_total") - before == (3 if lane == "fast" else 0)


def test_a_body_that_looks_like_a_request_is_read_as_the_body(server: ServerProcess) -> None:
    """A request whose head comes in one read (behind a whole one) and whose body, in the next, is itself
    a plain POST: the parser holds the first part, so the body is that request's body (400: not JSON),
    never a request of its own (which would store a record nobody sent as one)."""
    smuggled = post_bytes(record("smuggled"))
    outer = post_bytes(smuggled)
    split = len(outer) - len(smuggled)
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(post_bytes(record("first")) + outer[:split])
        assert read_response(f)[0] == 202
        sock.sendall(outer[split:])
        status, _, body = read_response(f)
        assert status == 400 and b"invalid_json" in body
        sock.sendall(post_bytes(record("after")))  # and the connection goes on as before
        assert read_response(f)[0] == 202


def test_a_request_cut_anywhere_across_reads_is_answered(server: ServerProcess) -> None:
    """The same plain request, cut at every position into two writes: each is answered once, 202."""
    wire = post_bytes(record("cut"))
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cut in range(1, len(wire), 7):
            sock.sendall(wire[:cut])
            time.sleep(0.002)  # most often two reads on the server
            sock.sendall(wire[cut:])
            status, _, body = read_response(f)
            assert (status, body) == (202, b'{"accepted":1}'), cut


def test_keep_alive_then_connection_close_closes_after_the_answer(server: ServerProcess) -> None:
    with connect(server) as sock, sock.makefile("rb") as f:
        for _ in range(3):
            sock.sendall(post_bytes(record("keep")))
            status, headers, _ = read_response(f)
            assert status == 202 and "connection" not in headers
        sock.sendall(post_bytes(record("keep"), extra="Connection: close\r\n"))
        status, headers, body = read_response(f)
        assert (status, headers["connection"], body) == (202, "close", b'{"accepted":1}')
        assert f.read() == b""  # the server closed it


def test_http_1_0_gets_an_answer_and_the_connection_closes(server: ServerProcess) -> None:
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(post_bytes(record("old"), version="1.0"))
        status, headers, body = read_response(f)
        assert (status, headers["connection"], body) == (202, "close", b'{"accepted":1}')
        assert f.read() == b""


def test_expect_100_continue_then_the_body(server: ServerProcess) -> None:
    body = record("continue")
    with connect(server) as sock, sock.makefile("rb") as f:
        head = post_bytes(body, extra="Expect: 100-continue\r\n")[: -len(body)]
        sock.sendall(head)
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(body)
        assert read_response(f)[0] == 202


def test_a_request_handed_to_asgi_keeps_its_head(server: ServerProcess) -> None:
    """A gzip body goes to ASGI even with the lane on, after the lane read its head: the ASGI side still
    sees every header (Content-Encoding: the body decodes) and the Expect (its 100 Continue comes)."""
    import gzip

    body = gzip.compress(record("handed-over"))
    with connect(server) as sock, sock.makefile("rb") as f:
        head = post_bytes(body, extra="Content-Encoding: gzip\r\nExpect: 100-continue\r\n")[: -len(body)]
        sock.sendall(head)
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(body)
        status, _, answer = read_response(f)
        assert status == 202, answer


def test_expect_100_continue_refused_before_the_body_closes(server: ServerProcess) -> None:
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.sendall(post_bytes(b"x" * 10, content_type="text/plain", extra="Expect: 100-continue\r\n")[:-10])
        status, _, body = read_response(f)
        assert status == 415 and b"unsupported_media_type" in body


def test_a_client_that_does_not_read_its_answers_is_paused_not_buffered(server: ServerProcess) -> None:
    """Thousands of pipelined requests, answers unread: the server stops reading once its writes
    back up (flow control); every request sent is answered once the client reads, and other
    clients are served meanwhile."""
    n = 20_000
    one = post_bytes(record("flood"))
    with connect(server) as sock, sock.makefile("rb") as f:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(0.5)
        sent = 0
        try:
            while sent < n:
                sock.sendall(one * 100)
                sent += 100
        except TimeoutError:
            pass  # the server stopped reading: its socket buffers are full
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        sock.settimeout(30)
        statuses = {read_response(f)[0] for _ in range(sent)}
    assert statuses == {202}


def test_access_log_names_each_request_on_both_lanes(start_server: StartServer) -> None:
    srv = start_server(args=("--access-log",))
    assert srv.post(record("logged")).status_code == 202
    wait_for(lambda: '"POST /telemetry HTTP/1.1" 202' in srv.log(), what="the access log line")
