"""Key rotation: re-encrypt sealed segments under the key file's first key, crash-safely.

Each rewritten segment goes to a temporary file that is fsynced and then renamed over the
original, so a crash at any point leaves every segment readable with the key file.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from . import segment_format, segment_keys
from ._protocols import BatchFramerProtocol
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


def series_is_idle(directory: Path, series: str) -> bool:
    """True when no running writer holds the series' lock (we may touch its newest segment)."""
    lock = directory / f"{series}.lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock again
    return True


# The first 12 base64 characters of a token are its version byte and 8-byte timestamp, exactly,
# when all 12 are in the alphabet (the lenient decoder would skip anything else).
_TOKEN_HEAD = re.compile(rb"[A-Za-z0-9_-]{12}")


def _token_time(token: bytes) -> int | None:
    """The Fernet timestamp of an authenticated token, or None if its head is unusual."""
    if _TOKEN_HEAD.match(token) is None:
        return None
    return int.from_bytes(base64.urlsafe_b64decode(token[:12])[1:9], "big")


def _rotated_batch(batch: segment_format.Batch, plaintexts: list[bytes], keys: list[int], crypto: CryptoService,
                   framer: BatchFramerProtocol) -> bytes:
    """`batch` with every token under the first key, each keeping its Fernet timestamp (and its key
    section, if any)."""
    at = batch.created_ms // 1000
    if all(_token_time(t) == at for t in batch.tokens):
        # What the writer leaves: every token stamped with the batch's time, so the framer can
        # re-encrypt the whole batch in one call (fresh IVs for all; the content is the same).
        frame = framer.frame(batch.first_seq, batch.created_ms, plaintexts)
        return segment_keys.with_keys(frame, batch.keys) if batch.keys else frame
    tokens = [token if key == 0 else crypto.rotate(token) for token, key in zip(batch.tokens, keys, strict=True)]
    return segment_format.frame_batch(batch.first_seq, batch.created_ms, tokens, batch.keys)


def _rotated_image(path: Path, crypto: CryptoService) -> tuple[bytes | None, int]:
    """The segment re-encrypted under the first key, or None if every token already uses it."""
    rotated = 0
    framer = crypto.new_framer()
    with segment_format.SegmentImage(path) as image:
        out = bytearray(segment_format.file_header_bytes(image.flags))
        for item in image.batches():
            if isinstance(item, segment_format.Batch):
                plaintexts, keys = crypto.decrypt_batch_keyed(item.tokens)
                if -1 in keys:
                    raise InvalidToken
                moved = sum(key != 0 for key in keys)
                if moved:
                    out += _rotated_batch(item, cast("list[bytes]", plaintexts), keys, crypto, framer)
                    rotated += moved
                    continue
            # Damage is kept verbatim, never "repaired"; batches already under the first key too.
            out += image.raw(item.offset, item.end)
    return (bytes(out) if rotated else None), rotated


def _replace(path: Path, data: bytes) -> None:
    segment_format.write_durably(path, data, path.with_name(path.name + TMP_SUFFIX))


def rotate_directory(directory: Path, crypto: CryptoService, progress: Progress | None = None) -> RotationReport:
    """Re-encrypt every sealed segment in `directory` whose tokens do not all use the first key."""
    report = RotationReport()
    for leftover in directory.glob(f"*{segment_format.SEGMENT_SUFFIX}{TMP_SUFFIX}"):
        leftover.unlink()  # a crash before the rename: the original is still in place
        log.info("removed %s left by an interrupted rotation", leftover.name)
    segments = segment_format.list_segments(directory)
    newest: dict[str, Path] = {}
    for path in segments:
        try:
            newest[segment_format.parse_segment_name(path)[0]] = path
        except ValueError:
            continue  # a foreign name: no series' newest segment, so no writer appends to it
    active = {path for series, path in newest.items() if not series_is_idle(directory, series)}
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
