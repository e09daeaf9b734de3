"""End to end: a real `telemetry-sink serve` subprocess on a loopback port, driven over HTTP.

Covers the HTTP contract (docs/http-api.md): formats, every error status with its exact JSON
shape, all or nothing, `ts`, rate limiting, buffer full, batching, segment roll-over, graceful
shutdown, torn-tail recovery, the on-disk format read with nothing but `cryptography`, and
start-up failures.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import ServerProcess, StartServer, run_cli, shared_server, wait_for
from cryptography.fernet import Fernet

from telemetry_sink import segment_format
from telemetry_sink.crypto import CryptoService
from telemetry_sink.testing import StalledPost

GRACEFUL_EXIT = (0, -signal.SIGTERM)
MAX_BODY = 4096  # [ingest] max_body_bytes of the shared server


# -- helpers --


def uid(prefix: str = "n") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def batches_on_disk(directory: Path) -> list[tuple[Path, segment_format.Batch]]:
    """Every intact batch of every segment in `directory`, in file order."""
    out: list[tuple[Path, segment_format.Batch]] = []
    if not directory.is_dir():
        return out
    for path in segment_format.list_segments(directory):
        if path.stat().st_size < segment_format.FILE_HEADER_SIZE:
            continue  # being created by the writer: its header is not written yet
        with segment_format.SegmentImage(path) as image:
            out.extend((path, item.detached()) for item in image.batches() if isinstance(item, segment_format.Batch))
    return out


def stored_records(directory: Path, key_file: Path) -> list[dict[str, Any]]:
    """Decrypt everything on disk in-process (fast enough to poll)."""
    crypto = CryptoService.from_key_file(key_file)
    return [orjson.loads(crypto.decrypt(t)) for _, b in batches_on_disk(directory) for t in b.tokens]


def cli_read(config_path: Path, *args: str) -> list[dict[str, Any]]:
    """`telemetry-sink read --config CONFIG ARGS`, parsed."""
    proc = run_cli("read", "--config", str(config_path), *args)
    assert proc.returncode == 0, proc.stderr.decode()
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


def padded_record(node_id: str, size: int) -> bytes:
    """A valid single-record JSON body of exactly `size` bytes."""
    base = orjson.dumps({"node_id": node_id, "ts": 1.0, "pad": ""})
    assert size >= len(base)
    body = orjson.dumps({"node_id": node_id, "ts": 1.0, "pad": "x" * (size - len(base))})
    assert len(body) == size
    return body


def healthz(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(server.url + "/healthz", timeout=5.0)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """The exact error shape: {"error": CODE, "detail": TEXT} (+ "index" for invalid_record)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    expected_keys = {"error", "detail", "index"} if error == "invalid_record" else {"error", "detail"}
    assert set(body) == expected_keys, body
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def assert_stopped_gracefully(server: ServerProcess, rc: int) -> None:
    assert rc in GRACEFUL_EXIT, f"exit status {rc}:\n{server.log()}"
    assert "shutdown complete" in server.log()
    assert "Traceback" not in server.log()


# -- a shared server for the request/response contract (rate limit off, small body limit) --


class Sink:
    def __init__(self, server: ServerProcess, data: Path, key_file: Path) -> None:
        self.server = server
        self.data = data
        self.key_file = key_file

    def records(self, node_id: str) -> list[dict[str, Any]]:
        return [r for r in stored_records(self.data, self.key_file) if r.get("node_id") == node_id]

    def wait_records(self, node_id: str, n: int) -> list[dict[str, Any]]:
        """Poll until `n` records of `node_id` are on disk; return them."""
        wait_for(lambda: len(self.records(node_id)) >= n, what=f"{n} records of {node_id} on disk")
        return self.records(node_id)


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory, lane: str) -> Iterator[Sink]:
    overrides = {"ingest": {"max_body_bytes": MAX_BODY}}
    with shared_server(tmp_path_factory, "shared-sink", overrides, lane) as (server, base, key):
        yield Sink(server, base / "data", key)


# -- success paths --


def test_single_object_is_accepted_and_stored(sink: Sink) -> None:
    node = uid()
    record = {"node_id": node, "ts": 1700000000.25, "cpu": 0.5, "tags": ["a", "b"]}
    response = sink.server.post(orjson.dumps(record))
    assert response.status_code == 202
    assert response.json() == {"accepted": 1}
    assert wait_for(lambda: sink.records(node), what="the record on disk") == [record]


def test_array_is_accepted_in_order(sink: Sink) -> None:
    node = uid()
    records = [{"node_id": node, "ts": i, "i": i} for i in range(5)]
    response = sink.server.post(orjson.dumps(records), content_type="application/json; charset=utf-8")
    assert (response.status_code, response.json()) == (202, {"accepted": 5})
    assert sink.wait_records(node, 5) == records


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/ndjson", "Application/X-NDJSON; x=1"])
def test_ndjson_with_blank_lines_and_trailing_newline(sink: Sink, content_type: str) -> None:
    node = uid()
    records = [{"node_id": node, "ts": i, "i": i} for i in range(3)]
    lines = [orjson.dumps(r) for r in records]
    body = lines[0] + b"\n\n  \n" + lines[1] + b"\r\n" + lines[2] + b"\n"
    response = sink.server.post(body, content_type=content_type)
    assert (response.status_code, response.json()) == (202, {"accepted": 3})
    assert sink.wait_records(node, 3) == records


