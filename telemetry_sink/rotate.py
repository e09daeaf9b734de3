"""Key rotation: re-encrypt sealed segments under the key file's first key, crash-safely.

Each rewritten segment goes to a temporary file that is fsynced and then renamed over the
original, so a crash at any point leaves every segment readable with the key file.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import segment_format
from .crypto import CryptoService, InvalidToken
from .progress import Progress

log = logging.getLogger("telemetry_sink.rotate")

TMP_SUFFIX = ".rotating"


@dataclass
class RotationReport:
    rewritten: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    skipped_active: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    tokens_rotated: int = 0


def _series_is_idle(directory: Path, series: str) -> bool:
    """True when no running writer holds the series' lock (we may touch its newest segment)."""
    lock = directory / f"{series}.lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock again
    return True


def _rotated_image(path: Path, crypto: CryptoService) -> tuple[bytes | None, int]:
    """The segment re-encrypted under the first key, or None if every token already uses it."""
    out = bytearray(segment_format.FILE_HEADER_BYTES)
    rotated = 0
    with segment_format.SegmentImage(path) as image:
        for item in image.batches():
            if isinstance(item, segment_format.Damage):
                out += image.raw(item.offset, item.end)  # damage is kept verbatim, never "repaired"
                continue
            tokens = []
            for token in item.tokens:
                if crypto.uses_primary_key(token):
                    tokens.append(token)
                else:
                    tokens.append(crypto.rotate(token))
                    rotated += 1
            out += segment_format.frame_batch(item.first_seq, item.created_ms, tokens)
    return (bytes(out) if rotated else None), rotated


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        segment_format.write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    segment_format.fsync_dir(path.parent)


def rotate_directory(directory: Path, crypto: CryptoService, progress: Progress | None = None) -> RotationReport:
    """Re-encrypt every sealed segment in `directory` whose tokens do not all use the first key."""
    report = RotationReport()
    for leftover in directory.glob(f"*{segment_format.SEGMENT_SUFFIX}{TMP_SUFFIX}"):
        leftover.unlink()  # a crash before the rename: the original is still in place
        log.info("removed %s left by an interrupted rotation", leftover.name)
    segments = segment_format.list_segments(directory)
    newest: dict[str, Path] = {}
    for path in segments:
        newest[segment_format.parse_segment_name(path)[0]] = path
    active = {path for series, path in newest.items() if not _series_is_idle(directory, series)}
    for path in segments:
        if progress is not None:
            progress.advance(0, path.stat().st_size)
        if path in active:
            report.skipped_active.append(path)
            continue
        try:
            data, rotated = _rotated_image(path, crypto)
        except InvalidToken:
            report.failed.append(f"{path}: a record does not decrypt with any key in the key file")
            continue
        except segment_format.SegmentFormatError as exc:
            report.failed.append(f"{path}: {exc}")
            continue
        if data is None:
            report.unchanged.append(path)
            continue
        _replace(path, data)
        report.rewritten.append(path)
        report.tokens_rotated += rotated
        log.info("rotated %d records in %s", rotated, path.name)
    return report
