"""TokenBucket and BatchFramer, run against both `_speedups` implementations (compiled and twin)."""

from __future__ import annotations

import base64
import gc
import json
import math
import os
import struct
import threading
import zlib
from types import ModuleType

import orjson
import pytest
from conftest import StartServer, run_cli
from cryptography.fernet import Fernet, MultiFernet

from telemetry_sink import speedups
from telemetry_sink.segment_format import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    FILE_HEADER_BYTES,
    Batch,
    frame_batch,
    iter_batches,
)
from telemetry_sink.testing import compiled_speedups, speedups_module

SIGNING_KEY = bytes(range(16))
ENCRYPTION_KEY = bytes(range(100, 116))
FERNET = Fernet(base64.urlsafe_b64encode(SIGNING_KEY + ENCRYPTION_KEY))


def _parse(batch: bytes) -> Batch:
    """Parse one framed batch with the reference reader; fail unless it is one intact batch."""
    found = list(iter_batches(FILE_HEADER_BYTES + batch))
    assert len(found) == 1
    (parsed,) = found
    assert isinstance(parsed, Batch), parsed
    assert parsed.end == len(FILE_HEADER_BYTES) + len(batch)
    return parsed


def _raw(token: bytes) -> bytes:
    """Decoded Fernet token; also checks it is canonical padded URL-safe base64."""
    raw = base64.urlsafe_b64decode(token)
    assert base64.urlsafe_b64encode(raw) == token
    return raw


def _iv(token: bytes) -> bytes:
    return _raw(token)[9:25]


def test_extension_really_loaded() -> None:
    """Unless disabled on purpose, the compiled extension must be the one in use."""
    if os.environ.get("TELEMETRY_SINK_NO_EXTENSIONS"):
        assert speedups.IMPLEMENTATION == "pure-python"
    else:
        assert speedups.IMPLEMENTATION == "compiled", "telemetry_sink._speedups did not load"


def test_twin_is_a_startup_warning_and_info_says_how_to_compile(start_server: StartServer) -> None:
    """With the twin in use `serve` logs its start line at WARNING with the reason and the remedy,
    and `info` prints them (the not-built case: tests/test_setup.py)."""
    env = {"TELEMETRY_SINK_NO_EXTENSIONS": "1"}
    server = start_server(env=env, args=("--log-format", "json"), separate_stderr=True)
    server.stop()
    lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    (startup,) = [line for line in lines if line.get("event") == "startup"]
    assert startup["level"] == "warning" and startup["implementation"] == "pure-python", startup
    assert "TELEMETRY_SINK_NO_EXTENSIONS is set; to get the compiled path: unset" in startup["msg"], startup
    rows = dict(line.split(": ", 1) for line in run_cli("info", env=env, check=True).stdout.decode().splitlines())
    assert rows["implementation"] == "pure-python"
    assert rows["compiled_path"].startswith("not in use: TELEMETRY_SINK_NO_EXTENSIONS is set"), rows


def test_implementation_names(speedups_impl: ModuleType) -> None:
    assert speedups_impl.IMPLEMENTATION in {"compiled", "pure-python"}
    if speedups_impl.IMPLEMENTATION == "compiled":
        assert speedups_impl.OPENSSL_VERSION.startswith("OpenSSL 3")


# --- TokenBucket -------------------------------------------------------------------------
# Rates, capacities and times are binary fractions so every expected value is exact.


