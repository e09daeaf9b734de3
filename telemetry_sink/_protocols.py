"""The interfaces that both `_speedups` implementations (compiled and twin) satisfy, documented
here once; `speedups.py` picks one, and mypy checks both against these."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class TokenBucketProtocol(Protocol):
    """Token bucket: `rate` tokens a second refill up to `capacity`; time is passed in."""

    rate: float
    capacity: float
    tokens: float

    def __init__(self, rate: float, capacity: float, now: float) -> None: ...

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last call (time never runs backwards here)."""

    def try_acquire(self, n: float, now: float) -> bool:
        """Take `n` tokens if they are there now; return whether it did."""

    def time_until_available(self, n: float, now: float) -> float:
        """Seconds until `n` tokens will be there (0.0 if now; inf if n > capacity)."""

    def reserve(self, n: float, now: float, max_wait: float) -> float:
        """Take `n` tokens, going into debt, if they are there within `max_wait` seconds.

        Returns the wait (>= 0) the caller must sleep before proceeding, or -1.0 (and
        takes nothing) when the wait would exceed `max_wait`. Debt queues callers FIFO.
        """


class BatchFramerProtocol(Protocol):
    """Encrypts records as standard Fernet tokens and frames them as one TSB1 batch; one thread
    at a time per instance."""

    def __init__(self, signing_key: bytes, encryption_key: bytes) -> None: ...

    def frame(self, first_seq: int, created_ms: int, records: Sequence[bytes]) -> bytes:
        """Return one complete batch; each token carries created_ms // 1000 as its time."""

    def frame_many(self, first_seq: int, created_ms: int, batches: Sequence[Sequence[bytes]]) -> bytes:
        """`frame` of each batch in turn, sequence numbers running on from `first_seq`, back to back
        in one bytes (the compiled one releases the GIL once for them all)."""


class BatchDecryptorProtocol(Protocol):
    """Authenticates and decrypts Fernet tokens a batch at a time, trying every key in order
    (MultiFernet's rules); `keys` are raw 32-byte Fernet keys (signing key, then encryption key).
    One thread at a time per instance."""

    def __init__(self, keys: Sequence[bytes]) -> None: ...

    def decrypt(self, tokens: Sequence[bytes], ttl: int | None = None,
                now: int | None = None) -> list[bytes | None]:
        """Plaintext of each token, or None where no key accepts it (where MultiFernet.decrypt raises).

        With `ttl` (seconds, an int), tokens older than `ttl` or more than 60 s in the future
        against `now` (default: the clock) are rejected too, as `decrypt(token, ttl)` does.
        """

    def decrypt_keyed(self, tokens: Sequence[bytes], ttl: int | None = None,
                      now: int | None = None) -> tuple[list[bytes | None], list[int]]:
        """(plaintexts, key indices): as decrypt(), plus which key accepted each token (-1: none)."""

    def decrypt_span(self, image: Buffer, pos: int, count: int, ttl: int | None = None,
                     now: int | None = None) -> tuple[list[bytes | None], int]:
        """(decrypt() of the `count` length-prefixed tokens laid out in `image` from `pos`, the position
        after them): what split_tokens would copy out, read in place (ValueError if they run past it)."""


# record_span(values) -> (lowest ts, highest ts, node ids) of validated records (dicts each with a
# str `node_id` and a number `ts`): what a segment's index must cover for them.
RecordSpan = Callable[[list[Any]], tuple[float, float, set[str]]]


# encode_json(body, ndjson, received_at, max_records, max_node_id) -> (plaintexts, their total size,
# (lowest ts, highest ts, node ids)) of a JSON or NDJSON body whose records are in the subset that
# orjson.dumps writes back byte for byte (plain ASCII strings, canonical numbers, no duplicate keys:
# docs/speedups.md), exactly what parse_body + check_records + dump_records + record_span give; None
# for any other body (the caller takes that path). The twin always answers None.
EncodedBody = tuple[list[bytes], int, tuple[float, float, set[str]]]
EncodeJson = Callable[[bytes, bool, float, int, int], EncodedBody | None]


# A buffer the token functions read: a segment image (bytes or a read-only map) or a view of one.
Buffer = bytes | bytearray | memoryview | mmap.mmap
# scan_tokens(body, pos, end, count) -> the position after `count` tokens (a big-endian u32 length,
# then that many bytes) laid out from `pos` inside [pos, end), or -1 when a length would run past
# `end`, -2 when a token would: segment_format checks a batch's layout with it.
ScanTokens = Callable[[Buffer, int, int, int], int]
# has_digit_run(data, run) -> whether `data` holds `run` (at least 1) or more consecutive ASCII digits:
# how records.py finds the rare bodies that may hold an integer wider than orjson keeps exactly.
DigitRun = Callable[[bytes, int], bool]

# parse_plain_post(data, path, max_head, max_body) -> (bytes used, headers, body, keep-alive) for a
# whole `POST <path> HTTP/1.1` request at the start of `data`, or None for anything else: the fast
# lane answers such a request without the HTTP parser, which takes everything that is not plain.
# Plain means: that exact request line (no query, no other version); header lines of a token name,
# ':', optional spaces or tabs and a value of visible ASCII (inner spaces and tabs allowed, none at
# its end), each ended by CRLF; exactly one Content-Length of 1-9 digits, at most `max_body`;
# Connection only `keep-alive` or `close` (any case); no Transfer-Encoding, Content-Encoding, Expect,
# Upgrade or Proxy-Connection; the head (request line to the empty line) within `max_head` bytes and
# the whole body in `data`. Names come lower-cased, values as sent: what httptools and uvicorn make
# of the same bytes (tests/test_speedups_properties.py checks both against httptools).
PlainRequest = tuple[int, list[tuple[bytes, bytes]], bytes, bool]
PlainPost = Callable[[bytes, bytes, int, int], PlainRequest | None]
# The headers that make a request anything but plain (both implementations refuse it on them).
NOT_PLAIN_HEADERS = frozenset((b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"proxy-connection"))
# split_tokens(image, pos, count) -> (the `count` tokens from `pos`, copied out as bytes, the
# position after them): how a checked batch's tokens are read.
SplitTokens = Callable[[Buffer, int, int], tuple[list[bytes], int]]
# json_columns(lines, keys, targets, nodes, kinds, ts_low, ts_high) -> per column (validity bitmap or
# None, values, str offsets or None), or None: an export plan's typed columns from JSON objects in one
# pass (columns.ColumnPlan.compiled has the plan's layout). None whenever a record holds anything the
# record-by-record path would treat differently; the twin always answers None (pyarrow's reader then).
ColumnBuffers = list[tuple[bytes | None, bytes, bytes | None]]
JsonColumns = Callable[[list[bytes], list[bytes], list[int], list[tuple[int, int]], list[int], float, float],
                       ColumnBuffers | None]
