"""Walking a segment that arrives as a stream of chunks (an object being downloaded), without holding it whole.

`iter_stream_batches` yields exactly what `segment_format.iter_batches` yields for the same bytes (same
batches, same damage with the same offsets and details, same resynchronisation), while keeping in memory
only the batch being parsed plus the current chunk. The object's size is known from the listing, so a
damaged length field is judged against it without reading ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

from .crc_range import RangeCrc
from .segment_format import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    BATCH_MAGIC,
    BODY_HEADER_SIZE,
    FILE_HEADER_SIZE,
    MAX_BATCH_BODY,
    Batch,
    Damage,
    _parse_at,  # the one batch parser: streamed and mapped segments must be judged alike
    check_file_header,
)

_RELEASE_BYTES = 4 << 20  # drop consumed bytes from the window once this many have piled up


class _Window:
    """The bytes `base`..`base + len(buf)` of a stream of known `size`, filled on demand."""

    def __init__(self, chunks: Iterator[bytes], size: int) -> None:
        self._chunks = chunks
        self.size = size
        self.buf = bytearray()
        self.base = 0
        self._crcs: RangeCrc | None = None  # prefix CRCs of buf while resynchronising (see segment_format)

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def fill(self, upto: int) -> None:
        """Read until the window reaches `upto` (or the end of the stream)."""
        upto = min(upto, self.size)
        while self.end < upto:
            chunk = next(self._chunks, None)
            if chunk is None:  # shorter than listed: judge it by what arrived
                self.size = self.end
                return
            self.buf += chunk

    def release(self, before: int) -> None:
        """Forget bytes before `before` (never needed again) once enough have piled up."""
        before = min(before, self.end)  # never skip bytes not read yet
        drop = before - self.base
        if drop >= _RELEASE_BYTES or drop >= len(self.buf) > 0:
            del self.buf[:drop]
            self.base = before
            self._crcs = None  # its prefixes started at the old base

    def parse(self, offset: int, resyncing: bool = False) -> Batch | str:
        """`_parse_at` at absolute `offset`, after reading all the bytes its verdict depends on.
        `resyncing`: candidates' CRCs come from prefix CRCs, so a walk past fake headers stays linear."""
        self.fill(offset + BATCH_HEADER_SIZE)
        if self.end - offset >= BATCH_HEADER_SIZE:
            magic, length, _crc = BATCH_HEADER.unpack_from(self.buf, offset - self.base)
            if magic == BATCH_MAGIC and BODY_HEADER_SIZE <= length <= MAX_BATCH_BODY:
                self.fill(offset + BATCH_HEADER_SIZE + length)
        crcs = None
        if resyncing:
            # Filling only appends to buf: prefixes already taken stay valid until a release.
            crcs = self._crcs = self._crcs if self._crcs is not None else RangeCrc(cast(Any, self.buf))
        found = _parse_at(cast(Any, self.buf), offset - self.base, self.end - self.base, crcs)
        if isinstance(found, str):
            return found
        return replace(found, offset=found.offset + self.base, end=found.end + self.base)

    def resync(self, offset: int) -> Batch | None:
        """The next valid batch after `offset`, as `segment_format._resync` finds it."""
        pos = offset + 1
        while True:
            self.fill(pos + 1)
            hit = self.buf.find(BATCH_MAGIC, max(0, pos - self.base))
            while hit < 0 and self.end < self.size:
                # Keep the last 3 bytes: the magic may straddle two chunks.
                scanned = max(pos, self.end - len(BATCH_MAGIC) + 1)
                self.release(scanned)
                self.fill(self.end + 1)
                hit = self.buf.find(BATCH_MAGIC, max(0, scanned - self.base))
            if hit < 0:
                return None
            candidate = self.base + hit
            found = self.parse(candidate, resyncing=True)
            if isinstance(found, Batch):
                return found
            pos = candidate + 1
            self.release(pos)


def iter_stream_batches(chunks: Iterator[bytes], size: int,
                        start: int = FILE_HEADER_SIZE) -> Iterator[Batch | Damage]:
    """Check the file header, then walk the batches from `start` like `segment_format.iter_batches`."""
    window = _Window(chunks, size)
    window.fill(FILE_HEADER_SIZE)
    check_file_header(bytes(window.buf[:FILE_HEADER_SIZE]))
    window.fill(start)
    window.release(min(start, window.end))
    offset = start
    while offset < window.size:
        found = window.parse(offset)
        if isinstance(found, Batch):
            yield found
            offset = found.end
            window.release(offset)
            continue
        following = window.resync(offset)
        if following is None:
            yield Damage(offset, window.size, "torn", found)
            return
        yield Damage(offset, following.offset, "corrupt", found)
        offset = following.offset

