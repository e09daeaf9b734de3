"""Offline reading of segments: which files to walk, decrypting them (`read`, `--follow`) and
checking them (`verify`). The one segment-walking code path shared by the offline tools.

Damage is reported through `warn` (skipped) or raised as `DamageError` (`--strict`); nothing here
prints on its own or knows about command-line arguments.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, cast

import orjson

from . import segment_format
from .crypto import CryptoService
from .objstore import ObjectStoreError
from .progress import Progress
from .segment_index import SegmentIndex
from .segment_source import NoSegmentsError, SegmentRef, segment_refs, total_size

__all__ = ["DamageError", "Follower", "NoSegmentsError", "RecordFilter", "RecordWalker", "parse_time",
           "segment_refs", "total_bytes", "total_size", "verify_segments"]

# Past the end of any file: a segment that is not one is never looked at again.
_SKIP = 1 << 62
_RELEASE_BYTES = 8 << 20


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def total_bytes(segments: Sequence[Path]) -> int:
    """The size of `segments` on disk (what a progress bar counts towards)."""
    return sum(map(_size, segments))


class DamageError(Exception):
    """A damaged batch or record was met in strict mode; str() is one line naming where."""


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from `--since`/`--until` text: Unix seconds (`1767225600`), ISO 8601
    (`2026-12-01`, `2026-12-01T10:00`, `...Z` or `+01:00`; no offset means UTC), or a time ago
    (`90s`, `30m`, `1h`, `2d`, `1w`, or combined: `1h30m`). ValueError says what is accepted."""
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    pos, ago = 0, 0.0
    for match in _RELATIVE.finditer(raw):
        if match.start() != pos:
            break
        ago += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos and pos == len(raw):
        return (time.time() if now is None else now) - ago
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use Unix seconds, ISO 8601 (2026-12-01T10:00Z) "
                         f"or a time ago (30m, 1h, 2d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass
class RecordFilter:
    """Which decrypted records to keep; empty/None means no condition. `nodes` are globs
    (`greenhouse-*`, `node-[0-9]`; an id without `*?[` matches itself), any of which may match."""

    nodes: Sequence[str] = ()
    since: float | None = None  # ts >= since
    until: float | None = None  # ts < until
    _match: Callable[[str], object] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if any(set(p) & set("*?[") for p in self.nodes):
            self._match = re.compile("|".join(fnmatch.translate(p) for p in self.nodes)).match
        elif self.nodes:
            self._match = frozenset(self.nodes).__contains__

    @property
    def active(self) -> bool:
        return bool(self.nodes) or self.since is not None or self.until is not None

    def may_hold(self, index: SegmentIndex) -> bool:
        """Whether a segment with this index can hold a record this filter keeps."""
        if not index.overlaps(self.since, self.until):
            return False
        nodes = index.span.nodes
        return self._match is None or nodes is None or any(self._match(node) for node in nodes)

    def keep(self, plaintext: bytes) -> bool:
        record = orjson.loads(plaintext)
        if self._match is not None:
            node = record.get("node_id")
            if type(node) is not str or not self._match(node):
                return False
        if self.since is None and self.until is None:
            return True
        ts = record.get("ts")
        if not isinstance(ts, (int, float)):
            return False
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)


