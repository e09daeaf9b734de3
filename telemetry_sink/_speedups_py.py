"""Pure-Python twin of the compiled `_speedups` module: same classes, same output format.

Used when the extension is not built or TELEMETRY_SINK_NO_EXTENSIONS=1 is set.
"""

from __future__ import annotations

import base64
import operator
import re
import struct
import time
from collections.abc import Sequence
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from ._protocols import NOT_PLAIN_HEADERS, Buffer, PlainRequest

IMPLEMENTATION = "pure-python"


class TokenBucket:
    """The token bucket (see _protocols.TokenBucketProtocol)."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.updated = float(now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def try_acquire(self, n: float, now: float) -> bool:
        self.refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def time_until_available(self, n: float, now: float) -> float:
        self.refill(now)
        if n > self.capacity:
            return float("inf")
        if self.tokens >= n:
            return 0.0
        return (n - self.tokens) / self.rate

    def reserve(self, n: float, now: float, max_wait: float) -> float:
        wait = self.time_until_available(n, now)
        if wait > max_wait:
            return -1.0
        self.tokens -= n
        return wait


class BatchFramer:
    """The batch framer on `cryptography`'s Fernet (see _protocols.BatchFramerProtocol)."""

    __slots__ = ("_fernet",)

    def __init__(self, signing_key: bytes, encryption_key: bytes) -> None:
        if len(signing_key) != 16 or len(encryption_key) != 16:
            raise ValueError("signing and encryption keys must be 16 bytes each")
        self._fernet = Fernet(base64.urlsafe_b64encode(signing_key + encryption_key))

    def frame(self, first_seq: int, created_ms: int, records: Sequence[bytes]) -> bytes:
        from .segment_format import frame_batch  # here: segment_format imports this module (speedups)

        at = created_ms // 1000
        encrypt = self._fernet.encrypt_at_time
        return frame_batch(first_seq, created_ms, [encrypt(r, at) for r in records])

    def frame_many(self, first_seq: int, created_ms: int, batches: Sequence[Sequence[bytes]]) -> bytes:
        frames = []
        for records in batches:
            frames.append(self.frame(first_seq, created_ms, records))
            first_seq += len(records)
        return b"".join(frames)


class BatchDecryptor:
    """The batch decryptor, on `cryptography`'s Fernet (see _protocols.BatchDecryptorProtocol)."""

    __slots__ = ("_fernets",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        keys = list(keys)
        if not keys:
            raise ValueError("BatchDecryptor needs at least one key")
        if any(len(k) != 32 for k in keys):
            raise ValueError("each key must be 32 raw bytes (signing key, then encryption key)")
        self._fernets = [Fernet(base64.urlsafe_b64encode(k)) for k in keys]

    def __repr__(self) -> str:
        return f"<telemetry_sink._speedups_py.BatchDecryptor keys={len(self._fernets)}>"

    def decrypt(self, tokens: Sequence[bytes], ttl: int | None = None, now: int | None = None) -> list[bytes | None]:
        return self.decrypt_keyed(tokens, ttl, now)[0]

    def decrypt_span(self, image: Buffer, pos: int, count: int, ttl: int | None = None,
                     now: int | None = None) -> tuple[list[bytes | None], int]:
        tokens, end = split_tokens(image, pos, count)
        return self.decrypt(tokens, ttl, now), end

    def decrypt_keyed(self, tokens: Sequence[bytes], ttl: int | None = None,
                      now: int | None = None) -> tuple[list[bytes | None], list[int]]:
        tokens = list(tokens)
        if ttl is not None:  # an int or nothing, as in the compiled one
            ttl = operator.index(ttl)
        current = int(time.time()) if now is None else operator.index(now)
        plaintexts: list[bytes | None] = []
        keys: list[int] = []
        for i, token in enumerate(tokens):
            if not isinstance(token, bytes):
                raise TypeError(f"tokens must be bytes, got {type(token).__name__} at index {i}")
            plaintext, key = None, -1
            for k, fernet in enumerate(self._fernets):
                try:
                    plaintext = fernet.decrypt(token) if ttl is None else fernet.decrypt_at_time(token, ttl, current)
                except (InvalidToken, ValueError):  # ValueError: a MAC-valid token too short for its IV
                    continue
                key = k
                break
            plaintexts.append(plaintext)
            keys.append(key)
        return plaintexts, keys
def check_records(values: list[Any], received_at: float, max_node_id_chars: int) -> int:
    """Validate each record, adding `ts` where absent; -1, or the first invalid index."""
    for index, record in enumerate(values):
        if type(record) is not dict:
            return index
        node_id = record.get("node_id")
        if type(node_id) is not str or not 0 < len(node_id) <= max_node_id_chars:
            return index
        ts = record.get("ts", _MISSING)
        if ts is _MISSING:
            record["ts"] = received_at
        elif type(ts) is not float and type(ts) is not int:
            return index
    return -1


def dump_records(values: list[Any]) -> list[bytes]:
    """orjson.dumps of each record, as exact-size bytes."""
    # orjson returns each result in an oversized allocation (about 4 KiB for a 150-byte record)
    # that it never shrinks: copying to an exact-size bytes keeps a full buffer small.
    dumps = orjson.dumps
    return [bytes(memoryview(dumps(r))) for r in values]


def encode_json(body: bytes, ndjson: bool, received_at: float, max_records: int,
                max_node_id: int) -> None:
    """No one-pass reader without the extension: None sends every body to orjson and the record
    checks (records.parse_body, encode_records), which give the same (see _protocols.EncodeJson)."""
    return None


_MISSING = object()


def record_span(values: list[Any]) -> tuple[float, float, set[str]]:
    """(lowest ts, highest ts, set of node ids) of validated records (see _protocols.RecordSpan)."""
    if not values:
        return float("inf"), float("-inf"), set()
    stamps = [record["ts"] for record in values]
    return float(min(stamps)), float(max(stamps)), {record["node_id"] for record in values}


_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


def has_digit_run(data: bytes, run: int) -> bool:
    """Whether `data` holds `run` or more consecutive ASCII digits (see _protocols.DigitRun)."""
    if run < 1:
        raise ValueError("has_digit_run: run must be at least 1")
    return b"0" * run in data.translate(_DIGITS_AS_ZERO)


# One header line of a plain request (see _protocols.PlainPost): a token name, ':', optional
# whitespace, then a value of visible ASCII with inner spaces or tabs, then CRLF.
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
                          rb"((?:[\x21-\x7e](?:[\x21-\x7e \t]*[\x21-\x7e])?)?)\r\n")


