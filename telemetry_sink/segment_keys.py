"""The keyed extension of the segment format (docs/log-format.md) beyond parsing, which
segment_format does: adding a key section to a batch a framer made, and collecting the key entries
of recent keyed batches from a log directory (the idempotency table's recovery at start-up)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from . import crc_range
from .segment_format import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    BATCH_MAGIC,
    BODY_HEADER,
    BODY_HEADER_SIZE,
    FILE_HEADER_SIZE,
    FLAG_KEYED,
    KEYED_COUNT_BIT,
    TOKEN_LEN,
    Batch,
    KeyEntry,
    SegmentFormatError,
    SegmentImage,
    key_section,
    list_segments,
    read_key_section,
)

log = logging.getLogger("telemetry_sink.segment_keys")

_HEAD = BATCH_HEADER_SIZE + BODY_HEADER_SIZE


def with_keys(frame: bytes, keys: Sequence[KeyEntry]) -> bytes:
    """`frame` (one unkeyed batch, as a framer returns it) with `keys` appended as its key section."""
    return b"".join(keyed_parts(frame, keys))


def keyed_parts(frame: bytes, keys: Sequence[KeyEntry]) -> tuple[bytes, memoryview, bytes]:
    """`with_keys` in three pieces to be joined by the caller (new headers, the records as a view of
    `frame`, the key section), without hashing the records again: setting bit 31 of the count changes
    the body's CRC by a constant carried past the records (CRC-32 is linear), and the key section is
    then added to the running CRC."""
    (_, length, crc) = BATCH_HEADER.unpack_from(frame)
    head = bytearray(frame[: BATCH_HEADER_SIZE + BODY_HEADER_SIZE])
    count_at = BATCH_HEADER_SIZE + 8
    (count,) = TOKEN_LEN.unpack_from(head, count_at)
    TOKEN_LEN.pack_into(head, count_at, count | KEYED_COUNT_BIT)
    section = key_section(keys)
    crc = crc_range.crc32(section, crc ^ crc_range.shift(_COUNT_BIT_CRC, length - BODY_HEADER_SIZE))
    BATCH_HEADER.pack_into(head, 0, BATCH_MAGIC, length + len(section), crc)
    return bytes(head), memoryview(frame)[BATCH_HEADER_SIZE + BODY_HEADER_SIZE :], section


# crc32(D) ^ crc32(20 zero bytes), D = the body header with only the count's bit 31 set: what setting that
# bit adds to the CRC of the header alone (for equal lengths, crc(a ^ b) = crc(a) ^ crc(b) ^ crc(zeros)).
_COUNT_BIT_CRC = crc_range.crc32(bytes(8) + KEYED_COUNT_BIT.to_bytes(4, "big") + bytes(8)) ^ crc_range.crc32(bytes(20))


def recent_keys(directory: Path, since_ms: int, limit: int) -> list[tuple[int, KeyEntry]]:
    """The key entries of intact keyed batches framed at or after `since_ms`, in every series of
    `directory`, oldest first; at most the newest `limit`. Reads segments newest first and stops
    once it has `limit`, and skips a segment last modified before `since_ms` without opening it."""
    found: list[list[tuple[int, KeyEntry]]] = []
    total = 0
    candidates = []
    for path in list_segments(directory):
        try:
            mtime_ms = path.stat().st_mtime * 1000
        except FileNotFoundError:  # deleted by retention meanwhile
            continue
        if mtime_ms >= since_ms:
            candidates.append((mtime_ms, path))
    for _, path in sorted(candidates, reverse=True):
        try:
            entries = _segment_keys(path, since_ms)
        except (OSError, SegmentFormatError) as exc:
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
    with SegmentImage(path) as image:
        if not image.flags & FLAG_KEYED:
            return out
        offset, size = FILE_HEADER_SIZE, image.size
        while offset + _HEAD <= size:
            head = image.raw(offset, offset + _HEAD)
            magic, length, crc = BATCH_HEADER.unpack_from(head)
            end = offset + BATCH_HEADER_SIZE + length
            if magic != BATCH_MAGIC or length < BODY_HEADER_SIZE or end > size:
                break
            _, count, created_ms = BODY_HEADER.unpack_from(head, BATCH_HEADER_SIZE)
            if count & KEYED_COUNT_BIT and created_ms >= since_ms:
                body = image.raw(offset + BATCH_HEADER_SIZE, end)
                section = read_key_section(body, length) if crc_range.crc32(body) == crc else "CRC"
                if isinstance(section, str):
                    break
                out.extend((created_ms, entry) for entry in section[1])
            offset = end
        else:
            return out
        if offset < size:  # damage: let the full reader resynchronise from here
            for item in image.batches(offset):
                if isinstance(item, Batch) and item.created_ms >= since_ms:
                    out.extend((item.created_ms, entry) for entry in item.keys)
    return out