def test_bucket_starts_full(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(4, 10, 100.0)
    assert (bucket.rate, bucket.capacity, bucket.tokens) == (4.0, 10.0, 10.0)
    assert all(type(v) is float for v in (bucket.rate, bucket.capacity, bucket.tokens))


@pytest.mark.parametrize(("rate", "capacity"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 5.0), (5.0, -0.5)])
def test_bucket_rejects_non_positive(speedups_impl: ModuleType, rate: float, capacity: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        speedups_impl.TokenBucket(rate, capacity, 0.0)


def test_bucket_refill_is_exact_and_capped(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(4.0, 10.0, 100.0)
    assert bucket.try_acquire(10.0, 100.0)
    assert bucket.tokens == 0.0
    bucket.refill(101.25)
    assert bucket.tokens == 5.0
    bucket.refill(101.5)
    assert bucket.tokens == 6.0
    bucket.refill(1000.0)  # would be thousands of tokens: capped
    assert bucket.tokens == 10.0


def test_bucket_try_acquire(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(2.0, 5.0, 0.0)
    assert bucket.try_acquire(3.0, 0.0) is True
    assert bucket.tokens == 2.0
    assert bucket.try_acquire(2.5, 0.0) is False
    assert bucket.tokens == 2.0  # a refusal takes nothing
    assert bucket.try_acquire(2.5, 0.25) is True  # 2.0 + 0.25 * 2.0 = 2.5
    assert bucket.tokens == 0.0
    assert bucket.try_acquire(0.5, 0.25) is False


def test_bucket_time_never_runs_backwards(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(1.0, 8.0, 10.0)
    assert bucket.try_acquire(8.0, 10.0)
    bucket.refill(5.0)  # clock stepped back: no refill, and the reference time stays at 10
    assert bucket.tokens == 0.0
    assert bucket.try_acquire(1.0, 9.0) is False
    bucket.refill(12.0)  # counted from 10, not from 5 or 9
    assert bucket.tokens == 2.0


def test_bucket_time_until_available(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(4.0, 8.0, 0.0)
    assert bucket.time_until_available(8.0, 0.0) == 0.0
    assert bucket.try_acquire(8.0, 0.0)
    assert bucket.time_until_available(2.0, 0.0) == 0.5
    assert bucket.time_until_available(2.0, 0.25) == 0.25  # refilled 1.0 meanwhile
    assert bucket.tokens == 1.0  # it refills but takes nothing
    assert bucket.time_until_available(1.0, 0.25) == 0.0
    wait = bucket.time_until_available(8.5, 0.25)  # more than capacity: never
    assert math.isinf(wait) and wait > 0


def test_bucket_reserve_debt_is_fifo(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(2.0, 4.0, 0.0)
    assert bucket.reserve(4.0, 0.0, 10.0) == 0.0
    assert bucket.tokens == 0.0
    # Each later caller waits behind the debt of the ones before it.
    assert bucket.reserve(2.0, 0.0, 10.0) == 1.0
    assert bucket.tokens == -2.0
    assert bucket.reserve(2.0, 0.0, 10.0) == 2.0
    assert bucket.tokens == -4.0
    assert bucket.reserve(1.0, 0.5, 10.0) == 2.0  # -4 + 1 = -3 at t=0.5; needs 4 more
    assert bucket.tokens == -4.0
    bucket.refill(3.0)
    assert bucket.tokens == 1.0


def test_bucket_reserve_rejection_takes_nothing(speedups_impl: ModuleType) -> None:
    bucket = speedups_impl.TokenBucket(2.0, 4.0, 0.0)
    assert bucket.reserve(4.0, 0.0, 0.0) == 0.0
    assert bucket.reserve(2.0, 0.0, 0.75) == -1.0  # needs 1.0 s
    assert bucket.tokens == 0.0
    assert bucket.reserve(2.0, 0.0, 1.0) == 1.0  # a wait equal to max_wait is accepted
    assert bucket.tokens == -2.0
    assert bucket.reserve(4.5, 0.0, 1e9) == -1.0  # over capacity: inf wait, always refused
    assert bucket.tokens == -2.0


def test_bucket_twins_agree_exactly() -> None:
    """Same script, same floats (bit for bit) from both implementations."""
    compiled, twin = compiled_speedups(), speedups_module("pure-python")
    a = compiled.TokenBucket(3.7, 11.3, 0.1)
    b = twin.TokenBucket(3.7, 11.3, 0.1)
    now = 0.1
    for step in range(2000):
        now += (step % 7) * 0.013 - 0.01  # includes small backward steps
        n = ((step * 31) % 17) / 3.0
        op = step % 4
        if op == 0:
            assert a.try_acquire(n, now) == b.try_acquire(n, now)
        elif op == 1:
            assert a.time_until_available(n, now) == b.time_until_available(n, now)
        elif op == 2:
            assert a.reserve(n, now, 0.7) == b.reserve(n, now, 0.7)
        else:
            a.refill(now)
            b.refill(now)
        assert (a.tokens, a.updated) == (b.tokens, b.updated)


# --- BatchFramer -------------------------------------------------------------------------

RECORDS = [
    b"",
    b"x",
    b"a" * 15,
    b"b" * 16,
    b"c" * 17,
    '{"msg": "h\u00e9llo \u2603 \U0001f600", "n": 1}'.encode(),
    os.urandom(150),
    os.urandom(1024),
    os.urandom(70_000),
]


def test_frame_round_trip(speedups_impl: ModuleType) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    created_ms = 1_700_000_123_456
    batch = framer.frame(42, created_ms, RECORDS)
    assert isinstance(batch, bytes)
    parsed = _parse(batch)
    assert (parsed.first_seq, parsed.count, parsed.created_ms) == (42, len(RECORDS), created_ms)
    # The CRC is over the body, as the header says (iter_batches checked it too).
    _magic, length, crc = BATCH_HEADER.unpack_from(batch)
    assert length == len(batch) - BATCH_HEADER_SIZE
    assert crc == zlib.crc32(batch[BATCH_HEADER_SIZE:])

    other = Fernet(Fernet.generate_key())
    multi = MultiFernet([other, FERNET])
    for record, token in zip(RECORDS, parsed.tokens, strict=True):
        assert FERNET.decrypt(token) == record
        assert multi.decrypt(token) == record
        assert FERNET.extract_timestamp(token) == created_ms // 1000
        raw = _raw(token)
        assert raw[0] == 0x80
        assert b"\n" not in token and len(token) % 4 == 0


def test_frame_round_trip_via_selected_module() -> None:
    """The module the server actually uses (compiled unless disabled) round-trips too."""
    batch = speedups.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(0, 999, [b"hello"])
    assert [FERNET.decrypt(t) for t in _parse(batch).tokens] == [b"hello"]


@pytest.mark.parametrize(("first_seq", "created_ms"), [(0, 0), (2**64 - 1, 2**64 - 1), (123, 999), (1 << 40, 1_000)])
def test_frame_header_extremes(speedups_impl: ModuleType, first_seq: int, created_ms: int) -> None:
    batch = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(first_seq, created_ms, [b"r"])
    parsed = _parse(batch)
    assert (parsed.first_seq, parsed.created_ms) == (first_seq, created_ms)
    token = parsed.tokens[0]
    assert struct.unpack(">Q", _raw(token)[1:9])[0] == created_ms // 1000
    assert FERNET.decrypt(token) == b"r"


@pytest.mark.parametrize(("first_seq", "created_ms"), [(-1, 0), (0, -1000), (2**64, 0), (0, 2**64)])
def test_frame_rejects_out_of_range_header(speedups_impl: ModuleType, first_seq: int, created_ms: int) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    # Twin: struct.error from packing; compiled: OverflowError converting to uint64.
    with pytest.raises((OverflowError, struct.error)):
        framer.frame(first_seq, created_ms, [b"r"])


def test_frame_empty_batch(speedups_impl: ModuleType) -> None:
    batch = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(7, 5_000, [])
    # Nothing random in an empty batch: byte-identical to the reference framing.
    assert batch == frame_batch(7, 5_000, [])
    parsed = _parse(batch)
    assert (parsed.first_seq, parsed.count, parsed.created_ms, parsed.tokens) == (7, 0, 5_000, [])


def test_frame_accepts_tuples_and_bytes_subclasses(speedups_impl: ModuleType) -> None:
    class Sub(bytes):
        pass

    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    tokens = _parse(framer.frame(1, 2, (b"a", Sub(b"b")))).tokens
    assert [FERNET.decrypt(t) for t in tokens] == [b"a", b"b"]


def test_ivs_distinct_within_and_across_calls(speedups_impl: ModuleType) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    records = [b"same record"] * 500
    ivs: list[bytes] = []
    tokens: list[bytes] = []
    for _ in range(4):
        batch_tokens = _parse(framer.frame(0, 1_000, records)).tokens
        tokens += batch_tokens
        ivs += [_iv(t) for t in batch_tokens]
    second = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    ivs += [_iv(t) for t in _parse(second.frame(0, 1_000, records)).tokens]
    assert len(set(ivs)) == len(ivs) == 2500
    assert len(set(tokens)) == len(tokens)  # same plaintext, never the same token


@pytest.mark.parametrize(("signing", "encryption"), [(15, 16), (16, 17), (0, 16), (32, 0), (16, 32)])
def test_bad_key_lengths(speedups_impl: ModuleType, signing: int, encryption: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        speedups_impl.BatchFramer(b"k" * signing, b"e" * encryption)


def test_str_keys_rejected(speedups_impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        speedups_impl.BatchFramer("k" * 16, "e" * 16)


@pytest.mark.parametrize("bad", ["text", bytearray(b"ba"), memoryview(b"mv"), 7, None], ids=lambda v: type(v).__name__)
def test_non_bytes_records_raise_type_error(speedups_impl: ModuleType, bad: object) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    with pytest.raises(TypeError):
        framer.frame(0, 0, [b"fine", bad])
    # The framer is still usable afterwards.
    assert [FERNET.decrypt(t) for t in _parse(framer.frame(0, 0, [b"ok"])).tokens] == [b"ok"]


def test_frame_many_refuses_before_framing_anything(speedups_impl: ModuleType) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    with pytest.raises(TypeError):
        framer.frame_many(0, 0, [[b"fine"], [b"fine", "text"]])
    # The second batch would start past the last sequence number (twin: struct.error from packing).
    with pytest.raises((OverflowError, struct.error)):
        framer.frame_many(2**64 - 2, 0, [[b"a", b"b"], [b"c"]])
    # Up to the last one is fine, and the framer is still usable after both refusals.
    last = list(iter_batches(FILE_HEADER_BYTES + framer.frame_many(2**64 - 3, 0, [[b"a", b"b"], [b"c"]])))[-1]
    assert isinstance(last, Batch) and last.first_seq == 2**64 - 1
    assert [FERNET.decrypt(t) for t in last.tokens] == [b"c"]


def test_non_sequence_records_raise_type_error(speedups_impl: ModuleType) -> None:
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    with pytest.raises(TypeError):
        framer.frame(0, 0, None)


def test_repr_hides_keys(speedups_impl: ModuleType) -> None:
    text = repr(speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY))
    for key in (SIGNING_KEY, ENCRYPTION_KEY):
        assert key.hex() not in text and repr(key) not in text


def test_one_framer_per_thread(speedups_impl: ModuleType) -> None:
    """Framers on different threads run at once (the compiled one without the GIL)."""
    results: dict[int, list[bytes]] = {}

    def work(index: int) -> None:
        framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
        out: list[bytes] = []
        for seq in range(20):
            out += _parse(framer.frame(seq, 1, [b"%d-%d" % (index, seq)] * 50)).tokens
        results[index] = out

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for index, tokens in results.items():
        assert {FERNET.decrypt(t) for t in tokens} == {b"%d-%d" % (index, s) for s in range(20)}
    assert len(results) == 4


def test_shared_framer_misuse_is_safe(speedups_impl: ModuleType) -> None:
    """Two threads on ONE framer (documented misuse): the compiled one may refuse with
    RuntimeError, but nothing may ever come out corrupt."""
    framer = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    records = [b"r" * 150] * 1000
    outputs: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        for seq in range(10):
            try:
                outputs.append(framer.frame(seq, 1, records))
            except RuntimeError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outputs) + len(errors) == 20
    assert all("two threads" in str(e) for e in errors)
    for batch in outputs:
        assert {FERNET.decrypt(t) for t in _parse(batch).tokens} == {b"r" * 150}


def test_compiled_and_twin_same_structure() -> None:
    """Same input: same header fields and token lengths, and both decrypt to the input."""
    compiled, twin = compiled_speedups(), speedups_module("pure-python")
    records = [*RECORDS, *(os.urandom(n) for n in range(0, 100))]
    a = _parse(compiled.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(9, 86_400_123, records))
    b = _parse(twin.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(9, 86_400_123, records))
    assert (a.first_seq, a.count, a.created_ms, a.end) == (b.first_seq, b.count, b.created_ms, b.end)
    assert [len(t) for t in a.tokens] == [len(t) for t in b.tokens]
    # Everything but IV, ciphertext and MAC (version byte and timestamp) is identical.
    assert [_raw(t)[:9] for t in a.tokens] == [_raw(t)[:9] for t in b.tokens]
    assert [FERNET.decrypt(t) for t in a.tokens] == [FERNET.decrypt(t) for t in b.tokens] == records


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_compiled_framer_memory_is_flat() -> None:
    """~1M records through one framer (and 50k tiny batches) must not grow RSS: no C leaks."""
    compiled = compiled_speedups()
    framer = compiled.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY)
    records = [os.urandom(150) for _ in range(1000)]
    one = [records[0]]

    def run(batches: int, recs: list[bytes]) -> None:
        for seq in range(batches):
            framer.frame(seq, 1_000, recs)

    # Warm-up: let malloc arenas, OpenSSL's per-thread state and pymalloc settle first.
    run(50, records)
    run(5_000, one)
    gc.collect()
    before = _rss_bytes()
    run(1_000, records)  # a per-record leak of even 8 bytes would show as 8 MB
    gc.collect()
    after_big = _rss_bytes()
    run(50_000, one)  # a per-call leak (context, scratch, result) of 100+ bytes shows as 5 MB
    gc.collect()
    after_small = _rss_bytes()
    slack = 4 << 20
    assert after_big - before < slack, f"RSS grew {(after_big - before) >> 10} KiB over 1M records"
    assert after_small - after_big < slack, f"RSS grew {(after_small - after_big) >> 10} KiB over 50k calls"


def test_compiled_framer_without_init_refuses() -> None:
    compiled = compiled_speedups()
    framer = compiled.BatchFramer.__new__(compiled.BatchFramer)
    with pytest.raises(RuntimeError, match="__init__"):
        framer.frame(0, 0, [b"x"])


# -- records of one request: check_records / dump_records, both implementations --

RECORDS_CASES = [
    [{"node_id": "a", "ts": 1, "v": 1.5}],
    [{"node_id": "a", "s": 'q"u,o}te\\', "t": "\\"}, {"node_id": "b", "n": [1, {"a": [2, "]"]}], "e": "[{\""}],
    [{"node_id": "c", "u": "é\x00\u2028", "empty": {}, "list": []}, {"node_id": "d" * 128, "ts": 2.5}],
]


@pytest.mark.parametrize("values", RECORDS_CASES)
def test_dump_records_is_orjson_dumps_of_each_record(speedups_impl: ModuleType,
                                                     values: list[dict[str, object]]) -> None:
    out = speedups_impl.dump_records(values)
    assert out == [orjson.dumps(v) for v in values]
    assert all(type(b) is bytes for b in out)
    assert speedups_impl.dump_records([]) == []


@pytest.mark.parametrize(("values", "bad"), [
    ([{"node_id": "a"}, {"node_id": "b", "ts": 3}], -1),
    ([{"node_id": "a"}, "not a dict"], 1),
    ([{"node_id": ""}], 0),
    ([{"node_id": "x" * 129}], 0),
    ([{"node_id": "ok"}, {"node_id": 5}], 1),
    ([{"node_id": "ok"}, {"nodeid": "x"}], 1),
    ([{"node_id": "ok", "ts": True}], 0),
    ([{"node_id": "ok", "ts": "1"}], 0),
    ([{"node_id": "ok", "ts": None}], 0),
])
def test_check_records_finds_the_first_invalid_record_and_adds_ts(speedups_impl: ModuleType,
                                                                  values: list[object], bad: int) -> None:
    assert speedups_impl.check_records(values, 7.5, 128) == bad
    if bad == -1:
        assert values == [{"node_id": "a", "ts": 7.5}, {"node_id": "b", "ts": 3}]
