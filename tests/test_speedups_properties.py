"""Hypothesis properties of both `_speedups` implementations: framing round-trips, twins agree."""

from __future__ import annotations

import base64
import json
import random
import zlib
from types import ModuleType

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_sink.segment_format import BATCH_HEADER, BATCH_HEADER_SIZE, FILE_HEADER_BYTES, Batch, iter_batches
from telemetry_sink.testing import compiled_speedups, speedups_module

SIGNING_KEY = bytes(range(16))
ENCRYPTION_KEY = bytes(range(200, 216))
FERNET = Fernet(base64.urlsafe_b64encode(SIGNING_KEY + ENCRYPTION_KEY))

# speedups_impl is function-scoped but only hands back a module, so sharing it across
# examples is safe. Big records make some examples slow on purpose: no deadline.
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_records = st.builds(
    lambda value: json.dumps(value, ensure_ascii=False).encode(),
    st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=False))),
)
# Big records come from a seeded PRNG: hypothesis would take ages to draw 1 MiB itself.
big_records = st.builds(
    lambda size, seed: random.Random(seed).randbytes(size),
    st.integers(0, 1 << 20),
    st.integers(0, 2**32),
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[bytes]:
    """A mix of drawn small records, a few huge ones and a bulk of up to 3000 generated ones."""
    records = draw(st.lists(st.one_of(st.binary(max_size=300), json_records), max_size=40))
    records += draw(st.lists(big_records, max_size=2))
    bulk, size, seed = draw(st.integers(0, 3000)), draw(st.integers(0, 1100)), draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    records += [rng.randbytes(rng.randint(0, size)) for _ in range(bulk)]
    random.Random(seed).shuffle(records)
    return records


def _parse(batch: bytes) -> Batch:
    found = list(iter_batches(FILE_HEADER_BYTES + batch))
    assert len(found) == 1 and isinstance(found[0], Batch), found
    return found[0]


@settings(SETTINGS, max_examples=50)
@given(records=record_lists(), first_seq=st.integers(0, 2**64 - 1), created_ms=st.integers(0, 2**64 - 1))
def test_frame_round_trips(speedups_impl: ModuleType, records: list[bytes], first_seq: int, created_ms: int) -> None:
    batch = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(first_seq, created_ms, records)
    _magic, length, crc = BATCH_HEADER.unpack_from(batch)
    assert length == len(batch) - BATCH_HEADER_SIZE
    assert crc == zlib.crc32(batch[BATCH_HEADER_SIZE:])
    parsed = _parse(batch)
    assert (parsed.first_seq, parsed.count, parsed.created_ms) == (first_seq, len(records), created_ms)
    for record, token in zip(records, parsed.tokens, strict=True):
        assert FERNET.decrypt(token) == record
    if parsed.tokens:
        assert FERNET.extract_timestamp(parsed.tokens[-1]) == created_ms // 1000


@settings(SETTINGS, max_examples=30)
@given(records=record_lists(), first_seq=st.integers(0, 2**64 - 1), created_ms=st.integers(0, 2**64 - 1))
def test_twins_parse_identically(records: list[bytes], first_seq: int, created_ms: int) -> None:
    """Compiled and twin agree on everything except the random IVs (and so ciphertext and MAC)."""
    compiled = compiled_speedups()
    twin = speedups_module("pure-python")
    a = _parse(compiled.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(first_seq, created_ms, records))
    b = _parse(twin.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame(first_seq, created_ms, records))
    assert (a.first_seq, a.count, a.created_ms, a.end) == (b.first_seq, b.count, b.created_ms, b.end)
    assert [len(t) for t in a.tokens] == [len(t) for t in b.tokens]
    a_raw = [base64.urlsafe_b64decode(t) for t in a.tokens]
    b_raw = [base64.urlsafe_b64decode(t) for t in b.tokens]
    assert [r[:9] for r in a_raw] == [r[:9] for r in b_raw]  # version byte + timestamp
    assert [FERNET.decrypt(t) for t in a.tokens] == records


@settings(SETTINGS, max_examples=60)
@given(batches=st.lists(st.lists(st.one_of(st.binary(max_size=300), json_records), max_size=30), max_size=6),
       first_seq=st.integers(0, 2**63), created_ms=st.integers(0, 2**64 - 1))
def test_frame_many_is_the_frames_back_to_back(speedups_impl: ModuleType, batches: list[list[bytes]], first_seq: int,
                                                created_ms: int) -> None:
    data = speedups_impl.BatchFramer(SIGNING_KEY, ENCRYPTION_KEY).frame_many(first_seq, created_ms, batches)
    found = list(iter_batches(FILE_HEADER_BYTES + data))
    assert all(isinstance(b, Batch) for b in found) and len(found) == len(batches)
    seq = first_seq
    for records, parsed in zip(batches, found, strict=True):
        assert isinstance(parsed, Batch)
        assert (parsed.first_seq, parsed.count, parsed.created_ms) == (seq, len(records), created_ms)
        assert [FERNET.decrypt(t) for t in parsed.tokens] == records
        seq += len(records)
    assert found[-1].end == len(FILE_HEADER_BYTES) + len(data) if found else data == b""


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
ops = st.lists(
    st.tuples(st.sampled_from(["refill", "try_acquire", "time_until_available", "reserve"]), finite, finite, finite),
    max_size=60,
)


@settings(SETTINGS, max_examples=200)
@given(
    rate=st.floats(min_value=1e-3, max_value=1e6),
    capacity=st.floats(min_value=1e-3, max_value=1e9),
    start=finite,
    script=ops,
)
def test_token_buckets_agree_bit_for_bit(
    rate: float, capacity: float, start: float, script: list[tuple[str, float, float, float]]
) -> None:
    compiled = compiled_speedups()
    twin = speedups_module("pure-python")
    a = compiled.TokenBucket(rate, capacity, start)
    b = twin.TokenBucket(rate, capacity, start)
    for name, n, now, max_wait in script:
        if name == "refill":
            assert a.refill(now) is b.refill(now) is None
        elif name == "reserve":
            assert a.reserve(n, now, max_wait) == b.reserve(n, now, max_wait)
        else:
            assert getattr(a, name)(n, now) == getattr(b, name)(n, now)
        assert (a.tokens, a.updated, a.rate, a.capacity) == (b.tokens, b.updated, b.rate, b.capacity)


token_layouts = st.lists(st.binary(max_size=40), max_size=30).map(
    lambda tokens: b"".join(len(t).to_bytes(4, "big") + t for t in tokens))


@settings(SETTINGS, max_examples=300)
@given(layout=token_layouts, junk=st.binary(max_size=12), pos=st.integers(0, 16), count=st.integers(0, 40),
       cut=st.integers(0, 16))
def test_token_scan_and_split_twins_agree(layout: bytes, junk: bytes, pos: int, count: int, cut: int) -> None:
    """scan_tokens and split_tokens: compiled and twin agree on every buffer, well laid out or not,
    and on bytes and a memoryview alike; split gives back exactly the scanned tokens."""
    compiled, twin = compiled_speedups(), speedups_module("pure-python")
    buf = junk[:pos] + layout + junk
    end = max(0, len(buf) - cut)
    for view in (buf, memoryview(buf)):
        results = []
        for impl in (compiled, twin):
            try:
                results.append(impl.scan_tokens(view, pos, end, count))
            except ValueError:
                results.append("ValueError")
        assert results[0] == results[1]
        scanned = results[0]
        if isinstance(scanned, int) and scanned >= 0:
            tokens, after = compiled.split_tokens(view, pos, count)
            assert (tokens, after) == twin.split_tokens(view, pos, count)
            assert after == scanned and all(type(t) is bytes for t in tokens) and len(tokens) == count


def test_token_functions_refuse_ranges_outside_the_buffer(speedups_impl: ModuleType) -> None:
    buf = (3).to_bytes(4, "big") + b"abc"
    assert speedups_impl.scan_tokens(buf, 0, len(buf), 1) == len(buf)
    assert speedups_impl.scan_tokens(buf, 0, len(buf) - 1, 1) == -2
    assert speedups_impl.scan_tokens(buf, 0, 3, 1) == -1
    assert speedups_impl.split_tokens(buf, 0, 1) == ([b"abc"], 7)
    for bad in ((buf, 0, len(buf) + 1, 1), (buf, -1, 4, 1), (buf, 0, 4, -1)):
        with pytest.raises(ValueError):
            speedups_impl.scan_tokens(*bad)
    with pytest.raises(ValueError):
        speedups_impl.split_tokens(buf[:-1], 0, 1)
    with pytest.raises(ValueError):
        speedups_impl.split_tokens(buf, 4, 1)


def _longest_digit_run(data: bytes) -> int:
    longest = current = 0
    for byte in data:
        current = current + 1 if 0x30 <= byte <= 0x39 else 0
        longest = max(longest, current)
    return longest


digit_texts = st.lists(st.one_of(st.sampled_from([b"0", b"7", b"9", b"/", b":", b" ", b"a", b"."]),
                                 st.integers(0, 30).map(lambda n: b"5" * n)), max_size=80).map(b"".join)


@settings(SETTINGS, max_examples=400)
@given(text=digit_texts, run=st.integers(1, 25))
def test_digit_run_twins_agree_with_the_longest_run(text: bytes, run: int) -> None:
    """has_digit_run, compiled and twin, says whether the longest run of ASCII digits reaches `run`
    (the neighbours of '0' and '9', '/' and ':', are no digits)."""
    compiled, twin = compiled_speedups(), speedups_module("pure-python")
    expected = _longest_digit_run(text) >= run
    for impl in (compiled, twin):
        assert impl.has_digit_run(text, run) is expected


def test_digit_run_refuses_a_run_below_one(speedups_impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        speedups_impl.has_digit_run(b"123", 0)


_GOOD_NAMES = [b"Host", b"content-type", b"X-Node", b"Connection", b"Authorization", b"a", b"X", b"X!#$%&'*+-.^_`|~9"]
_GOOD_VALUES = [b"x", b"application/json", b"keep-alive", b"Close", b"a b\tc", b"", b"a:b", b"5"]
_ODD_NAMES = [b"Content-Length", b"Transfer-Encoding", b"Expect", b"Upgrade", b"Proxy-Connection", b"Content-Encoding",
              b"Bad Name", b"Bad\x7fName", b"", b"Caf\xc3\xa9"]
_ODD_VALUES = [b"close, upgrade", b" padded", b"trailing ", b"tab\t", b"caf\xc3\xa9", b"ctl\x01", b"05", b"-1", b"1 2",
               b"99999999999", b"chunked", b"100-continue", b"gzip"]


def _mostly(good: list[bytes], odd: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of `good`, or one of `odd` about one time in eight."""
    return st.tuples(st.integers(0, 7), st.sampled_from(good), st.sampled_from(odd)).map(
        lambda t: t[1] if t[0] else t[2])


@st.composite
def requests_on_the_wire(draw: st.DrawFn) -> bytes:
    """POST requests, plain more often than not, with the odd thing httptools must decide: headers from
    a mixed bag (folded lines, bare LF, duplicate or wrong lengths, odd bytes), more bytes after."""
    line = draw(_mostly([b"POST /telemetry HTTP/1.1"], [b"POST /telemetry HTTP/1.0", b"POST /telemetry?x HTTP/1.1",
                        b"GET /telemetry HTTP/1.1", b"POST /telemetryx HTTP/1.1", b"post /telemetry HTTP/1.1"]))
    body = draw(st.binary(max_size=40))
    headers = []
    if draw(st.integers(0, 5)):
        headers.append(b"Content-Length: %d" % draw(_mostly([len(body)], [len(body) + 3, 0, 1]).map(int)))
    for name, value in draw(st.lists(st.tuples(_mostly(_GOOD_NAMES, _ODD_NAMES), _mostly(_GOOD_VALUES, _ODD_VALUES)),
                                     max_size=5)):
        separator = draw(_mostly([b": ", b":", b":\t"], [b" : ", b"\t:"]))
        headers.insert(draw(st.integers(0, len(headers))), name + separator + value)
    if draw(st.booleans()):  # keep-alive is what a mistake would get wrong most quietly
        headers.insert(draw(st.integers(0, len(headers))), b"Connection: " + draw(st.sampled_from(
            [b"close", b"Close", b"keep-alive", b"KEEP-ALIVE", b"upgrade", b"close, upgrade"])))
    ending = draw(_mostly([b"\r\n"], [b"\n", b"\r\n ", b"\r"]))
    tail = draw(st.sampled_from([b"", b"POST /telemetry HTTP/1.1\r\n", b"GET / HTTP/1.1\r\n\r\n"]))
    return line + b"\r\n" + b"".join(h + ending for h in headers) + b"\r\n" + body + tail


class _Heard:
    """What httptools makes of a request: headers (names lower-cased, as uvicorn keeps them), body, and
    what uvicorn asks the parser once the head is complete (method, version, keep-alive, upgrade)."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False
        self.head: tuple[bytes, str, bool, bool] | None = None

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.head = (parser.get_method(), parser.get_http_version(), parser.should_keep_alive(),
                     parser.should_upgrade())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


@settings(SETTINGS, max_examples=1500)
@given(wire=requests_on_the_wire(), max_head=st.sampled_from([32768, 60]), max_body=st.sampled_from([65536, 10]))
def test_plain_post_twins_agree_and_read_what_httptools_reads(wire: bytes, max_head: int, max_body: int) -> None:
    """parse_plain_post, compiled and twin, give the same answer for any bytes; and whatever they take
    as a plain request, httptools reads the same way: the same headers and body, complete after
    exactly the bytes they used, the same keep-alive; within the head and body limits."""
    compiled, twin = compiled_speedups(), speedups_module("pure-python")
    found = compiled.parse_plain_post(wire, b"/telemetry", max_head, max_body)
    assert found == twin.parse_plain_post(wire, b"/telemetry", max_head, max_body)
    if found is None:
        return
    used, headers, body, keep_alive = found
    heard = _Heard()
    heard.parser.feed_data(wire[:used])
    assert heard.complete and (heard.headers, heard.body) == (headers, body)
    assert heard.head == (b"POST", "1.1", keep_alive, False)
    assert wire.index(b"\r\n\r\n") + 4 <= max_head and len(body) <= max_body


def test_plain_post_takes_the_common_request_and_leaves_the_rest(speedups_impl: ModuleType) -> None:
    head = b"POST /telemetry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    parse = speedups_impl.parse_plain_post
    assert parse(head + b"{}GET", b"/telemetry", 32768, 65536) == (
        len(head) + 2, [(b"host", b"x"), (b"content-type", b"application/json"), (b"content-length", b"2")], b"{}",
        True)
    assert parse(head + b"{", b"/telemetry", 32768, 65536) is None  # the body is not all there
    assert parse(head + b"{}", b"/telemetry", len(head) - 1, 65536) is None  # the head is over the limit
    assert parse(head + b"{}", b"/telemetry", 32768, 1) is None  # the body is over the limit
    folded = head.replace(b"Host: x\r\n", b"Host: x\r\n y\r\n")
    assert parse(folded + b"{}", b"/telemetry", 32768, 65536) is None  # obs-fold: httptools decides
