"""Start-up checks of the log directory and recovery of a series' newest segment.

Everything here runs before the server takes a request, and every problem a person must fix
(a symlinked segment, a name out of range, a file that is not a segment) is a WriterStartError:
one line saying what to do, exit status 2. Files are opened with O_NOFOLLOW, so recovery never
truncates or rewrites the target of a link (the data directory itself may be a symlink).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import segment_format
from .segment_format import FILE_HEADER_BYTES, FILE_HEADER_SIZE, MAX_SEQ, SEGMENT_SUFFIX

log = logging.getLogger("telemetry_sink.writer")


class WriterStartError(RuntimeError):
    """The writer cannot start on this directory; str() is one line saying what to do."""


class WriterLockedError(WriterStartError):
    """Every segment series in the directory is held by another running writer."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """What start-up found at the end of the newest segment of this writer's series."""

    segment: Path | None
    next_seq: int
    cut_bytes: int
    first_created_ms: int | None = None


def _symlink_error(path: Path) -> WriterStartError:
    return WriterStartError(f"{path} is a symbolic link; the log directory must hold the files themselves "
                            f"(move the target into {path.parent}, or remove the link)")


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW; a symlink is a WriterStartError naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_error(path) from None
        raise


def check_directory(directory: Path) -> list[Path]:
    """Refuse symlinked segments and sequence numbers beyond 64 bits; return the foreign names.

    A `*.tslog` name that segment_name cannot have made belongs to no series: the writer never
    touches it (the caller warns once), readers still read it.
    """
    foreign = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not entry.name.endswith(SEGMENT_SUFFIX):
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            raise _symlink_error(path)
        try:
            _, first_seq = segment_format.parse_segment_name(path)
        except ValueError:
            foreign.append(path)
            continue
        if first_seq > MAX_SEQ:
            raise WriterStartError(f"{path}: first sequence number {first_seq} is beyond the largest possible "
                                   f"({MAX_SEQ}); this is not a segment the writer made: move it out of {directory}")
    return foreign


def preflight(directory: Path) -> None:
    """The start-up checks every writer would make, read-only, for the parent of `workers > 1`:
    check_directory, and each series' newest segment must begin like a segment."""
    if not directory.is_dir():
        return  # the writers create it (or say why they cannot)
    newest: dict[str, Path] = {}
    for path in segment_format.list_segments(directory):
        try:
            newest[segment_format.parse_segment_name(path)[0]] = path
        except ValueError:
            continue
    check_directory(directory)
    for path in newest.values():
        fd = open_nofollow(path, os.O_RDONLY)
        try:
            head = os.pread(fd, FILE_HEADER_SIZE, 0)
        finally:
            os.close(fd)
        if len(head) < FILE_HEADER_SIZE:
            if not FILE_HEADER_BYTES.startswith(head):
                raise _not_a_segment(path, f"{len(head)} bytes that do not begin a segment header")
            continue
        try:
            segment_format.check_file_header(head)
        except segment_format.SegmentFormatError as exc:
            raise _not_a_segment(path, str(exc)) from None


def recover_series(directory: Path, series: str) -> Recovery:
    """Cut a torn batch off the newest segment of `series` and find the next sequence number."""
    segments = segment_format.series_segments(directory, series)
    if not segments:
        return Recovery(None, 0, 0)
    newest = segments[-1]
    fd = open_nofollow(newest, os.O_RDWR)
    try:
        recovery = _recover(fd, newest, segment_format.parse_segment_name(newest)[1])
    finally:
        os.close(fd)
    if recovery.next_seq > MAX_SEQ:
        raise WriterStartError(f"series {series} in {directory} has used every sequence number up to {MAX_SEQ}; "
                               f"move its segments elsewhere to start a new series")
    return recovery


# The headers a writer creates: plain, or keyed (a torn one of either is rewritten plain and holds no batch).
_HEADERS = (FILE_HEADER_BYTES, segment_format.file_header_bytes(segment_format.FLAG_KEYED))


def _not_a_segment(path: Path, why: str) -> WriterStartError:
    return WriterStartError(f"{path} is not a segment ({why}); the writer would append to it: move it out of "
                            f"{path.parent}")


def _recover(fd: int, newest: Path, name_seq: int) -> Recovery:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_segment(newest, "not a regular file")
    size = info.st_size
    if size < FILE_HEADER_SIZE:
        head = os.pread(fd, size, 0)
        if not any(header.startswith(head) for header in _HEADERS):
            raise _not_a_segment(newest, f"{size} bytes that do not begin a segment header")
        # Torn while being created: nothing but (part of) a header was ever written.
        os.ftruncate(fd, 0)
        os.pwrite(fd, FILE_HEADER_BYTES, 0)
        os.fsync(fd)
        log.warning("segment %s had a torn header; rewrote it (%d bytes cut)", newest, size)
        return Recovery(newest, name_seq, size)
    next_seq = name_seq
    cut_at: int | None = None
    first_created_ms: int | None = None
    try:
        image = segment_format.SegmentImage(newest, fd)
    except segment_format.SegmentFormatError as exc:
        raise _not_a_segment(newest, str(exc)) from None
    with image:
        for item in image.batches():
            if isinstance(item, segment_format.Batch):
                next_seq = item.next_seq
                if first_created_ms is None:
                    first_created_ms = item.created_ms
            elif item.kind == "torn":
                cut_at = item.offset
            else:
                log.warning("segment %s: corrupt bytes %d..%d left in place (%s)", newest, item.offset,
                            item.end, item.detail)
    if cut_at is None:
        return Recovery(newest, next_seq, 0, first_created_ms)
    os.ftruncate(fd, cut_at)
    os.fsync(fd)
    log.warning("segment %s ended in a torn batch: cut %d bytes at offset %d; next sequence number %d",
                newest, size - cut_at, cut_at, next_seq,
                extra={"event": "torn_tail_cut", "segment": newest.name, "bytes": size - cut_at})
    return Recovery(newest, next_seq, size - cut_at, first_created_ms)