def parse_plain_post(data: bytes, path: bytes, max_head: int, max_body: int) -> PlainRequest | None:
    """A whole, plain `POST <path> HTTP/1.1` request at the start of `data` (see _protocols.PlainPost)."""
    pos = 5 + len(path) + 11
    if not data.startswith(b"POST " + path + b" HTTP/1.1\r\n"):
        return None
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    keep_alive = True
    while True:
        if pos + 2 > len(data) or pos > max_head:
            return None
        if data[pos] == 13:
            if data[pos + 1] != 10:
                return None
            pos += 2
            break
        line = _HEADER_LINE.match(data, pos)
        if line is None:
            return None
        pos = line.end()
        name, value = line[1].lower(), line[2]
        if name == b"content-length":
            if length >= 0 or not value or len(value) > 9 or not value.isdigit():
                return None
            length = int(value)
            if length > max_body:
                return None
        elif name == b"connection":
            if value.lower() == b"close":
                keep_alive = False
            elif value.lower() != b"keep-alive":
                return None
        elif name in NOT_PLAIN_HEADERS:
            return None
        headers.append((name, value))
    if pos > max_head or length < 0 or pos + length > len(data):
        return None
    return pos + length, headers, data[pos:pos + length], keep_alive


_TOKEN_LEN = struct.Struct(">I")


def scan_tokens(body: Buffer, pos: int, end: int, count: int) -> int:
    """The position after `count` length-prefixed tokens from `pos` inside [pos, end): -1 when a
    length would run past `end`, -2 when a token would (see _protocols.ScanTokens)."""
    if end > len(memoryview(body)) or pos < 0 or count < 0:
        raise ValueError("scan_tokens: range outside the buffer")
    unpack = _TOKEN_LEN.unpack_from
    for _ in range(count):
        if pos + 4 > end:
            return -1
        (length,) = unpack(body, pos)
        pos += 4 + length
        if pos > end:
            return -2
    return pos


def split_tokens(image: Buffer, pos: int, count: int) -> tuple[list[bytes], int]:
    """(`count` length-prefixed tokens from `pos`, copied out; the position after them)."""
    if pos < 0 or count < 0:
        raise ValueError("split_tokens: negative position or count")
    size = len(memoryview(image))
    unpack = _TOKEN_LEN.unpack_from
    out = []
    for _ in range(count):
        if pos + 4 > size:
            raise ValueError("split_tokens: a token runs past the buffer")
        (length,) = unpack(image, pos)
        pos += 4
        if pos + length > size:
            raise ValueError("split_tokens: a token runs past the buffer")
        out.append(bytes(image[pos : pos + length]))  # bytes: a copy, never a view of a map
        pos += length
    return out, pos


def json_columns(lines: list[bytes], keys: list[bytes], targets: list[int], nodes: list[tuple[int, int]],
                 kinds: list[int], ts_low: float, ts_high: float) -> None:
    """No one-pass converter without the extension: None sends every slice to pyarrow's JSON reader
    (columns.ColumnPlan.fast), which gives the same table (see _protocols.JsonColumns)."""
    return None