@dataclass
class RecordWalker:
    """The records of segments, decrypted a batch at a time and kept by `keep`: the walk that read,
    export and the others share. Remembers how far each segment has been read, so walking the same
    segments again (for `--follow`) yields only what was appended since."""

    crypto: CryptoService
    warn: Callable[[str], None]
    keep: RecordFilter = field(default_factory=RecordFilter)
    strict: bool = False
    offsets: dict[str, int] = field(default_factory=dict)  # by segment label
    records: int = 0  # tokens met, decrypted or not
    bad_tokens: int = 0  # tokens that did not authenticate with the key(s)
    segments_opened: int = 0
    segments_skipped: int = 0  # by their index: no record in them can pass the filter

    def summary(self) -> str | None:
        """One line when records did not decrypt (reported once, not per record), else None."""
        if not self.bad_tokens:
            return None
        good = self.records - self.bad_tokens
        why = "is this the right key?" if good == 0 else "some were written under another key, or damaged"
        return (f"{good:,} of {self.records:,} records decrypted: {why} ({self.bad_tokens:,} do not authenticate "
                f"with the key(s) from {self.crypto.source})")

    def walk(self, segments: list[SegmentRef], final: bool) -> Iterator[tuple[SegmentRef, list[bytes]]]:
        """(segment, kept plaintexts) for every complete batch past the remembered offsets, skipping
        batches with nothing kept; `final`: report torn tails too. DamageError ends it in strict mode."""
        for ref in segments:
            path = ref.label
            start = self.offsets.get(path, segment_format.FILE_HEADER_SIZE)
            if path in self.offsets and ref.size_now() <= start:
                continue  # nothing new (and for an object, no GET)
            if self.keep.active and path not in self.offsets:
                index = ref.index()
                if index is not None and not self.keep.may_hold(index):
                    self.segments_skipped += 1
                    self.offsets[path] = index.size  # sealed: read again only if it ever grew
                    continue
            try:
                image = ref.open()
            except segment_format.SegmentFormatError as exc:
                if final or ref.size_now() >= segment_format.FILE_HEADER_SIZE:
                    self.warn(f"{path}: skipped, {exc}")
                    self.offsets[path] = _SKIP
                continue
            self.segments_opened += 1
            try:
                if image.size <= start:
                    continue
                # A mapped file's pages already read are handed back, so a 128 MiB segment need not
                # all be resident (a streamed object holds only its current chunk anyway).
                release = getattr(image, "release", None)
                released = start
                for item in image.batches(start):
                    if release is not None and item.end - released >= _RELEASE_BYTES:
                        release(item.offset)
                        released = item.offset
                    if isinstance(item, segment_format.Batch):
                        # A chunk of tokens at a time: a hostile batch of millions of tiny records
                        # stays small in memory.
                        for plaintexts in item.plaintext_chunks(self.crypto.decrypt_span):
                            kept, bad = self._keep(plaintexts)
                            if kept:
                                yield ref, kept
                            if bad:  # strict: what came before the bad record is out, then stop
                                self._damage(f"a record in the batch at seq {item.first_seq} that does not "
                                             f"authenticate with the key(s) from {self.crypto.source}")
                        self.offsets[path] = item.end
                    elif item.kind == "corrupt":
                        self._damage(f"{path}: damaged batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes: {item.detail})")
                        self.offsets[path] = item.end
                    elif final:
                        self._damage(f"{path}: ends in an incomplete batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes)")
            finally:
                image.close()

    def _damage(self, message: str) -> None:
        if self.strict:
            raise DamageError(f"{message} (--strict)")
        self.warn(f"skipped {message}")

    def _keep(self, plaintexts: list[bytes | None]) -> tuple[list[bytes], bool]:
        """The kept plaintexts of some tokens (None: did not decrypt); True if strict mode must stop
        at a record that did not decrypt."""
        self.records += len(plaintexts)
        keep = self.keep if self.keep.active else None
        if keep is None and None not in plaintexts:
            return cast("list[bytes]", plaintexts), False
        kept: list[bytes] = []
        for plaintext in plaintexts:
            if plaintext is None:
                self.bad_tokens += 1  # counted, and reported once by summary()
                if self.strict:
                    return kept, True
                continue
            if keep is None or keep.keep(plaintext):
                kept.append(plaintext)
        return kept, False


class Follower(RecordWalker):
    """`read`: the walk's records as JSON lines on `out`, one write a batch (per-record writes cost as
    much as decrypting); call `read_new` again to follow a growing log."""

    def __init__(self, crypto: CryptoService, out: IO[bytes], warn: Callable[[str], None],
                 keep: RecordFilter | None = None, strict: bool = False) -> None:
        super().__init__(crypto, warn, keep or RecordFilter(), strict)
        self.out = out

    def read_new(self, segments: list[SegmentRef], final: bool) -> None:
        """Emit every complete batch past the remembered offsets; `final`: report torn tails too."""
        try:
            for _, lines in self.walk(segments, final):
                self.out.write(b"\n".join(lines) + b"\n")
        finally:
            self.out.flush()


