"""Idempotency-Key (the IETF httpapi draft's semantics): the bounded table of recent keys, each in
flight or answered (filled at start-up from the log by segment_keys.recent_keys).

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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import IngestError
from .segment_format import KeyEntry
from .segment_keys import recent_keys

log = logging.getLogger("telemetry_sink.idempotency")

MAX_KEY_BYTES = 255
IN_FLIGHT_RETRY_S = 1.0
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

    def recover(self, directory: Path, wall_now: float) -> int:
        """Load the keys of the requests logged in `directory` within the window (at start-up, after
        the writer recovered its tail); returns how many."""
        started = time.monotonic()
        loaded = self.load(recent_keys(directory, int((wall_now - self.window_s) * 1000), self.max_keys))
        log.info("idempotency: %d keys of the last %ds recovered from the log in %.2fs", loaded, self.window_s,
                 time.monotonic() - started, extra={"event": "idempotency_keys_recovered", "keys": loaded})
        return loaded

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
