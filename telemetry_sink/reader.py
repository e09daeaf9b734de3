"""Offline reading of segments: which files to walk, decrypting them (`read`, `--follow`) and
checking them (`verify`). The one segment-walking code path shared by the offline tools.

Damage is reported through `warn` (skipped) or raised as `DamageError` (`--strict`); nothing here
prints on its own or knows about command-line arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson

from . import segment_format
from .crypto import CryptoService, InvalidToken

# Past the end of any file: a segment that is not one is never looked at again.
_SKIP = 1 << 62


class DamageError(Exception):
    """A damaged batch or record was met in strict mode; str() is one line naming where."""


class NoSegmentsError(Exception):
    """A path given to read or verify names neither a segment nor a directory."""


def segment_paths(paths: Sequence[str], default_directory: Path | None) -> list[Path]:
    """The segments named by `paths` (files or directories), or those of `default_directory`."""
    if not paths:
        if default_directory is None or not default_directory.is_dir():
            raise NoSegmentsError(f"log directory {default_directory} does not exist")
        return segment_format.list_segments(default_directory)
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(segment_format.list_segments(p))
        elif p.is_file():
            out.append(p)
        else:
            raise NoSegmentsError(f"{p}: no such file or directory")
    return out


@dataclass
class RecordFilter:
    """Which decrypted records to keep; None means no condition."""

    node: str | None = None
    since: float | None = None

    @property
    def active(self) -> bool:
        return self.node is not None or self.since is not None

    def keep(self, plaintext: bytes) -> bool:
        record = orjson.loads(plaintext)
        if self.node is not None and record.get("node_id") != self.node:
            return False
        ts = record.get("ts")
        return self.since is None or (isinstance(ts, (int, float)) and ts >= self.since)


@dataclass
class Follower:
    """Decrypts segments to JSON lines incrementally: remembers how far each one has been read,
    so calling `read_new` again (for `--follow`) emits only what was appended since."""

    crypto: CryptoService
    out: IO[bytes]
    warn: Callable[[str], None]
    keep: RecordFilter = field(default_factory=RecordFilter)
    strict: bool = False
    offsets: dict[Path, int] = field(default_factory=dict)
    bad_tokens: int = 0

    def read_new(self, paths: list[Path], final: bool) -> None:
        """Emit every complete batch past the remembered offsets; `final`: report torn tails too."""
        for path in paths:
            start = self.offsets.get(path, segment_format.FILE_HEADER_SIZE)
            try:
                image = segment_format.SegmentImage(path)
            except segment_format.SegmentFormatError as exc:
                if final or path.stat().st_size >= segment_format.FILE_HEADER_SIZE:
                    self.warn(f"{path}: skipped, {exc}")
                    self.offsets[path] = _SKIP
                continue
            with image:
                if image.size <= start:
                    continue
                for item in image.batches(start):
                    if isinstance(item, segment_format.Batch):
                        self._emit(item)
                        self.offsets[path] = item.end
                    elif item.kind == "corrupt":
                        self._damage(f"{path}: damaged batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes: {item.detail})")
                        self.offsets[path] = item.end
                    elif final:
                        self._damage(f"{path}: ends in an incomplete batch at offset {item.offset} "
                                     f"({item.end - item.offset} bytes)")
            self.out.flush()

    def _damage(self, message: str) -> None:
        if self.strict:
            self.out.flush()
            raise DamageError(f"{message} (--strict)")
        self.warn(f"skipped {message}")

    def _emit(self, batch: segment_format.Batch) -> None:
        write = self.out.write
        keep = self.keep if self.keep.active else None
        for token in batch.tokens:
            try:
                plaintext = self.crypto.decrypt(token)
            except InvalidToken:
                self.bad_tokens += 1
                self._damage(f"a record in the batch at seq {batch.first_seq} that does not authenticate "
                             f"with the key(s)")
                continue
            if keep is not None and not keep.keep(plaintext):
                continue
            write(plaintext)
            write(b"\n")


@dataclass
class SegmentReport:
    """What `verify` found in one segment (or, summed, in all of them)."""

    batches: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)


def verify_segment(path: Path, crypto: CryptoService | None, expected_seq: int | None) -> SegmentReport:
    """Walk one segment: batches, records, sequence gaps, damage; with `crypto`, authenticate tokens."""
    report = SegmentReport()
    try:
        image = segment_format.SegmentImage(path)
    except (segment_format.SegmentFormatError, OSError) as exc:
        report.problems.append(f"unreadable: {exc}")
        return report
    with image:
        for item in image.batches():
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
                for i, token in enumerate(item.tokens):
                    try:
                        crypto.decrypt(token)
                    except InvalidToken:
                        report.problems.append(f"record {item.first_seq + i} (batch at offset {item.offset}) "
                                               f"does not authenticate")
    return report


def verify_segments(segments: list[Path], crypto: CryptoService | None,
                    emit: Callable[[str], None]) -> int:
    """Verify `segments` in order (sequence numbers checked across each series), `emit` one line per
    segment and problem and a summary; return the number of damaged segments."""
    next_seq: dict[str, int] = {}
    damaged = 0
    totals = SegmentReport()
    for path in segments:
        series = segment_format.parse_segment_name(path)[0]
        report = verify_segment(path, crypto, next_seq.get(series))
        if report.last_seq is not None:
            next_seq[series] = report.last_seq + 1
        seq = f"seq {report.first_seq}..{report.last_seq}" if report.last_seq is not None else "no records"
        status = "ok" if not report.problems else "DAMAGED"
        emit(f"{path}: {status}: {report.batches} batches, {report.records} records, {seq}")
        for problem in report.problems:
            emit(f"  {problem}")
        damaged += bool(report.problems)
        totals.batches += report.batches
        totals.records += report.records
    auth = ", every token authenticated" if crypto is not None and not damaged else ""
    emit(f"{len(segments)} segments, {totals.batches} batches, {totals.records} records, {damaged} damaged{auth}")
    return damaged
