"""telemetry_sink.testing itself: the "listening on" parser, kernel-reported connections, the stalled POST,
a reference server found by its reported port, skip-or-fail in CI."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import orjson
import pytest

from telemetry_sink.testing import (
    ServerProcess,
    StalledPost,
    listening_address,
    server_connections,
    skip_or_fail_in_ci,
    speedups_module,
    wait_for,
)


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        pytest.param("2026-12-01 INFO telemetry_sink.serve: telemetry-sink listening on http://127.0.0.1:8080\n",
                     ("http", "127.0.0.1", 8080), id="text"),
        pytest.param("x\ntelemetry-sink listening on https://[::1]:443\n", ("https", "::1", 443), id="text-ipv6-tls"),
        pytest.param(orjson.dumps({"msg": "telemetry-sink listening on https://0.0.0.0:9", "event": "listening",
                                   "host": "0.0.0.0", "port": 9}).decode() + "\n",
                     ("https", "0.0.0.0", 9), id="json"),
        pytest.param("raw-asgi listening on http://127.0.0.1:5\n", ("http", "127.0.0.1", 5), id="reference"),
        pytest.param("INFO uvicorn: Uvicorn running on http://127.0.0.1:8000\n", None, id="not-ours"),
        pytest.param('{"event": "startup", "msg": "starting"}\n{not json\n', None, id="none-yet"),
    ],
)
def test_listening_address(log: str, expected: tuple[str, str, int] | None) -> None:
    assert listening_address(log) == expected


def test_stalled_post_waits_until_the_server_has_accepted_and_read_it() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        post = StalledPost(port, b'{"node_id":', b'"n"}')
        wait_for(lambda: server_connections(port) == (0, 1), what="the connection queued, not accepted")
        assert not post._read_by_server()
        conn, _ = listener.accept()
        with conn:
            assert server_connections(port) == (1, 0)
            assert not post._read_by_server()  # accepted, but its bytes not read yet
            received = b""
            while not received.endswith(b'{"node_id":'):
                received += conn.recv(65536)
            post.wait_read(timeout=5)
            conn.sendall(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            assert post.finish() == (202, b"ok")
            assert conn.recv(65536) == b'"n"}'  # the rest of the body was sent before the answer was read


def test_a_reference_server_is_found_by_the_port_it_reports(tmp_path: Path) -> None:
    app = ("async def app(scope, receive, send):\n"
           "    await send({'type': 'http.response.start', 'status': 204, 'headers': []})\n"
           "    await send({'type': 'http.response.body', 'body': b''})\n")
    script = app + ("from telemetry_sink.testing import serve_reporting_port\n"
                    "serve_reporting_port(app, 'tiny', lifespan='off', log_level='warning')\n")
    server = ServerProcess([sys.executable, "-c", script], tmp_path / "tiny.log", name="tiny")
    try:
        server.wait_ready(status=204)
        scheme, host, port = server.address()
        assert (scheme, host) == ("http", "127.0.0.1") and port > 0
        assert f"tiny listening on http://127.0.0.1:{port}" in server.log()
    finally:
        server.close()


def test_a_server_that_exits_before_listening_fails_with_its_output(tmp_path: Path) -> None:
    server = ServerProcess([sys.executable, "-c", "print('no key'); raise SystemExit(2)"], tmp_path / "x.log")
    with pytest.raises(AssertionError, match="exited with 2 before listening:\nno key"):
        server.address(timeout=10)
    server.close()


def test_skip_or_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no tmpfs"):
        skip_or_fail_in_ci("no tmpfs")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this may not skip: no tmpfs"):
        skip_or_fail_in_ci("no tmpfs")


def test_speedups_module_names() -> None:
    assert speedups_module("pure-python").IMPLEMENTATION == "pure-python"
    with pytest.raises(ValueError, match="unknown speedups implementation"):
        speedups_module("fast")