def test_stored_plaintext_is_orjson_dumps_of_the_record(sink: Sink, tmp_path: Path) -> None:
    node = uid()
    body = b'{ "node_id" : "%s", "ts": 12, "z": {"b": [1, 2.5, null, true]}, "a": "\\u00e9\\ud83d\\ude00" }' % (
        node.encode()
    )
    assert sink.server.post(body).status_code == 202
    wait_for(lambda: sink.records(node), what="the record on disk")
    proc = run_cli("read", "--node", node, "--config", str(sink.server.config_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == orjson.dumps(orjson.loads(body)) + b"\n"


def test_ts_is_added_when_absent_and_kept_when_given(sink: Sink) -> None:
    node = uid()
    before = time.time()
    response = sink.server.post(orjson.dumps([{"node_id": node, "i": 0}, {"node_id": node, "i": 1, "ts": 5},
                                              {"node_id": node, "i": 2, "ts": 1.5e9}]))
    after = time.time()
    assert response.status_code == 202
    stored = sink.wait_records(node, 3)
    added = stored[0]["ts"]
    assert type(added) is float
    assert before - 1.0 <= added <= after + 1.0
    assert list(stored[0]) == ["node_id", "i", "ts"]  # appended
    assert stored[1]["ts"] == 5 and type(stored[1]["ts"]) is int
    assert stored[2]["ts"] == 1.5e9


def test_longest_node_id_and_the_widest_exact_integers_are_accepted(sink: Sink) -> None:
    # Integers from -2**63 to 2**64 - 1 are stored exactly; wider ones are refused (422), not rounded.
    node = uid().ljust(128, "x")
    body = b'{"node_id":"%s","big":-9223372036854775808,"ts":18446744073709551615}' % node.encode()
    response = sink.server.post(body)
    assert (response.status_code, response.json()) == (202, {"accepted": 1})
    [stored] = wait_for(lambda: sink.records(node))
    assert stored["big"] == -(2**63)
    assert stored["ts"] == 18446744073709551615


def test_healthz_reports_a_live_writer(sink: Sink) -> None:
    body = healthz(sink.server)
    assert body["status"] == "ok"
    assert body["implementation"] in ("compiled", "pure-python")
    assert body["last_write_error"] is None
    assert isinstance(body["records_written"], int) and isinstance(body["buffer_records"], int)


def test_openapi_documents_the_ingest_route(sink: Sink) -> None:
    response = httpx.get(sink.server.url + "/openapi.json", timeout=5.0)
    assert response.status_code == 200
    post = response.json()["paths"]["/telemetry"]["post"]
    assert {"application/json", "application/x-ndjson"} <= set(post["requestBody"]["content"])
    record = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert record["required"] == ["node_id"]
    assert record["properties"]["node_id"]["maxLength"] == 128
    assert {"202", "400", "413", "415", "422", "429", "503"} <= set(post["responses"])
    for status in ("429", "503"):
        assert "Retry-After" in post["responses"][status]["headers"]


def test_http_api_doc_lists_every_documented_status(sink: Sink) -> None:
    post = httpx.get(sink.server.url + "/openapi.json", timeout=5.0).json()["paths"]["/telemetry"]["post"]
    doc = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text()
    for status in post["responses"]:
        assert f"\n| {status} |" in doc, f"docs/http-api.md does not list {status}"


# -- client errors: exact shapes, never a 500 --


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/xml", "multipart/form-data; boundary=x", "application/jsonx", ""],
)
def test_unsupported_or_missing_content_type_is_415(sink: Sink, content_type: str | None) -> None:
    node = uid()
    headers = {} if content_type is None else {"content-type": content_type}
    response = httpx.post(sink.server.url + "/telemetry", content=orjson.dumps({"node_id": node}),
                          headers=headers, timeout=5.0)
    assert "content-type" not in response.request.headers or content_type is not None
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "content_type", "detail"),
    [
        pytest.param(b"{", "application/json", "", id="truncated"),
        pytest.param(b"", "application/json", "", id="empty-body"),
        pytest.param(b'{"node_id": "a",}', "application/json", "", id="trailing-comma"),
        pytest.param(b"\xff\xfe{}", "application/json", "", id="not-utf8"),
        pytest.param(b'{"node_id": "\xc3\x28"}', "application/json", "", id="bad-utf8-in-string"),
        pytest.param(b'{"node_id": "\\ud800"}', "application/json", "", id="lone-surrogate"),
        pytest.param(b'{"node_id": "a", "ts": 1e400}', "application/json", "", id="infinite-number"),
        pytest.param(b'{"node_id": "a", "ts": NaN}', "application/json", "", id="nan"),
        pytest.param(b"[" * 2000 + b"]" * 2000, "application/json", "", id="deeply-nested"),
        pytest.param(b'{"node_id":"a"}\n{oops}\n', "application/x-ndjson", "line 2", id="ndjson-bad-line"),
        pytest.param(b'{"node_id":"a"}\n\n\xff\n', "application/x-ndjson", "line 3", id="ndjson-not-utf8-line"),
    ],
)
def test_unparsable_body_is_400(sink: Sink, body: bytes, content_type: str, detail: str) -> None:
    error = assert_error(sink.server.post(body, content_type=content_type), 400, "invalid_json")
    assert detail in error["detail"]


OK = {"node_id": "ok"}


