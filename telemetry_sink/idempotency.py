"""Idempotency-Key (the IETF httpapi draft's semantics): the bounded table of recent keys, each in
flight or answered, and its recovery at start-up from the key sections of keyed batches in the log.

A key is scoped by its principal (the token's hash, or the client address when auth is off) and
kept only as a SHA-256 digest, with the digest of the body it came with; a repeat with the same
body is answered from the table (a `Replayed` count, nothing stored), with another body 422, and
while the first is still in flight 409. Failed requests stored nothing, so their key is forgotten
and a retry is processed afresh.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from . import segment_format
from .errors import IngestError
from .segment_format import KeyEntry

log = logging.getLogger("telemetry_sink.idempotency")

MAX_KEY_BYTES = 255
IN_FLIGHT_RETRY_S = 1.0
_HEAD = segment_format.BATCH_HEADER_SIZE + segment_format.BODY_HEADER_SIZE
_sha256 = hashlib.sha256


class Replayed(int):
    """The `accepted` of the earlier answer to the same request: this one stored nothing."""


_PRINTABLE = bytes(range(0x20, 0x7F))


def parse_key(value: bytes) -> bytes:
    """The key of an `Idempotency-Key` header: an sf-string (`"..."`) or, leniently, the bare value;
    1 to 255 printable ASCII characters (400 otherwise)."""
    key = value.strip(b" \t")
    if len(key) >= 2 and key[0] == 0x22 and key[-1] == 0x22:
        key = key[1:-1]
    if 0 < len(key) <= MAX_KEY_BYTES and not key.translate(None, _PRINTABLE):
        return key
    raise IngestError(400, "invalid_request", f"Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable ASCII "
                          'characters, e.g. a quoted UUID: Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"')


def key_digest(scope: str, key: bytes) -> bytes:
    """What the table and the log hold for a key: sha256(scope NUL key)."""
    return _sha256(b"%s\0%s" % (scope.encode("utf-8", "surrogateescape"), key)).digest()


def body_digest(fmt: str, body: bytes) -> bytes:
    """The request's fingerprint: sha256(format NUL decoded body)."""
    prefix = _FORMAT_PREFIXES.get(fmt)
    if prefix is None:
        prefix = _FORMAT_PREFIXES[fmt] = _sha256(fmt.encode("ascii") + b"\0")
    digest = prefix.copy()
    digest.update(body)
    return digest.digest()


_FORMAT_PREFIXES: dict[str, hashlib._Hash] = {}  # the hash of "format NUL", copied per request


# A slot: (body digest, the answer's `accepted` or IN_FLIGHT, monotonic expiry or infinity while in flight).
# A plain tuple of atomic values, so the cyclic garbage collector does not have to track 100,000 of them.
_Slot = tuple[bytes, int, float]
IN_FLIGHT = -1
_NEVER = float("inf")


