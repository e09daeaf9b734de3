"""`Content-Encoding: gzip` bodies: gunzip_bounded in-process, and end to end (stored exactly, 415 for
unknown encodings, 400 for broken gzip, 413 for a decompression bomb with bounded memory, the rate
limit charged by wire bytes)."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ServerProcess, run_cli, shared_server, wait_for

from telemetry_sink.errors import IngestError
from telemetry_sink.ingest_http import gunzip_bounded
from telemetry_sink.testing import best_of

MIB = 1 << 20
BOMB = gzip.compress(b"\0" * (50 * MIB), compresslevel=9)  # ~50 KB on the wire


def uid(prefix: str = "gz") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def error_of(data: bytes, limit: int) -> IngestError:
    with pytest.raises(IngestError) as info:
        gunzip_bounded(data, limit)
    return info.value


# -- gunzip_bounded --


def test_gunzip_round_trip() -> None:
    payload = b'{"node_id":"n","ts":1}' * 100
    assert gunzip_bounded(gzip.compress(payload), 1 << 16) == payload
    assert gunzip_bounded(gzip.compress(b""), 10) == b""


def test_gunzip_exactly_at_the_limit_passes_one_byte_over_is_413() -> None:
    payload = b"y" * 1000
    assert gunzip_bounded(gzip.compress(payload), 1000) == payload
    exc = error_of(gzip.compress(payload), 999)
    assert (exc.status, exc.error) == (413, "payload_too_large")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not gzip at all", id="not-gzip"),
        pytest.param(zlib.compress(b"x" * 100), id="zlib-not-gzip"),
        pytest.param(gzip.compress(b"x" * 100)[:-5], id="truncated-trailer"),
        pytest.param(gzip.compress(bytes(range(256)) * 10)[:30], id="truncated-stream"),
        pytest.param(gzip.compress(b"x" * 100)[:-8] + b"\0\0\0\0\0\0\0\0", id="bad-crc"),
        pytest.param(gzip.compress(b"x" * 100) + b"junk", id="trailing-garbage"),
    ],
)
def test_gunzip_broken_input_is_400_invalid_encoding(data: bytes) -> None:
    exc = error_of(data, 1 << 16)
    assert (exc.status, exc.error) == (400, "invalid_encoding")


def test_gunzip_allows_zero_padding_after_the_stream() -> None:
    assert gunzip_bounded(gzip.compress(b"abc") + b"\0" * 16, 100) == b"abc"


def test_gunzip_bomb_stops_after_the_limit_in_time_and_memory() -> None:
    tracemalloc.start()
    try:
        exc = error_of(BOMB, MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (exc.status, exc.error) == (413, "payload_too_large")
    assert peak < 3 * MIB, f"peak {peak} bytes while decompressing"
    # Time as a same-run ratio of CPU times (a loaded machine slows both alike): stopping at the 1 MiB limit
    # costs a small fraction of inflating all 50 MiB.
    bounded = best_of(lambda: error_of(BOMB, MIB), 3, clock=time.process_time)
    inflated = best_of(lambda: zlib.decompress(BOMB, wbits=31), 3, clock=time.process_time)
    assert bounded < inflated / 5, f"stopping took {bounded:.4f}s of CPU, inflating it all {inflated:.4f}s"


# -- end to end: a shared server, rate limit off, max_body_bytes 1 MiB --


class GzSink:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server

    def post(self, body: bytes, encoding: str | None, content_type: str = "application/json") -> httpx.Response:
        headers = {"content-encoding": encoding} if encoding is not None else {}
        return self.server.post(body, content_type=content_type, headers=headers)

    def read(self, node_id: str) -> list[bytes]:
        proc = run_cli("read", "--config", str(self.server.config_path), "--node", node_id)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.splitlines()

    def wait_read(self, node_id: str, n: int, timeout: float = 10.0) -> list[bytes]:
        def enough() -> list[bytes] | None:
            lines = self.read(node_id)
            return lines if len(lines) >= n else None

        return wait_for(enough, timeout, f"{n} records of {node_id} on disk", interval=0.05)


@pytest.fixture(scope="module")
def gz_sink(tmp_path_factory: pytest.TempPathFactory, lane: str) -> Iterator[GzSink]:
    with shared_server(tmp_path_factory, "gzip-sink", {"ingest": {"max_body_bytes": MIB}}, lane) as (server, _, _):
        yield GzSink(server)


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    body: dict[str, Any] = response.json()
    assert body["error"] == error
    return body


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "X-Gzip"])
def test_gzip_body_is_accepted_and_stored_exactly(gz_sink: GzSink, encoding: str) -> None:
    node = uid()
    records = [{"node_id": node, "ts": float(i), "i": i, "text": "é" * i} for i in range(20)]
    response = gz_sink.post(gzip.compress(orjson.dumps(records)), encoding)
    assert (response.status_code, response.json()) == (202, {"accepted": 20})
    assert gz_sink.wait_read(node, 20) == [orjson.dumps(r) for r in records]


def test_gzip_ndjson_body(gz_sink: GzSink) -> None:
    node = uid()
    records = [{"node_id": node, "ts": 1.5, "i": i} for i in range(3)]
    body = b"\n".join(orjson.dumps(r) for r in records) + b"\n"
    response = gz_sink.post(gzip.compress(body), "gzip", content_type="application/x-ndjson")
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    assert gz_sink.wait_read(node, 3) == [orjson.dumps(r) for r in records]


def test_identity_encoding_is_plain(gz_sink: GzSink) -> None:
    node = uid()
    record = {"node_id": node, "ts": 1}
    response = gz_sink.post(orjson.dumps(record), "identity")
    assert response.status_code == 202
    assert gz_sink.wait_read(node, 1) == [orjson.dumps(record)]  # stored as sent, not taken for gzip


@pytest.mark.parametrize("encoding", ["br", "deflate", "compress", "zstd", "gzip, br", "identity, gzip"])
def test_unknown_encoding_is_415(gz_sink: GzSink, encoding: str) -> None:
    node = uid()
    body = assert_error(gz_sink.post(gzip.compress(orjson.dumps({"node_id": node, "ts": 1})), encoding),
                        415, "unsupported_media_type")
    assert "Content-Encoding" in body["detail"]


@pytest.mark.parametrize("encoding", ["br", "gzip"])
def test_keep_alive_connection_stays_in_step_after_a_refused_body(gz_sink: GzSink, encoding: str) -> None:
    """A 415 (body never read) or 400 (broken gzip) must not leave body bytes to be parsed as a request."""
    node = uid()
    inner = b'{"node_id":"%s","ts":1}' % node.encode()
    smuggled = (b"POST /telemetry HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(inner), inner))
    with httpx.Client(base_url=gz_sink.server.url, timeout=10.0) as client:
        headers = {"content-type": "application/json", "content-encoding": encoding}
        first = client.post("/telemetry", content=smuggled * 20, headers=headers)
        assert first.status_code in (400, 415), first.text
        good = {"node_id": node + "-ok", "ts": 2}
        second = client.post("/telemetry", content=orjson.dumps(good), headers={"content-type": "application/json"})
        assert (second.status_code, second.json()) == (202, {"accepted": 1})
    gz_sink.wait_read(node + "-ok", 1)
    assert gz_sink.read(node) == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x1f\x8b\x08\x00garbage-after-a-gzip-magic", id="corrupt"),
        pytest.param(gzip.compress(b'{"node_id":"trunc","ts":1}' * 50)[:-10], id="truncated"),
        pytest.param(b'{"node_id":"plain","ts":1}', id="plain-json-labelled-gzip"),
    ],
)
def test_broken_gzip_is_400_invalid_encoding(gz_sink: GzSink, data: bytes) -> None:
    assert_error(gz_sink.post(data, "gzip"), 400, "invalid_encoding")


def test_gzip_body_that_inflates_to_invalid_json_is_400_invalid_json(gz_sink: GzSink) -> None:
    assert_error(gz_sink.post(gzip.compress(b"{not json"), "gzip"), 400, "invalid_json")


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_decompression_bomb_is_413_quickly_with_bounded_memory(gz_sink: GzSink) -> None:
    assert len(BOMB) < 100_000
    # Warm up the gzip path so that one-off allocations do not count against the bomb.
    node = uid()
    warm = orjson.dumps([{"node_id": node, "ts": 1, "pad": "z" * 1000}] * 500)
    assert gz_sink.post(gzip.compress(warm), "gzip").status_code == 202
    pid = gz_sink.server.proc.pid
    before = vm_hwm_kib(pid)
    for _ in range(3):
        started = time.perf_counter()
        response = gz_sink.post(BOMB, "gzip")
        elapsed = time.perf_counter() - started
        body = assert_error(response, 413, "payload_too_large")
        assert "decompressed" in body["detail"]
        assert elapsed < 2.0, f"413 took {elapsed:.2f}s"
    grown_mib = (vm_hwm_kib(pid) - before) / 1024
    # The limit is 1 MiB; inflating the whole bomb would take 50 MiB.
    assert grown_mib < 1 + 4, f"the server's peak RSS grew by {grown_mib:.1f} MiB"
    assert gz_sink.read(node), "the warm-up record"
    assert gz_sink.server.proc.poll() is None


def test_rate_limit_charges_the_decompressed_size_of_a_small_gzip_body(start_server: Any) -> None:
    limit = 65536
    server: ServerProcess = start_server({
        "ingest": {"max_body_bytes": limit},
        "rate_limit": {"bytes_per_second": 1, "burst_bytes": limit},
    })
    node = uid()
    plain = orjson.dumps({"node_id": node, "ts": 1, "pad": "a" * 40_000})
    packed = gzip.compress(plain)
    assert len(packed) < 1000
    # The first inflates to 40 kB of the 64 KiB burst; the second would pass on its wire bytes
    # alone, but is charged what it inflates to.
    assert server.post(packed, headers={"content-encoding": "gzip"}).status_code == 202
    response = server.post(packed, headers={"content-encoding": "gzip"})
    assert_error(response, 429, "rate_limited")
    assert "global" in response.json()["detail"]
    assert int(response.headers["retry-after"]) >= 1