MAX_LISTED_RECORDS = 20  # verify names this many unauthenticated records per segment, then counts the rest


@dataclass
class SegmentReport:
    """What `verify` found in one segment (or, summed, in all of them)."""

    batches: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)


def verify_segment(ref: SegmentRef, crypto: CryptoService | None, expected_seq: int | None) -> SegmentReport:
    """Walk one segment: batches, records, sequence gaps, damage; with `crypto`, authenticate tokens."""
    report = SegmentReport()
    try:
        image = ref.open()
    except (segment_format.SegmentFormatError, OSError, ObjectStoreError) as exc:
        report.problems.append(f"unreadable: {exc}")
        return report
    try:
        _verify_batches(image.batches(), crypto, expected_seq, report)
    except ObjectStoreError as exc:  # the stream broke off part-way
        report.problems.append(f"unreadable: {exc}")
    finally:
        image.close()
    return report


def _verify_batches(batches: Iterator[segment_format.Batch | segment_format.Damage], crypto: CryptoService | None,
                    expected_seq: int | None, report: SegmentReport) -> None:
    unauthenticated = 0
    for item in batches:
        if isinstance(item, segment_format.Damage):
            what = "torn tail" if item.kind == "torn" else "corrupt batch"
            report.problems.append(f"{what} at offset {item.offset} ({item.end - item.offset} bytes: "
                                   f"{item.detail})")
            continue
        if expected_seq is not None and item.first_seq != expected_seq:
            report.problems.append(f"sequence gap at offset {item.offset}: expected {expected_seq}, "
                                   f"found {item.first_seq}")
        expected_seq = item.next_seq
        report.batches += 1
        report.records += item.count
        if report.first_seq is None:
            report.first_seq = item.first_seq
        if item.count:
            report.last_seq = item.next_seq - 1
        if crypto is not None:
            i = item.first_seq
            for plaintexts in item.plaintext_chunks(crypto.decrypt_span):
                for plaintext in plaintexts:
                    if plaintext is None:
                        unauthenticated += 1
                        if unauthenticated <= MAX_LISTED_RECORDS:
                            report.problems.append(f"record {i} (batch at offset {item.offset}) "
                                                   f"does not authenticate")
                    i += 1
    if unauthenticated > MAX_LISTED_RECORDS:
        # One line per record would make memory and output grow with a hostile file's size.
        report.problems.append(f"... and {unauthenticated - MAX_LISTED_RECORDS:,} more records that do not "
                               f"authenticate ({unauthenticated:,} in all)")


def verify_segments(segments: list[SegmentRef], crypto: CryptoService | None,
                    emit: Callable[[str], None], progress: Progress | None = None) -> int:
    """Verify `segments` in order (sequence numbers checked across each series), `emit` one line per
    segment and problem and a summary; return the number of damaged segments."""
    next_seq: dict[str, int] = {}
    damaged = 0
    totals = SegmentReport()
    for ref in segments:
        series, path = ref.series, ref.label
        report = verify_segment(ref, crypto, next_seq.get(series))
        if report.last_seq is not None:
            next_seq[series] = report.last_seq + 1
        seq = f"seq {report.first_seq}..{report.last_seq}" if report.last_seq is not None else "no records"
        status = "ok" if not report.problems else "DAMAGED"
        emit(f"{path}: {status}: {report.batches} batches, {report.records} records, {seq}")
        for problem in report.problems:
            emit(f"  {problem}")
        damaged += bool(report.problems)
        if progress is not None:
            progress.advance(report.records, total_size([ref]))
        totals.batches += report.batches
        totals.records += report.records
    auth = ", every token authenticated" if crypto is not None and not damaged else ""
    emit(f"{len(segments)} segments, {totals.batches} batches, {totals.records} records, {damaged} damaged{auth}")
    return damaged