@pytest.mark.parametrize(
    ("payload", "content_type", "index", "detail"),
    [
        pytest.param(b"42", "application/json", 0, "object", id="scalar-number"),
        pytest.param(b'"text"', "application/json", 0, "object", id="scalar-string"),
        pytest.param(b"null", "application/json", 0, "object", id="null"),
        pytest.param(b"true", "application/json", 0, "object", id="bool"),
        pytest.param(b"[]", "application/json", 0, "no records", id="empty-array"),
        pytest.param([[OK]], "application/json", 0, "array", id="nested-array"),
        pytest.param([OK, 3], "application/json", 1, "not a number", id="scalar-in-array"),
        pytest.param([OK, OK, {}], "application/json", 2, "node_id is missing", id="missing-node-id"),
        pytest.param([OK, {"node_id": ""}], "application/json", 1, "not 0", id="empty-node-id"),
        pytest.param([OK, {"node_id": "x" * 129}], "application/json", 1, "not 129", id="node-id-129-chars"),
        pytest.param([{"node_id": "é" * 129}], "application/json", 0, "not 129", id="node-id-129-non-ascii"),
        pytest.param([{"node_id": 7}], "application/json", 0, "string", id="node-id-number"),
        pytest.param([{"node_id": None}], "application/json", 0, "string", id="node-id-null"),
        pytest.param([{"node_id": ["a"]}], "application/json", 0, "string", id="node-id-array"),
        pytest.param([OK, {"node_id": "a", "ts": "now"}], "application/json", 1, "ts", id="ts-string"),
        pytest.param([{"node_id": "a", "ts": True}], "application/json", 0, "ts", id="ts-bool"),
        pytest.param([{"node_id": "a", "ts": None}], "application/json", 0, "ts", id="ts-null"),
        pytest.param([{"node_id": "a", "ts": {"s": 1}}], "application/json", 0, "ts", id="ts-object"),
        pytest.param(b"\n \r\n\n", "application/x-ndjson", 0, "no records", id="ndjson-only-blank-lines"),
        pytest.param(b"", "application/x-ndjson", 0, "no records", id="ndjson-empty"),
        pytest.param(b'{"node_id":"a"}\n\n[1]\n', "application/x-ndjson", 1, "array", id="ndjson-array-line"),
        pytest.param(b'{"node_id":"a"}\n{"node_id":""}', "application/x-ndjson", 1, "not 0", id="ndjson-bad-record"),
    ],
)
def test_invalid_record_is_422_naming_the_first_bad_index(
    sink: Sink, payload: object, content_type: str, index: int, detail: str
) -> None:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    error = assert_error(sink.server.post(body, content_type=content_type), 422, "invalid_record")
    assert error["index"] == index
    assert detail in error["detail"]


def test_invalid_request_stores_nothing(sink: Sink) -> None:
    node, marker = uid("partial"), uid("marker")
    bad = [{"node_id": node, "i": 0}, {"node_id": node, "i": 1}, {"node_id": node, "ts": "yesterday"}]
    error = assert_error(sink.server.post(orjson.dumps(bad)), 422, "invalid_record")
    assert error["index"] == 2
    ndjson = b'{"node_id":"%s"}\n{"node_id":"%s"}\nnot json\n' % (node.encode(), node.encode())
    assert_error(sink.server.post(ndjson, content_type="application/x-ndjson"), 400, "invalid_json")
    # Records are written in arrival order: once the marker is on disk, the rejected ones would be too.
    assert sink.server.post(orjson.dumps({"node_id": marker})).status_code == 202
    wait_for(lambda: sink.records(marker), what="the marker on disk")
    stored = cli_read(sink.server.config_path)
    assert any(r["node_id"] == marker for r in stored)
    assert not [r for r in stored if r["node_id"] == node]


ODD_BODIES: list[tuple[str | None, bytes]] = [
    ("application/json", b"\x00"),
    ("application/json", b"{}"),
    ("application/json", b'{"node_id": "a"} {"node_id": "b"}'),
    ("application/json", b"[1, [2, [3]]]"),
    ("application/json", b'[{"node_id": "a"}, [{"node_id": "b"}]]'),
    ("application/json", b'{"node_id": "a", "ts": -1e308}'),
    ("application/json", b'{"node_id": "a", "ts": 99999999999999999999999999999999999}'),
    ("application/json", b'{"node_id": "a", "n": -123456789012345678901234567890}'),
    ("application/json", b'{"node_id": "a", "node_id": ""}'),
    ("application/json", b'{"node_id": "\\u0000"}'),
    ("application/json", b"\xef\xbb\xbf{\"node_id\": \"bom\"}"),
    ("application/json", b'{"node_id": "a"}' + b" " * 3000),
    ("application/x-ndjson", b"\n"),
    ("application/x-ndjson", b"\x00\n"),
    ("application/x-ndjson", b'{"node_id": "a"}\r'),
    ("application/x-ndjson", b'"scalar"\n'),
    ("application/x-ndjson", b'{"node_id": "a"}{"node_id": "b"}\n'),
    ("application/json; charset=latin-1", b'{"node_id": "\xe9"}'),
    (";", b"{}"),
    ("application/json;;;", b'{"node_id": "a"}'),
    ("application/json ; q=1", b'{"node_id": "a"}'),
]


def test_odd_inputs_never_get_a_5xx(sink: Sink) -> None:
    with httpx.Client(base_url=sink.server.url, timeout=5.0) as client:
        for content_type, body in ODD_BODIES:
            headers = {} if content_type is None else {"content-type": content_type}
            response = client.post("/telemetry", content=body, headers=headers)
            assert response.status_code in (202, 400, 413, 415, 422), (content_type, body, response.text)
            answer = response.json()
            assert "error" in answer or answer.get("accepted", 0) >= 1, (content_type, body, answer)
        assert client.get("/telemetry").status_code == 405
        assert client.put("/telemetry", content=b"{}").status_code == 405
    assert healthz(sink.server)["status"] == "ok"
    assert "internal_error" not in sink.server.log() and "Traceback" not in sink.server.log()


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_deeply_nested_record_is_a_client_error_not_a_500(start_server: StartServer, content_type: str) -> None:
    server = start_server()
    deep = b'{"node_id": "deep", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    if content_type == "application/json":
        body = b'[{"node_id": "ok"}, ' + deep + b"]"
    else:
        body = b'{"node_id": "ok"}\n' + deep
    response = server.post(body, content_type=content_type)
    assert response.status_code in (400, 422), response.text
    if response.status_code == 422:
        assert assert_error(response, 422, "invalid_record")["index"] == 1
    else:
        assert_error(response, 400, "invalid_json")
    assert "Traceback" not in server.log()


