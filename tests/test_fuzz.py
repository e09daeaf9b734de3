"""Fuzzing: the HTTP contract with schemathesis (against a real server and the app's own OpenAPI
schema), the body parser/validator and the segment reader with hypothesis, and the segment
reader with atheris when it is installed. No input may give a 500, an unexpected exception or a hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import ServerProcess, shared_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from telemetry_sink import segment_format
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.errors import IngestError
from telemetry_sink.records import encode_records, parse_body

# -- (a) schemathesis: the HTTP contract against a real server --


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with shared_server(tmp_path_factory, "fuzz-sink", {"ingest": {"max_body_bytes": 65536}}) as (server, _, _):
        yield server


# The ingest route documents every status and body it returns: hold it to all of that.
INGEST_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _load_schema(server: ServerProcess) -> Any:
    # Loaded inside the test: schemathesis' lazy `pytest.from_fixture` breaks on pytest 9
    # (it reads the removed `Function._nodeid`), so drive its case strategies with hypothesis here.
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_ingest_route_honours_its_openapi_contract(fuzz_server: ServerProcess, mode: GenerationMode) -> None:
    operation = _load_schema(fuzz_server)["/telemetry"]["POST"]
    statuses: set[int] = set()

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=fuzz_server.url, checks=INGEST_CHECKS, timeout=10)
        statuses.add(response.status_code)

    run()
    assert fuzz_server.proc.poll() is None, fuzz_server.log()
    assert statuses, "no request was made"
    assert max(statuses) < 500, statuses
    if mode is GenerationMode.POSITIVE:
        assert 202 in statuses, statuses
    assert "Traceback" not in fuzz_server.log()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_get_routes_never_give_a_server_error(fuzz_server: ServerProcess, path: str) -> None:
    schema = _load_schema(fuzz_server)
    if path == "/openapi.json":
        response = httpx.get(fuzz_server.url + path, timeout=5)
        assert response.status_code == 200
        return
    operation = schema[path]["GET"]

    @settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error], timeout=10)
        assert response.status_code == 200, response.text

    run()


def test_schemathesis_really_reached_the_server(fuzz_server: ServerProcess) -> None:
    """Guard against a vacuous fuzz run: the schema documents the ingest route and its statuses."""
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=5).json()
    post = doc["paths"]["/telemetry"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/x-ndjson"}
    assert {"202", "400", "408", "413", "415", "422", "429", "503", "507"} <= set(post["responses"])


# -- (b) hypothesis: parser and validator --

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
records = st.dictionaries(st.sampled_from(["node_id", "ts", "x"]) | st.text(max_size=8), json_values, max_size=5)
# What orjson round-trips exactly (64-bit integers, finite floats): for records that must be accepted.
storable_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
storable_records = st.dictionaries(st.sampled_from(["ts", "x"]) | st.text(max_size=8), storable_values, max_size=5)


def _parse_and_encode(body: bytes, fmt: str) -> None:
    try:
        values = parse_body(body, fmt)
        plaintexts, nbytes = encode_records(values, 1.5)
    except IngestError as exc:
        assert exc.status in (400, 422), exc
        assert exc.body()["error"] in ("invalid_json", "invalid_record")
        return
    assert len(plaintexts) == len(values) >= 1
    assert nbytes == sum(map(len, plaintexts))


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_give_400_or_422(fmt: str, body: bytes) -> None:
    _parse_and_encode(body, fmt)


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
@settings(max_examples=300, deadline=None)
@given(doc=json_values | records | st.lists(records, max_size=4))
def test_arbitrary_json_only_ever_gives_400_or_422(fmt: str, doc: Any) -> None:
    # stdlib json: it writes what orjson will not (ints past 64 bits, Infinity) -- inputs a client may send.
    if fmt == "json":
        body = json.dumps(doc).encode()
    else:
        items = doc if isinstance(doc, list) else [doc]
        body = b"\n".join(json.dumps(item).encode() for item in items)
    _parse_and_encode(body, fmt)


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(storable_records, min_size=1, max_size=4))
def test_valid_records_are_accepted_with_ts_added(batch: list[dict[str, Any]]) -> None:
    import orjson

    for i, record in enumerate(batch):
        record["node_id"] = f"n{i}"
        if "ts" in record and (type(record["ts"]) not in (int, float) or type(record["ts"]) is bool):
            del record["ts"]
    values = parse_body(orjson.dumps(batch), "json")
    plaintexts, _ = encode_records(values, 7.0)
    decoded = [orjson.loads(p) for p in plaintexts]
    assert [r["node_id"] for r in decoded] == [f"n{i}" for i in range(len(batch))]
    for original, stored in zip(batch, decoded, strict=True):
        assert stored["ts"] == original.get("ts", 7.0)
        assert {k: v for k, v in stored.items() if k != "ts"} == {k: v for k, v in original.items() if k != "ts"}


@pytest.mark.parametrize("depth", [200, 1000, 5000], ids=lambda d: f"depth-{d}")
@pytest.mark.parametrize("fmt", ["json", "ndjson"])
def test_deep_nesting_is_a_client_error(fmt: str, depth: int) -> None:
    """Regression seed: orjson parses deeper than it serialises; that must be 400/422, never a crash."""
    body = b'{"node_id":"n","x":' + b"[" * depth + b"]" * depth + b"}"
    _parse_and_encode(body, fmt)


# -- (b) hypothesis: the segment reader --


def _valid_segment() -> bytes:
    crypto = CryptoService([generate_key().decode()], "test")
    batches = [
        segment_format.frame_batch(seq, 1_700_000_000_000,
                                   [crypto.encrypt(b'{"node_id":"n","i":%d}' % i) for i in range(n)])
        for seq, n in ((0, 2), (2, 1), (3, 3))
    ]
    return segment_format.FILE_HEADER_BYTES + b"".join(batches)


VALID_SEGMENT = _valid_segment()


def _walk(image: bytes) -> list[segment_format.Batch | segment_format.Damage]:
    items = []
    offset = segment_format.FILE_HEADER_SIZE
    # Every item advances through the file, so a walk has at most one item a byte.
    for item in segment_format.iter_batches(image):
        items.append(item)
        assert item.offset >= offset and item.end > item.offset and item.end <= len(image), item
        offset = item.end
        assert len(items) <= len(image)
        if isinstance(item, segment_format.Batch):
            body = image[item.offset + segment_format.BATCH_HEADER_SIZE : item.end]
            (crc,) = segment_format.BATCH_HEADER.unpack_from(image, item.offset)[2:]
            assert zlib.crc32(body) == crc
            assert image[item.offset : item.offset + 4] == segment_format.BATCH_MAGIC
            assert len(item.tokens) == item.count
    return items


def test_a_valid_segment_reads_back_whole() -> None:
    items = _walk(VALID_SEGMENT)
    assert [type(i).__name__ for i in items] == ["Batch"] * 3
    assert [(b.first_seq, b.count) for b in items if isinstance(b, segment_format.Batch)] == [(0, 2), (2, 1), (3, 3)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_iter_batches_on_arbitrary_bytes(data: bytes) -> None:
    _walk(segment_format.FILE_HEADER_BYTES + data)
    _walk(segment_format.FILE_HEADER_BYTES + segment_format.BATCH_MAGIC + data)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID_SEGMENT) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(segment_format.FILE_HEADER_SIZE, len(VALID_SEGMENT)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(segment_format.FILE_HEADER_SIZE, len(VALID_SEGMENT)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(segment_format.FILE_HEADER_SIZE, len(VALID_SEGMENT) - 1), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(mutations=st.lists(mutation, min_size=1, max_size=6))
def test_iter_batches_on_mutated_segments(mutations: list[tuple[str, int, int]]) -> None:
    image = bytearray(VALID_SEGMENT)
    for op, pos, value in mutations:
        pos = min(pos, len(image))
        if op == "flip" and pos < len(image):
            image[pos] ^= value
        elif op == "truncate":
            del image[pos:]
        elif op == "insert":
            image[pos:pos] = bytes([value])
        elif op == "delete" and pos < len(image):
            del image[pos]
    items = _walk(bytes(image))
    # Damage never hides intact batches: every original batch that survived byte for byte is found.
    found = {bytes(image[i.offset : i.end]) for i in items if isinstance(i, segment_format.Batch)}
    for original in _walk(VALID_SEGMENT):
        raw = VALID_SEGMENT[original.offset : original.end]
        if isinstance(original, segment_format.Batch) and bytes(image).count(raw) == 1 and raw not in found:
            # Only possible if the batch now overlaps a preceding forged-but-valid batch: CRC makes that
            # vanishingly unlikely, so treat it as a failure.
            pytest.fail(f"intact batch at seq {original.first_seq} was not found after {mutations}")


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=200), header=st.binary(min_size=0, max_size=20))
def test_segment_image_rejects_or_reads_any_file(tmp_path_factory: pytest.TempPathFactory, data: bytes,
                                                 header: bytes) -> None:
    path = tmp_path_factory.mktemp("img") / "w0-00000000000000000000.tslog"
    path.write_bytes(header + data)
    try:
        image = segment_format.SegmentImage(path)
    except segment_format.SegmentFormatError:
        return
    with image:
        list(image.batches())


# -- (c) atheris: coverage-guided fuzzing of the segment reader --

ATHERIS_HARNESS = textwrap.dedent('''
    import sys
    import zlib

    import atheris

    with atheris.instrument_imports():
        from telemetry_sink import segment_format

    def test_one_input(data: bytes) -> None:
        image = segment_format.FILE_HEADER_BYTES + data
        offset = segment_format.FILE_HEADER_SIZE
        for n, item in enumerate(segment_format.iter_batches(image)):
            assert n <= len(image)
            assert offset <= item.offset < item.end <= len(image), item
            offset = item.end
            if isinstance(item, segment_format.Batch):
                crc = segment_format.BATCH_HEADER.unpack_from(image, item.offset)[2]
                assert zlib.crc32(image[item.offset + segment_format.BATCH_HEADER_SIZE:item.end]) == crc

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
''')


def test_atheris_segment_reader(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is optional (pip install atheris)")
    harness = tmp_path / "fuzz_segment.py"
    harness.write_text(ATHERIS_HARNESS)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "valid").write_bytes(VALID_SEGMENT[segment_format.FILE_HEADER_SIZE:])
    (corpus / "torn").write_bytes(VALID_SEGMENT[segment_format.FILE_HEADER_SIZE:-7])
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [sys.executable, str(harness), "-runs=100000", "-max_len=2048", "-seed=1", "-max_total_time=20",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, timeout=60, env=env, cwd=tmp_path,
    )
    output = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    assert "Done" in output or "DONE" in output, output[-2000:]