class IdempotencyTable:
    """Keys seen in the last `window_s` seconds, at most `max_keys` (the oldest answered one is
    evicted first), each with its body digest and answer."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._wall_clock = wall_clock
        # Claim order, which is about answer order: the front expires first. (An older request still in
        # flight at the front holds back the expiry behind it until it is answered; max_keys still bounds.)
        self._slots: OrderedDict[bytes, _Slot] = OrderedDict()
        self.replays = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._slots)

    def begin(self, key: bytes, body: bytes) -> Replayed | None:
        """Claim `key` for a request with body digest `body`: None (go ahead, then `finish` or
        `abandon`), or the earlier answer. Raises IngestError 422 (other body) or 409 (in flight)."""
        self._expire(self._clock())
        slot = self._slots.get(key)
        if slot is not None:
            if slot[0] != body:
                raise IngestError(422, "idempotency_key_reused", "this Idempotency-Key was used for a request "
                                  "with a different body; send a new request with a new key")
            if slot[1] == IN_FLIGHT:
                raise IngestError(409, "request_in_progress", "a request with this Idempotency-Key is still being "
                                  "processed; retry it later", retry_after_s=IN_FLIGHT_RETRY_S)
            self.replays += 1
            return Replayed(slot[1])
        if len(self._slots) >= self.max_keys:
            self._evict()
        self._slots[key] = (body, IN_FLIGHT, _NEVER)
        return None

    def finish(self, key: bytes, accepted: int) -> None:
        """The request claimed with `key` got 202 with `accepted`: remember the answer."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots[key] = (slot[0], accepted, self._clock() + self.window_s)  # keeps its place in the order

    def abandon(self, key: bytes) -> None:
        """The request claimed with `key` stored nothing: forget the key, so a retry is new."""
        slot = self._slots.get(key)
        if slot is not None and slot[1] == IN_FLIGHT:
            del self._slots[key]

    def load(self, entries: Iterable[tuple[int, KeyEntry]]) -> int:
        """Remember answered keys found in the log as (batch created_ms, entry), oldest first;
        those older than the window are skipped. Returns how many were loaded."""
        now, wall = self._clock(), self._wall_clock()
        loaded = 0
        for created_ms, entry in entries:
            expires = now + (created_ms / 1000 + self.window_s - wall)
            if expires <= now:
                continue
            if len(self._slots) >= self.max_keys:
                self._evict()
            self._slots[entry.key] = (entry.body, entry.accepted, expires)
            self._slots.move_to_end(entry.key)
            loaded += 1
        return loaded

    def _expire(self, now: float) -> None:
        slots = self._slots
        while slots:
            key = next(iter(slots))
            if slots[key][2] > now:
                return
            del slots[key]

    def _evict(self) -> None:
        for key, slot in self._slots.items():
            if slot[1] != IN_FLIGHT:
                del self._slots[key]
                self.evicted += 1
                return
        raise IngestError(503, "too_many_in_flight", f"{self.max_keys} requests with an Idempotency-Key are in "
                          "flight; retry later", retry_after_s=IN_FLIGHT_RETRY_S)


# -- recovery from the log --


def recent_keys(directory: Path, since_ms: int, limit: int) -> list[tuple[int, KeyEntry]]:
    """The key entries of intact keyed batches framed at or after `since_ms`, in every series of
    `directory`, oldest first; at most the newest `limit`. Reads segments newest first and stops
    once it has `limit`, and skips a segment last modified before `since_ms` without opening it."""
    found: list[list[tuple[int, KeyEntry]]] = []
    total = 0
    candidates = []
    for path in segment_format.list_segments(directory):
        try:
            mtime_ms = path.stat().st_mtime * 1000
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        if mtime_ms >= since_ms:
            candidates.append((mtime_ms, path))
    for _, path in sorted(candidates, reverse=True):
        try:
            entries = _segment_keys(path, since_ms)
        except (OSError, segment_format.SegmentFormatError) as exc:
            log.warning("idempotency keys: skipped segment %s (%s)", path.name, exc)
            continue
        found.append(entries)
        total += len(entries)
        if total >= limit:
            break
    merged = sorted((item for entries in found for item in entries), key=lambda item: item[0])
    return merged[-limit:] if limit else []


def _segment_keys(path: Path, since_ms: int) -> list[tuple[int, KeyEntry]]:
    """Hop from batch header to batch header; only keyed batches recent enough are CRC-checked
    and their key sections read. Past damage, the resynchronising reader takes over."""
    out: list[tuple[int, KeyEntry]] = []
    with segment_format.SegmentImage(path) as image:
        if not image.flags & segment_format.FLAG_KEYED:
            return out
        offset, size = segment_format.FILE_HEADER_SIZE, image.size
        while offset + _HEAD <= size:
            head = image.raw(offset, offset + _HEAD)
            magic, length, crc = segment_format.BATCH_HEADER.unpack_from(head)
            end = offset + segment_format.BATCH_HEADER_SIZE + length
            if magic != segment_format.BATCH_MAGIC or length < segment_format.BODY_HEADER_SIZE or end > size:
                break
            _, count, created_ms = segment_format.BODY_HEADER.unpack_from(head, segment_format.BATCH_HEADER_SIZE)
            if count & segment_format.KEYED_COUNT_BIT and created_ms >= since_ms:
                body = image.raw(offset + segment_format.BATCH_HEADER_SIZE, end)
                section = segment_format.read_key_section(body, length) if zlib.crc32(body) == crc else "CRC"
                if isinstance(section, str):
                    break
                out.extend((created_ms, entry) for entry in section[1])
            offset = end
        else:
            return out
        if offset < size:  # damage: let the full reader resynchronise from here
            for item in image.batches(offset):
                if isinstance(item, segment_format.Batch) and item.created_ms >= since_ms:
                    out.extend((item.created_ms, entry) for entry in item.keys)
    return out