def test_bodies_over_64_kib_sent_at_once_are_each_stored_whole_and_exact(start_server: StartServer, tmp_path: Path,
                                                                       key_file: Path) -> None:
    """150 KB arrays, canonical ones (read whole by the compiled reader) and ones with an escape in a
    string (parsed in slices, one body at a time), from 8 connections at once: every record stored
    once, as the orjson path writes it."""
    server = start_server()
    bodies: dict[str, bytes] = {}
    for n in range(8):
        note = "plain" if n % 2 else 'say "hi"'
        node = uid(f"large{n}")
        bodies[node] = orjson.dumps([{"node_id": node, "i": i, "note": note, "ts": 1.5, "pad": "x" * 120}
                                     for i in range(1000)])
        assert 65536 < len(bodies[node]) <= 262144
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda b=body: statuses.append(server.post(b).status_code))
               for body in bodies.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [202] * 8
    wait_for(lambda: len(stored_records(tmp_path / "data", key_file)) >= 8000, what="8,000 records on disk")
    stored = stored_records(tmp_path / "data", key_file)
    for node, body in bodies.items():
        assert [r for r in stored if r["node_id"] == node] == orjson.loads(body)
    assert "Traceback" not in server.log()


# -- 413 --


def test_body_at_the_limit_is_accepted_and_one_byte_more_is_413(sink: Sink) -> None:
    node = uid()
    response = sink.server.post(padded_record(node, MAX_BODY))
    assert (response.status_code, response.json()) == (202, {"accepted": 1})
    error = assert_error(sink.server.post(padded_record(node, MAX_BODY + 1)), 413, "payload_too_large")
    assert str(MAX_BODY) in error["detail"]
    as_ndjson = padded_record(node, MAX_BODY // 2) + b"\n" + padded_record(node, MAX_BODY // 2)
    assert_error(sink.server.post(as_ndjson, content_type="application/x-ndjson"), 413, "payload_too_large")
    wait_for(lambda: sink.records(node), what="the record at the limit")
    assert len(sink.records(node)) == 1


def _chunks(body: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def test_chunked_body_without_content_length(sink: Sink) -> None:
    node = uid()
    small = orjson.dumps([{"node_id": node, "i": i} for i in range(20)])
    assert len(small) < MAX_BODY
    response = httpx.post(sink.server.url + "/telemetry", content=_chunks(small, 50),
                          headers={"content-type": "application/json"}, timeout=5.0)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert (response.status_code, response.json()) == (202, {"accepted": 20})

    big = padded_record(uid("big"), MAX_BODY + 10)
    response = httpx.post(sink.server.url + "/telemetry", content=_chunks(big, 1000),
                          headers={"content-type": "application/json"}, timeout=5.0)
    assert_error(response, 413, "payload_too_large")
    wait_for(lambda: len(sink.records(node)) == 20, what="the chunked records")


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_huge_chunked_body_is_refused_without_buffering_it(sink: Sink) -> None:
    assert sink.server.post(padded_record(uid(), MAX_BODY)).status_code == 202  # warm up
    before = _peak_rss_kib(sink.server.proc.pid)
    chunk = b'{"node_id": "' + b"x" * 65536

    def endless() -> Iterator[bytes]:
        for _ in range(48 * 1024 * 1024 // len(chunk)):  # 48 MiB
            yield chunk

    response = httpx.post(sink.server.url + "/telemetry", content=endless(),
                          headers={"content-type": "application/json"}, timeout=30.0)
    assert_error(response, 413, "payload_too_large")
    grown_mib = (_peak_rss_kib(sink.server.proc.pid) - before) / 1024
    assert grown_mib < 24, f"the server's peak RSS grew by {grown_mib:.0f} MiB for a refused body"
    assert healthz(sink.server)["status"] == "ok"


# -- rate limiting --


def test_rate_limit_reject_mode_429_after_the_burst(start_server: StartServer, tmp_path: Path, key_file: Path) -> None:
    server = start_server({
        "rate_limit": {"bytes_per_second": 100, "burst_bytes": 4000, "mode": "reject"},
        "ingest": {"max_body_bytes": 2000},
    })
    node = uid()
    for _ in range(2):
        assert server.post(padded_record(node, 1950)).status_code == 202
    rejected = uid("rejected")
    response = server.post(padded_record(rejected, 1950))
    assert_error(response, 429, "rate_limited")
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    # ~1850 missing bytes at 100 B/s: about 19 s, rounded up.
    assert 15 <= int(retry_after) <= 19
    # A request that fits the remaining budget still passes (reject costs nothing).
    assert server.post(b'{"node_id":"%s"}' % node.encode()).status_code == 202
    wait_for(lambda: len(stored_records(tmp_path / "data", key_file)) == 3, what="3 records")
    assert_stopped_gracefully(server, server.stop())
    assert [r["node_id"] for r in cli_read(server.config_path)] == [node] * 3


def test_rate_limit_delay_mode_waits_then_429(start_server: StartServer, tmp_path: Path, key_file: Path) -> None:
    server = start_server({
        "rate_limit": {"bytes_per_second": 2000, "burst_bytes": 2000, "mode": "delay", "max_delay_ms": 800},
        "ingest": {"max_body_bytes": 2000},
    })
    node = uid()
    with httpx.Client(base_url=server.url, timeout=10.0, headers={"content-type": "application/json"}) as client:
        first = client.post("/telemetry", content=padded_record(node, 2000))  # takes the whole burst
        assert first.status_code == 202
        start = time.monotonic()
        second = client.post("/telemetry", content=padded_record(node, 1000))  # ~0.5 s of budget
        waited = time.monotonic() - start
        assert second.status_code == 202
        # A lower bound only: a loaded machine can only make it longer (the 429 below bounds the wait).
        assert waited >= 0.3, f"waited {waited:.3f}s for 1000 bytes at 2000 B/s"
        third = client.post("/telemetry", content=padded_record(uid("too-late"), 2000))  # ~1 s > 800 ms
        assert_error(third, 429, "rate_limited")
        assert int(third.headers["retry-after"]) >= 1
    wait_for(lambda: len(stored_records(tmp_path / "data", key_file)) == 2, what="2 records")
    assert_stopped_gracefully(server, server.stop())
    assert [r["node_id"] for r in cli_read(server.config_path)] == [node, node]


# -- buffer and batching --


def test_buffer_full_is_503_with_retry_after(start_server: StartServer, tmp_path: Path, key_file: Path) -> None:
    server = start_server({
        "buffer": {"max_records": 10},
        "writer": {"batch_size": 10, "flush_interval_ms": 60000},
    })
    node, rejected = uid(), uid("rejected")

    def post(n: int, node_id: str) -> httpx.Response:
        return server.post(orjson.dumps([{"node_id": node_id, "i": i} for i in range(n)]))

    assert post(6, node).status_code == 202
    full = post(5, rejected)
    assert_error(full, 503, "buffer_full")
    assert full.headers["retry-after"] == "1"
    assert post(4, node).status_code == 202  # exactly full: a size-triggered flush frees it
    wait_for(lambda: healthz(server)["buffer_records"] == 0, what="the buffer to drain")
    assert post(5, node).status_code == 202
    assert_stopped_gracefully(server, server.stop())
    stored = cli_read(server.config_path)
    assert [r["node_id"] for r in stored] == [node] * 15


def test_batch_written_when_batch_size_records_wait(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server({"writer": {"batch_size": 10, "flush_interval_ms": 60000}})
    node = uid()
    with httpx.Client(base_url=server.url, timeout=5.0, headers={"content-type": "application/json"}) as client:
        for r in range(4):
            body = orjson.dumps([{"node_id": node, "i": 3 * r + i} for i in range(3)])
            assert client.post("/telemetry", content=body).status_code == 202
    found = wait_for(lambda: batches_on_disk(tmp_path / "data"), timeout=5.0, what="the size-triggered batch")
    assert [(b.first_seq, b.count) for _, b in found] == [(0, 10)]
    # The other 2 linger for the flush interval.
    wait_for(lambda: healthz(server)["buffer_records"] == 2, what="the buffer to hold the 2 left over")
    assert_stopped_gracefully(server, server.stop())  # ... and are drained at shutdown
    assert [(b.first_seq, b.count) for _, b in batches_on_disk(tmp_path / "data")] == [(0, 10), (10, 2)]
    assert [r["i"] for r in cli_read(server.config_path)] == list(range(12))


def test_batch_written_after_the_flush_interval(start_server: StartServer, tmp_path: Path) -> None:
    interval_s = 0.5
    server = start_server({"writer": {"batch_size": 1000, "flush_interval_ms": int(interval_s * 1000)}})
    node = uid()
    with httpx.Client(base_url=server.url, timeout=5.0, headers={"content-type": "application/json"}) as client:
        client.post("/telemetry", content=b'{"node_id":"warm-up"}')
        wait_for(lambda: batches_on_disk(tmp_path / "data"), what="the warm-up batch")
        started = time.monotonic()
        body = orjson.dumps([{"node_id": node, "i": i} for i in range(3)])  # one request: no race with the timer
        assert client.post("/telemetry", content=body).status_code == 202
    wait_for(lambda: len(batches_on_disk(tmp_path / "data")) > 1, timeout=10.0, what="the time-triggered batch")
    elapsed = time.monotonic() - started
    # A lower bound only (a loaded machine can only make it later); written while the server runs, not at stop.
    assert elapsed >= interval_s, f"written after {elapsed:.3f}s, before the {interval_s}s flush interval"
    assert [(b.first_seq, b.count) for _, b in batches_on_disk(tmp_path / "data")] == [(0, 1), (1, 3)]
    assert_stopped_gracefully(server, server.stop())


def test_segments_roll_over_with_consecutive_sequence_numbers(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server({"writer": {"max_segment_bytes": 1500, "flush_interval_ms": 5, "fsync": "batch"}})
    node = uid()
    expected = []
    with httpx.Client(base_url=server.url, timeout=5.0, headers={"content-type": "application/json"}) as client:
        for r in range(20):
            records = [{"node_id": node, "ts": r, "i": 2 * r + i, "pad": "p" * 40} for i in range(2)]
            expected.extend(records)
            assert client.post("/telemetry", content=orjson.dumps(records)).status_code == 202
            # one batch per request (~500 bytes): a new segment every 3 batches
            written = len(expected)
            wait_for(lambda: client.get("/healthz").json()["records_written"] == written)  # noqa: B023
    assert_stopped_gracefully(server, server.stop())

    data = tmp_path / "data"
    segments = segment_format.list_segments(data)
    assert len(segments) >= 5
    next_seq = 0
    for path in segments:
        with segment_format.SegmentImage(path) as image:
            items = list(image.batches())
        assert items and all(isinstance(b, segment_format.Batch) for b in items), path
        assert path.name == segment_format.segment_name("w0", next_seq)
        for batch in items:
            assert isinstance(batch, segment_format.Batch)
            assert batch.first_seq == next_seq
            next_seq = batch.next_seq
        assert items[-1].offset < 1500  # a segment takes batches until it passes max_segment_bytes ...
        if path != segments[-1]:
            assert path.stat().st_size >= 1500  # ... and is sealed only then
    assert next_seq == 40
    assert cli_read(server.config_path) == expected
    verify = run_cli("verify", "--config", str(server.config_path))
    assert verify.returncode == 0, verify.stdout.decode()


# -- shutdown --


def test_graceful_shutdown_writes_every_accepted_record(start_server: StartServer, tmp_path: Path) -> None:
    # Nothing is written before the shutdown: everything sits in the buffer when SIGTERM arrives.
    server = start_server({"writer": {"batch_size": 100000, "flush_interval_ms": 60000}})
    expected: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.url, timeout=5.0, headers={"content-type": "application/json"}) as client:
        for r in range(60):
            records = [{"node_id": f"node-{r % 7}", "r": r, "i": i, "ts": r + i / 10} for i in range(5)]
            assert client.post("/telemetry", content=orjson.dumps(records)).status_code == 202
            expected.extend(records)
    assert not batches_on_disk(tmp_path / "data")
    rc = server.stop()
    assert_stopped_gracefully(server, rc)
    assert "300 records in 1 batches" in server.log()
    assert cli_read(server.config_path) == expected


def test_request_in_flight_at_shutdown_gets_503(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    assert server.post(b'{"node_id": "early"}').status_code == 202
    in_flight = StalledPost(server.port, b'{"node_id": "late",', b' "i": 1}')
    in_flight.wait_read()  # the server holds the request, its body half read
    server.signal(signal.SIGTERM)
    wait_for(lambda: "Shutting down" in server.log(), what="uvicorn to begin its shutdown")
    try:
        late = httpx.post(server.url + "/telemetry", content=b'{"node_id": "later"}',
                          headers={"content-type": "application/json"}, timeout=5.0)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        pass  # the listening socket is already closed: fine, nothing was accepted
    else:
        assert_error(late, 503, "shutting_down")
    status, body = in_flight.finish()
    assert (status, orjson.loads(body)["error"]) == (503, "shutting_down"), body
    assert_stopped_gracefully(server, server.wait())
    assert [r["node_id"] for r in cli_read(server.config_path)] == ["early"]


def test_request_waiting_for_rate_budget_at_shutdown_is_not_lost(start_server: StartServer) -> None:
    server = start_server({
        "rate_limit": {"bytes_per_second": 1000, "burst_bytes": 1000, "mode": "delay", "max_delay_ms": 1500},
        "ingest": {"max_body_bytes": 1000},
    })
    assert server.post(padded_record("first", 1000)).status_code == 202  # empties the bucket
    delayed = StalledPost(server.port, padded_record("delayed", 800))  # needs ~0.8 s of budget
    delayed.wait_read()  # the whole request is in: it waits for budget
    server.signal(signal.SIGTERM)
    wait_for(lambda: "Shutting down" in server.log(), what="uvicorn to begin its shutdown")
    status, body = delayed.finish()
    assert_stopped_gracefully(server, server.wait())
    stored = [r["node_id"] for r in cli_read(server.config_path)]
    if status == 202:
        assert stored == ["first", "delayed"]
    else:
        assert (status, orjson.loads(body)["error"]) == (503, "shutting_down"), body
        assert stored == ["first"]


def test_no_accepted_record_is_lost_when_stopping_under_load(start_server: StartServer) -> None:
    server = start_server({"writer": {"batch_size": 50, "flush_interval_ms": 30}})
    lock = threading.Lock()
    accepted: list[str] = []
    ambiguous: list[str] = []
    refusals: list[httpx.Response] = []

    def worker(w: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10.0, headers={"content-type": "application/json"}) as client:
            for i in range(5000):
                ids = [f"w{w}-{i}-{j}" for j in range(3)]
                body = orjson.dumps([{"node_id": x} for x in ids])
                try:
                    response = client.post("/telemetry", content=body)
                except httpx.ConnectError:
                    return  # never reached the server
                except httpx.TransportError:
                    with lock:
                        ambiguous.extend(ids)
                    return
                with lock:
                    if response.status_code != 202:
                        refusals.append(response)
                        return
                    accepted.extend(ids)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(accepted) >= 300, timeout=20.0, what="some accepted records")
        server.signal(signal.SIGTERM)
    finally:
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    for response in refusals:
        assert_error(response, 503, "shutting_down")
    assert_stopped_gracefully(server, server.wait())
    stored = [r["node_id"] for r in cli_read(server.config_path)]
    assert len(stored) == len(set(stored))
    assert set(accepted) <= set(stored), f"{len(set(accepted) - set(stored))} accepted records were lost"
    assert set(stored) <= set(accepted) | set(ambiguous)


# -- recovery of a torn tail --


def _post_batches(server: ServerProcess, data: Path, node: str, batches: int) -> None:
    """Post `batches` requests of two records, each landing as its own batch."""
    for _ in range(batches):
        before = len(batches_on_disk(data))
        body = orjson.dumps([{"node_id": node, "ts": time.time()}, {"node_id": node, "k": "v"}])
        assert server.post(body).status_code == 202
        wait_for(lambda: len(batches_on_disk(data)) == before + 1, what="the batch on disk")  # noqa: B023


@pytest.mark.parametrize("damage", ["cut-last-batch-in-half", "garbage-appended"])
def test_torn_tail_is_cut_on_restart_and_the_sequence_continues(
    start_server: StartServer, tmp_path: Path, key_file: Path, damage: str
) -> None:
    data = tmp_path / "data"
    server = start_server({"writer": {"flush_interval_ms": 10}})
    _post_batches(server, data, "before", 3)
    assert_stopped_gracefully(server, server.stop())
    before = batches_on_disk(data)
    [(segment, _), *_] = before
    assert [b.first_seq for _, b in before] == [0, 2, 4]
    last = before[-1][1]
    size = segment.stat().st_size
    assert last.end == size

    if damage == "cut-last-batch-in-half":
        cut_to = last.offset + (last.end - last.offset) // 2
        os.truncate(segment, cut_to)
        cut_bytes, kept, next_seq = cut_to - last.offset, before[:-1], last.first_seq
    else:
        garbage = b"\x00garbage\x00" * 5
        with open(segment, "ab") as f:
            f.write(garbage)
        cut_bytes, kept, next_seq = len(garbage), before, last.next_seq

    server = start_server({"writer": {"flush_interval_ms": 10}})
    log = server.log()
    assert "WARNING" in log and f"cut {cut_bytes} bytes" in log, log
    _post_batches(server, data, "after", 1)
    assert_stopped_gracefully(server, server.stop())

    after = batches_on_disk(data)
    assert [b for _, b in after[: len(kept)]] == [b for _, b in kept]  # earlier batches intact
    assert [(b.first_seq, b.count) for _, b in after[len(kept) :]] == [(next_seq, 2)]
    assert {p for p, _ in after} == {segment}  # appended to the same segment
    stored = cli_read(server.config_path)
    assert [r["node_id"] for r in stored] == ["before"] * (2 * len(kept)) + ["after"] * 2
    assert run_cli("verify", "--config", str(server.config_path)).returncode == 0


# -- the on-disk format, read with nothing but cryptography, struct and zlib --


def _decode_segment_independently(path: Path, key: bytes) -> list[tuple[int, int, list[bytes], list[int]]]:
    """Follow docs/log-format.md using only struct, zlib and cryptography (no telemetry_sink)."""
    return [batch[:4] for batch in _decode_keyed_segment_independently(path, key)]


def _decode_keyed_segment_independently(
        path: Path, key: bytes) -> list[tuple[int, int, list[bytes], list[int], list[tuple[bytes, bytes, int]]]]:
    """The same, with the keyed extension: each batch also gives its key entries."""
    fernet = Fernet(key)
    data = path.read_bytes()
    magic, version, flags, reserved = struct.unpack_from(">8sHHI", data, 0)
    assert (magic, version, reserved) == (b"TSINKLOG", 1, 0) and flags in (0, 1)
    out = []
    pos = 16
    while pos < len(data):
        magic, length, crc = struct.unpack_from(">4sII", data, pos)
        assert magic == b"TSB1"
        body = data[pos + 12 : pos + 12 + length]
        assert len(body) == length and zlib.crc32(body) == crc
        first_seq, count, created_ms = struct.unpack_from(">QIQ", body, 0)
        records_end, keys = length, []
        if count & 0x80000000:
            assert flags == 1, "a keyed batch in a file without the keyed flag"
            count &= 0x7FFFFFFF
            (n,) = struct.unpack_from(">I", body, length - 4)
            records_end = length - 4 - 68 * n
            keys = [struct.unpack_from(">32s32sI", body, records_end + 68 * i) for i in range(n)]
        p = 20
        plaintexts, stamps = [], []
        for _ in range(count):
            (n,) = struct.unpack_from(">I", body, p)
            token = body[p + 4 : p + 4 + n]
            plaintexts.append(fernet.decrypt(token))
            stamps.append(fernet.extract_timestamp(token))
            p += 4 + n
        assert p == records_end, "stray bytes after the last record"
        assert all(stamp == created_ms // 1000 for stamp in stamps)
        out.append((first_seq, created_ms, plaintexts, stamps, keys))
        pos += 12 + length
    assert pos == len(data)
    return out


def test_segment_decodes_with_only_cryptography_struct_and_zlib(start_server: StartServer, tmp_path: Path,
                                                                 key_file: Path) -> None:
    server = start_server({"writer": {"flush_interval_ms": 10}})
    records = [{"node_id": "indep", "i": i, "ts": 1000 + i, "s": "ü" * i} for i in range(7)]
    started_ms = int(time.time() * 1000)
    assert server.post(orjson.dumps(records[:3])).status_code == 202
    wait_for(lambda: batches_on_disk(tmp_path / "data"), what="the first batch")
    body = b"\n".join(orjson.dumps(r) for r in records[3:])
    assert server.post(body, content_type="application/x-ndjson").status_code == 202
    assert_stopped_gracefully(server, server.stop())
    ended_ms = int(time.time() * 1000)

    key = key_file.read_bytes().strip()
    segments = sorted((tmp_path / "data").glob("*.tslog"))
    assert segments
    decoded = [batch for path in segments for batch in _decode_segment_independently(path, key)]
    assert [(first_seq, len(plain)) for first_seq, _, plain, _ in decoded] == [(0, 3), (3, 4)]
    assert all(started_ms - 1000 <= created_ms <= ended_ms + 1000 for _, created_ms, _, _ in decoded)
    plaintexts = [p for _, _, plain, _ in decoded for p in plain]
    assert [json.loads(p) for p in plaintexts] == records


def test_keyed_segment_decodes_with_only_cryptography_struct_and_zlib(start_server: StartServer, tmp_path: Path,
                                                                       key_file: Path) -> None:
    server = start_server({"writer": {"flush_interval_ms": 10}, "ingest": {"ack": "durable"}})
    records = [{"node_id": "keyed", "i": i, "ts": 1000 + i} for i in range(5)]
    bodies = [orjson.dumps(records[:2]), orjson.dumps(records[2:])]
    for i, body in enumerate(bodies):
        assert server.post(body, headers={"idempotency-key": f'"key-{i}"'}).status_code == 202
    assert server.post(b'{"node_id":"unkeyed","ts":1}').status_code == 202
    assert_stopped_gracefully(server, server.stop())

    (segment,) = sorted((tmp_path / "data").glob("*.tslog"))
    decoded = _decode_keyed_segment_independently(segment, key_file.read_bytes().strip())
    assert [json.loads(p) for batch in decoded for p in batch[2]] == [*records, {"node_id": "unkeyed", "ts": 1}]
    keys = [entry for batch in decoded for entry in batch[4]]
    # docs/log-format.md: sha256(scope NUL key), sha256(format NUL body); scope is the client address here
    assert keys == [(hashlib.sha256(b"addr:127.0.0.1\0key-%d" % i).digest(), hashlib.sha256(b"json\0" + body).digest(),
                     len(orjson.loads(body))) for i, body in enumerate(bodies)]


# -- start-up failures --


def test_second_server_on_the_same_directory_is_refused(start_server: StartServer) -> None:
    first = start_server()
    second = start_server(wait=False)
    rc = second.wait()
    assert rc == 2, second.log()
    errors = [line for line in second.log().splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("telemetry-sink: error:"), errors
    assert "locked" in errors[0]
    assert healthz(first)["status"] == "ok"
    assert first.post(b'{"node_id":"still-here"}').status_code == 202
    assert_stopped_gracefully(first, first.stop())


def test_missing_key_refuses_to_start(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server({"crypto": {"key_file": str(tmp_path / "nowhere.key")}}, wait=False)
    assert server.wait() == 2
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "keygen" in lines[0] and "nowhere.key" in lines[0]
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").glob("*.tslog"))


@pytest.mark.parametrize(
    ("overrides", "env", "named"),
    [
        pytest.param({"writer": {"batch_size": "lots"}}, None, "[writer] batch_size", id="not-an-integer"),
        pytest.param({"rate_limit": {"mode": "maybe"}}, None, "[rate_limit] mode", id="bad-choice"),
        pytest.param({"server": {"port": "70000"}}, None, "[server] port", id="port-range"),
        pytest.param({"ingest": {"max_body_bytes": "9999999"}, "rate_limit": {"burst_bytes": "1000"}}, None,
                     "[ingest] max_body_bytes", id="combination"),
        pytest.param({"writer": {"colour": "blue"}}, None, "[writer] colour", id="unknown-key"),
        pytest.param(None, {"TELEMETRY_SINK_BUFFER_MAX_RECORDS": "-1"}, "[buffer] max_records", id="env"),
    ],
)
def test_bad_config_value_exits_2_with_one_line(
    start_server: StartServer, overrides: dict[str, dict[str, str]] | None, env: dict[str, str] | None, named: str
) -> None:
    server = start_server(overrides, env=env, wait=False)
    assert server.wait() == 2
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("telemetry-sink: error: ") and named in lines[0]


def test_trailing_slash_is_404_not_a_redirect_built_from_the_host_header(start_server: StartServer) -> None:
    server = start_server()
    response = httpx.post(server.url + "/telemetry/", content=b'{"node_id": "n"}',
                          headers={"content-type": "application/json", "host": "evil.example"})
    assert response.status_code == 404
    assert "location" not in response.headers


def test_charsets_other_than_utf8_are_refused_with_415(start_server: StartServer) -> None:
    server = start_server()
    body = '{"node_id": "n"}'
    refused = server.post(body.encode("utf-16"), content_type="application/json; charset=utf-16")
    assert_error(refused, 415, "unsupported_media_type")
    assert "utf-16" in refused.json()["detail"]
    assert server.post(body, content_type='application/json; charset="UTF-8"').status_code == 202


def test_integers_beyond_64_bits_are_refused_not_rounded(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    too_wide = server.post(b'[{"node_id": "a", "v": 1}, {"node_id": "b", "v": 18446744073709551616}]')
    body = assert_error(too_wide, 422, "invalid_record")
    assert body["index"] == 1 and "64 bits" in body["detail"]
    assert_error(server.post(b'{"node_id": "c", "v": -9223372036854775809}'), 422, "invalid_record")
    edges = b'{"node_id": "d", "lo": -9223372036854775808, "hi": 18446744073709551615, "s": "123456789012345678901"}'
    assert server.post(edges).status_code == 202
    server.stop()
    [stored] = cli_read(server.config_path)
    assert (stored["lo"], stored["hi"], stored["s"]) == (-(2**63), 2**64 - 1, "123456789012345678901")


def test_node_id_header_names_the_node_of_records_without_one(start_server: StartServer) -> None:
    server = start_server({"ingest": {"node_id_header": "X-Node-Id"}})
    body = b'[{"v": 1}, {"node_id": "own", "v": 2}]'
    assert server.post(body, headers={"x-node-id": "from-header"}).json() == {"accepted": 2}
    missing = assert_error(server.post(b'{"v": 3}'), 422, "invalid_record")  # no header: as before
    assert missing["index"] == 0 and "node_id" in missing["detail"]
    server.stop()
    assert [(r["node_id"], r["v"]) for r in cli_read(server.config_path)] == [("from-header", 1), ("own", 2)]
