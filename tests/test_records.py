"""records.encode_body (speedups.encode_json): the one-pass reader of canonical bodies must give
exactly what the orjson path gives (parse_body, encode_records, record_span), or decline."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_sink.errors import IngestError
from telemetry_sink.records import MAX_NODE_ID_CHARS, encode_body, encode_records, parse_body
from telemetry_sink.speedups import record_span
from telemetry_sink.testing import compiled_speedups, speedups_module

NOW = 1_800_000_000.25
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(body: bytes, fmt: str, max_records: int = 1000) -> Any:
    """What the orjson path makes of `body`: (plaintexts, size, span), or the error it answers."""
    try:
        values = parse_body(body, fmt, max_records)
        plaintexts, nbytes = encode_records(values, NOW)
    except IngestError as exc:
        return ("error", exc.status, exc.error)
    return plaintexts, nbytes, record_span(values)


def fast(body: bytes, fmt: str, max_records: int = 1000, module: ModuleType | None = None) -> Any:
    if module is None:
        return encode_body(body, fmt, NOW, max_records)
    if fmt == "ndjson" and body.count(b"\n") + (not body.endswith(b"\n")) > max_records:
        return None
    return module.encode_json(body, fmt == "ndjson", NOW, max_records, MAX_NODE_ID_CHARS)


# -- records in the subset the one-pass reader takes (as sensors send them) --

plain_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=16)
# Decimals as sensors send them: up to 15 significant digits, in orjson's positional range.
decimals = st.builds(lambda whole, frac: float(f"{whole}.{frac}"), st.integers(0, 10**9),
                     st.integers(0, 99999).map(lambda f: str(f).rstrip("0") or "0"))
plain_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**18) + 1, 10**18 - 1), plain_text, decimals,
                          st.floats(min_value=1e-4, max_value=1e14).map(lambda f: float(f"{f:.6g}")))
plain_values = st.recursive(plain_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(plain_text, inner, max_size=4)), max_leaves=10)


@st.composite
def plain_records(draw: st.DrawFn) -> dict[str, Any]:
    record = draw(st.dictionaries(plain_text.filter(lambda k: k not in ("node_id", "ts")), plain_values, max_size=6))
    record["node_id"] = draw(plain_text.filter(lambda t: 0 < len(t) <= MAX_NODE_ID_CHARS))
    if draw(st.booleans()):
        record["ts"] = draw(st.one_of(decimals, st.integers(0, 2**40)))
    return record


# -- generated bodies: anything JSON can hold, written several ways --

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["", "a b", "x\"y", "back\\slash", "é", "\u2028", "\x7f", "\x00"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)
node_ids = st.one_of(st.text(min_size=0, max_size=4), st.sampled_from(["n1", "n2", "x" * 128, "x" * 129, "é"]),
                     st.integers(), st.none())
stamps = st.one_of(st.integers(-(2**64), 2**64), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                   st.text(max_size=3), st.none())


@st.composite
def records(draw: st.DrawFn) -> Any:
    record: dict[str, Any] = draw(st.dictionaries(st.text(max_size=6), values, max_size=5))
    if draw(st.booleans()):
        record["node_id"] = draw(node_ids) if draw(st.integers(0, 9)) == 0 else draw(st.sampled_from(["n1", "n2"]))
    if draw(st.booleans()):
        record["ts"] = draw(stamps)
    return record if draw(st.integers(0, 19)) else draw(values)  # now and then not an object at all


def written(draw: st.DrawFn, value: Any) -> bytes:
    """`value` as JSON: compact (as orjson writes it), or spaced or indented by the stdlib."""
    how = draw(st.sampled_from(["orjson", "spaced", "indented"]))
    if how == "orjson":
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:  # wider than 64 bits
            how = "spaced"
    return json.dumps(value, indent=2 if how == "indented" else None, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    # Half of them in the subset, so that near misses (one byte changed) are tried often.
    recs = draw(st.lists(st.one_of(plain_records(), records()), min_size=0, max_size=5))
    fmt = draw(st.sampled_from(["json", "json-object", "ndjson"]))
    if fmt == "ndjson":
        lines = [orjson.dumps(r) if draw(st.booleans()) else json.dumps(r).encode() for r in recs
                 if _fits_orjson(r)]
        end = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
        body = end.join(lines) + draw(st.sampled_from([b"", end, b"  "]))
    else:
        body = written(draw, recs[0] if fmt == "json-object" and recs else recs)
        fmt = "json"
    if draw(st.integers(0, 3)) == 0 and body:  # a byte changed, cut or added somewhere
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.sampled_from([b"", b",", b"}", b"0", b" ", b'"', b"-", b"."])) + body[at + 1:]
    return body, fmt


def _fits_orjson(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


@settings(SETTINGS, max_examples=600)
@given(body=bodies())
def test_whatever_it_takes_it_reads_as_the_orjson_path_does(body: tuple[bytes, str]) -> None:
    data, fmt = body
    got = fast(data, fmt, module=compiled_speedups())
    if got is not None:
        assert got == reference(data, fmt)
        assert [type(p) for p in got[0]] == [bytes] * len(got[0])


# -- bodies in the subset: they must be read in one pass, and equal the orjson path --


@SETTINGS
@given(recs=st.lists(plain_records(), min_size=1, max_size=8), how=st.sampled_from(["array", "object", "ndjson",
                                                                                       "spaced"]))
def test_canonical_bodies_are_read_in_one_pass(recs: list[dict[str, Any]], how: str) -> None:
    if how == "ndjson":
        data, fmt = b"\n".join(orjson.dumps(r) for r in recs) + b"\n", "ndjson"
    elif how == "object":
        data, fmt = orjson.dumps(recs[0]), "json"
    else:
        data, fmt = (orjson.dumps(recs) if how == "array" else json.dumps(recs, indent=1).encode()), "json"
    got = fast(data, fmt, module=compiled_speedups())
    assert got is not None, data
    assert got == reference(data, fmt)


def test_the_benchmark_records_take_the_one_pass_reader() -> None:
    compiled_speedups()
    rec = {"node_id": "greenhouse-00001", "ts": 1767225601.25, "temp_c": 21.53, "rh": 43, "co2_ppm": 612,
           "bat_v": 3.7, "fw": "2.4.1", "status": "ok", "pos": [52.5, -0.0001], "ok": True, "err": None}
    for data, fmt in ((orjson.dumps(rec), "json"), (orjson.dumps([rec] * 100), "json"),
                      (orjson.dumps(rec) + b"\r\n\n" + orjson.dumps(rec), "ndjson")):
        got = encode_body(data, fmt, NOW)
        assert got is not None and got == reference(data, fmt)


def test_a_missing_ts_is_the_receive_time_appended_as_orjson_writes_it() -> None:
    compiled_speedups()
    got = encode_body(b'[ {"node_id" : "a",\n "v": [1, {"k": "a b"}] }, {"ts":5,"node_id":"b"} ]', "json", NOW)
    assert got is not None
    assert got[0] == [b'{"node_id":"a","v":[1,{"k":"a b"}],"ts":1800000000.25}', b'{"ts":5,"node_id":"b"}']
    assert got[1] == sum(map(len, got[0])) and got[2] == (5.0, NOW, {"a", "b"})


@pytest.mark.parametrize("data", [
    pytest.param(b'{"node_id":"a","node_id":"b"}', id="duplicate-key"),  # orjson keeps the last: b
    pytest.param(b'{"node_id":"a","x":{"k":1,"k":2}}', id="nested-duplicate-key"),
    pytest.param(b'{"node_id":"a","v":-0}', id="minus-zero"),  # orjson writes 0
    pytest.param(b'{"node_id":"a","v":1.50}', id="trailing-zero"),
    pytest.param(b'{"node_id":"a","v":1e5}', id="exponent"),
    pytest.param(b'{"node_id":"a","v":0.00001}', id="below-1e-4"),
    pytest.param(b'{"node_id":"a","v":1234567890123456.5}', id="16-digits"),
    pytest.param(b'{"node_id":"a","v":1234567890123456789}', id="19-digit-int"),
    pytest.param(b'{"node_id":"a","v":"caf\\u00e9"}', id="escape"),
    pytest.param('{"node_id":"a","v":"café"}'.encode(), id="non-ascii"),
    pytest.param(b'{"node_id":"a","v":' + b"[" * 17 + b"]" * 17 + b"}", id="deep"),
    pytest.param(b'{"node_id":"a",' + b",".join(b'"k%d":1' % i for i in range(64)) + b"}", id="65-keys"),
    pytest.param(b'{"v":1}', id="no-node-id"),
    pytest.param(b'{"node_id":"a","ts":true}', id="ts-bool"),
    pytest.param(b'{"node_id":"a","ts":"1"}', id="ts-string"),
    pytest.param(b'{"node_id":""}', id="empty-node-id"),
    pytest.param(b'{"node_id":"' + b"x" * 129 + b'"}', id="long-node-id"),
    pytest.param(b'{"node_id":"a"} x', id="trailing-bytes"),
    pytest.param(b'[{"node_id":"a"},]', id="trailing-comma"),
    pytest.param(b"[]", id="empty-array"),
    pytest.param(b'[{"node_id":"a"},1]', id="not-an-object"),
    pytest.param(b'{"node_id":"a","v":01}', id="leading-zero"),
    pytest.param(b'{"node_id":"a","v":1.}', id="bare-point"),
    pytest.param(b'{"node_id":"a","v":tru}', id="cut-literal"),
    pytest.param(b'{"node_id":"a"', id="cut"),
])
def test_declined_bodies_go_the_orjson_way(data: bytes) -> None:
    compiled_speedups()
    assert encode_body(data, "json", NOW) is None


def test_record_and_line_limits_decline_for_the_413() -> None:
    compiled_speedups()
    assert encode_body(b'[{"node_id":"a"},{"node_id":"a"}]', "json", NOW, max_records=1) is None
    assert encode_body(b'{"node_id":"a"}\n\n\n', "ndjson", NOW, max_records=2) is None  # blank lines count
    assert reference(b'{"node_id":"a"}\n\n\n', "ndjson", 2) == ("error", 413, "too_many_records")
    assert encode_body(b'{"node_id":"a"}\n{"node_id":"b"}', "ndjson", NOW, max_records=2) is not None


def test_the_twin_declines_every_body() -> None:
    twin = speedups_module("pure-python")
    assert twin.encode_json(orjson.dumps({"node_id": "a"}), False, NOW, 10, MAX_NODE_ID_CHARS) is None
