"""Segment format v1: constants, pure-Python framing and a resynchronising reader, and the
`keyed` extension (file flag 0x0001: batches may carry the idempotency keys of their requests).

The format is normative and documented in docs/log-format.md; keep the two in step.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

from . import crc_range
from .crc_range import RangeCrc

FILE_MAGIC = b"TSINKLOG"
FORMAT_VERSION = 1
FILE_HEADER = struct.Struct(">8sHHI")  # magic, version, flags, reserved
FILE_HEADER_SIZE = FILE_HEADER.size  # 16
FILE_HEADER_BYTES = FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, 0, 0)
# File flag: batches in this file may carry a key section (readers that do not know it refuse the file).
FLAG_KEYED = 0x0001
KNOWN_FLAGS = FLAG_KEYED

BATCH_MAGIC = b"TSB1"
BATCH_HEADER = struct.Struct(">4sII")  # magic, body length, crc32(body)
BATCH_HEADER_SIZE = BATCH_HEADER.size  # 12
BODY_HEADER = struct.Struct(">QIQ")  # first_seq, count, created_ms
BODY_HEADER_SIZE = BODY_HEADER.size  # 20
TOKEN_LEN = struct.Struct(">I")
# Keyed extension: bit 31 of a batch's count says its body ends in a key section after the
# records: `n` entries (key digest, body digest, accepted), then u32 n.
KEYED_COUNT_BIT = 0x80000000
KEY_ENTRY = struct.Struct(">32s32sI")  # sha256(scope NUL key), sha256(format NUL body), records accepted
KEY_SECTION_COUNT = struct.Struct(">I")

SEGMENT_SUFFIX = ".tslog"
# What segment_name makes; a foreign *.tslog name is read by the reader but is no series' segment.
_SEGMENT_NAME = re.compile(r"(.+)-([0-9]{20})" + re.escape(SEGMENT_SUFFIX))
MAX_SEQ = (1 << 64) - 1  # sequence numbers are unsigned 64-bit (BODY_HEADER)
# A batch body larger than this is treated as corrupt: no writer frames one that big
# (max_body_bytes bounds a request, batch_size bounds a batch), and it keeps a damaged
# length field from making the reader allocate gigabytes.
MAX_BATCH_BODY = 1 << 31


class SegmentFormatError(ValueError):
    """The file is not a v1 segment (bad magic, version or flags)."""


class KeyEntry(NamedTuple):
    """One acknowledged idempotent request, as a keyed batch records it (digests, never the key). A
    named tuple: one is made per keyed request on the ingest path, and it packs as KEY_ENTRY."""

    key: bytes  # sha256 of the principal's scope, NUL, the Idempotency-Key value
    body: bytes  # sha256 of the body's format name, NUL, the decoded body
    accepted: int  # the records the request stored (the 202's `accepted`)


def file_header_bytes(flags: int = 0) -> bytes:
    """The 16-byte file header with `flags` (FLAG_KEYED or 0)."""
    return FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, flags, 0)


def frame_batch(first_seq: int, created_ms: int, tokens: Sequence[bytes], keys: Sequence[KeyEntry] = ()) -> bytes:
    """Return one complete TSB1 batch (header, CRC, body) holding `tokens` in order, and `keys` if any
    (only for files flagged FLAG_KEYED)."""
    count = len(tokens) | (KEYED_COUNT_BIT if keys else 0)
    parts = [BODY_HEADER.pack(first_seq, count, created_ms)]
    pack_len = TOKEN_LEN.pack
    for token in tokens:
        parts.append(pack_len(len(token)))
        parts.append(token)
    if keys:
        parts.append(key_section(keys))
    body = b"".join(parts)
    return BATCH_HEADER.pack(BATCH_MAGIC, len(body), crc_range.crc32(body)) + body


def key_section(keys: Sequence[KeyEntry]) -> bytes:
    """The key section of a keyed batch body: the entries, then their number."""
    pack = KEY_ENTRY.pack
    return b"".join([pack(*k) for k in keys]) + KEY_SECTION_COUNT.pack(len(keys))


def read_key_section(body: bytes | memoryview, length: int) -> tuple[int, tuple[KeyEntry, ...]] | str:
    """The key section at the end of a keyed batch body: (where the records end, the entries), or why
    it is invalid."""
    if length < BODY_HEADER_SIZE + KEY_SECTION_COUNT.size:
        return "key section runs past the body"
    (n,) = KEY_SECTION_COUNT.unpack_from(body, length - KEY_SECTION_COUNT.size)
    records_end = length - KEY_SECTION_COUNT.size - n * KEY_ENTRY.size
    if n == 0 or records_end < BODY_HEADER_SIZE:
        return f"impossible key count {n}"
    unpack = KEY_ENTRY.unpack_from
    entries = tuple(KeyEntry(*unpack(body, records_end + i * KEY_ENTRY.size)) for i in range(n))
    return records_end, entries


def check_file_header(header: bytes) -> int:
    """Return the flags of `header`; raise SegmentFormatError unless it is a valid v1 file header."""
    if len(header) < FILE_HEADER_SIZE:
        raise SegmentFormatError(f"file header is {len(header)} bytes, expected {FILE_HEADER_SIZE}")
    magic, version, flags, _reserved = FILE_HEADER.unpack_from(header)
    if magic != FILE_MAGIC:
        raise SegmentFormatError(f"bad file magic {magic!r}, expected {FILE_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise SegmentFormatError(f"unsupported format version {version}")
    if flags & ~KNOWN_FLAGS:
        raise SegmentFormatError(f"unsupported flags 0x{flags:04x}")
    return int(flags)


@dataclass(frozen=True, slots=True, eq=False)
class Batch:
    """One intact batch: where it sits in the file and what it holds.

    Its tokens are read from the image on demand (token_chunks, iter_tokens), so a batch of
    millions of tiny records costs no memory until they are used; use it while the image is open.
    """

    offset: int
    end: int
    first_seq: int
    count: int
    created_ms: int
    _image: bytes | mmap.mmap = field(repr=False)
    _tokens_at: int = field(repr=False)  # where the first record's length sits in _image
    keys: tuple[KeyEntry, ...] = ()  # the key section of a keyed batch

    @property
    def next_seq(self) -> int:
        return self.first_seq + self.count

    def __eq__(self, other: object) -> bool:
        """Same place, same header fields, same tokens (wherever each image holds them)."""
        if not isinstance(other, Batch):
            return NotImplemented
        return (self.offset, self.end, self.first_seq, self.count, self.created_ms) == (
            other.offset, other.end, other.first_seq, other.count, other.created_ms) and self.tokens == other.tokens \
            and self.keys == other.keys

    def detached(self) -> Batch:
        """The same batch holding a copy of its own bytes, usable after its image is closed."""
        return replace(self, _image=bytes(self._image[self._tokens_at:self.end]), _tokens_at=0)

    def iter_tokens(self) -> Iterator[bytes]:
        """The batch's tokens in order, each copied out of the image as it is reached."""
        for chunk in self.token_chunks(1024):
            yield from chunk

    @property
    def tokens(self) -> list[bytes]:
        """All the batch's tokens (a list as long as the batch: prefer token_chunks for big ones)."""
        return self._read_tokens(0, self.count)[0]

    def token_chunks(self, size: int = 4096) -> Iterator[list[bytes]]:
        """The tokens in lists of at most `size` (for batch decryption in bounded memory)."""
        pos = 0
        for first in range(0, self.count, size):
            chunk, pos = self._read_tokens(pos, min(size, self.count - first))
            yield chunk

    def plaintext_chunks(self, decrypt_span: Callable[[bytes | mmap.mmap, int, int], tuple[list[bytes | None], int]],
                         size: int = 4096) -> Iterator[list[bytes | None]]:
        """The tokens' plaintexts in lists of at most `size`, each list from `decrypt_span(image,
        position, count)` (CryptoService.decrypt_span), which reads the tokens where they lie in the
        image and returns the position after them: no copy of a token is made."""
        at = self._tokens_at
        for first in range(0, self.count, size):
            plaintexts, at = decrypt_span(self._image, at, min(size, self.count - first))
            yield plaintexts

    def _read_tokens(self, pos: int, n: int) -> tuple[list[bytes], int]:
        """`n` tokens from body position `pos` (0: the first token), and the position after them."""
        # Copies (bytes), never views of the map; compiled, this is a tenth of the Python loop's time.
        from .speedups import split_tokens  # here: importing this module stays standard library only (see below)

        out, at = split_tokens(self._image, self._tokens_at + pos, n)
        return out, at - self._tokens_at


@dataclass(frozen=True, slots=True)
class Damage:
    """Bytes that do not form a valid batch.

    `torn`: no valid batch follows, so the file ends in an incomplete write (or a
    batch still being written). `corrupt`: a valid batch follows at `end`.
    """

    offset: int
    end: int
    kind: Literal["torn", "corrupt"]
    detail: str


def _parse_at(buf: bytes | bytearray | mmap.mmap, offset: int, size: int,
              crcs: RangeCrc | None = None) -> Batch | str:
    """Parse the batch at `offset`; return it, or a string saying why it is invalid.

    With `crcs`, the body's CRC comes from prefix CRCs in bounded time instead of hashing the
    whole claimed body, so checking many overlapping candidates stays linear (see _resync).
    """
    if size - offset < BATCH_HEADER_SIZE:
        return f"{size - offset} bytes left, shorter than a batch header"
    magic, length, crc = BATCH_HEADER.unpack_from(buf, offset)
    if magic != BATCH_MAGIC:
        return f"bad batch magic {bytes(magic)!r}"
    if length < BODY_HEADER_SIZE or length > MAX_BATCH_BODY:
        return f"impossible body length {length}"
    start = offset + BATCH_HEADER_SIZE
    end = start + length
    if end > size:
        return f"body of {length} bytes runs {end - size} bytes past the end of the file"
    if crcs is not None and crcs.range(start, end) != crc:
        return "CRC mismatch"
    body = memoryview(buf)[start:end]
    try:
        if crcs is None and crc_range.crc32(body) != crc:
            return "CRC mismatch"
        first_seq, count, created_ms = BODY_HEADER.unpack_from(body, 0)
        records_end = length
        keys: tuple[KeyEntry, ...] = ()
        if count & KEYED_COUNT_BIT:
            section = read_key_section(body, length)
            if isinstance(section, str):
                return section
            records_end, keys = section
            count &= ~KEYED_COUNT_BIT
        if count > (records_end - BODY_HEADER_SIZE) // TOKEN_LEN.size:
            return "record count runs past the body"
        # Check the record lengths; the tokens are read later, on demand. Imported per batch, not at
        # the top: the client's spool uses this module and must not load the extension (or OpenSSL).
        from .speedups import scan_tokens

        pos = scan_tokens(body, BODY_HEADER_SIZE, records_end, count)
        if pos < 0:
            return "record count runs past the body" if pos == -1 else "record length runs past the body"
        if pos != records_end:
            return f"{records_end - pos} stray bytes after the last record"
    finally:
        body.release()
    if isinstance(buf, bytearray):
        # A window that will be reused (a streamed segment): keep a copy of just this batch's records.
        return Batch(offset, end, first_seq, count, created_ms, bytes(buf[start + BODY_HEADER_SIZE : end]), 0,
                     keys)
    return Batch(offset, end, first_seq, count, created_ms, buf, start + BODY_HEADER_SIZE, keys)


def _resync(buf: bytes | mmap.mmap, offset: int, size: int, crcs: RangeCrc) -> Batch | None:
    """Find the next valid batch after `offset` (magic, sane length and CRC all agree).

    Every candidate's CRC is checked through `crcs` in bounded time, so a file packed with fake
    headers claiming long bodies costs time linear in its size, not quadratic.
    """
    pos = offset + 1
    while True:
        pos = buf.find(BATCH_MAGIC, pos, size)
        if pos < 0:
            return None
        found = _parse_at(buf, pos, size, crcs)
        if isinstance(found, Batch):
            return found
        pos += 1


def iter_batches(buf: bytes | mmap.mmap, start: int = FILE_HEADER_SIZE) -> Iterator[Batch | Damage]:
    """Walk the batches of a segment image from `start`, resynchronising past damage."""
    size = len(buf)
    offset = start
    crcs: RangeCrc | None = None  # made at the first damage: an intact file never needs it
    while offset < size:
        found = _parse_at(buf, offset, size, crcs)
        if isinstance(found, Batch):
            yield found
            offset = found.end
            continue
        if crcs is None:
            crcs = RangeCrc(buf)
        following = _resync(buf, offset, size, crcs)
        if following is None:
            yield Damage(offset, size, "torn", found)
            return
        yield Damage(offset, following.offset, "corrupt", found)
        offset = following.offset


class SegmentImage:
    """A read-only, memory-mapped view of one segment file (header already checked).

    With `fd`, the image maps that already-open file (start-up recovery opens it with O_NOFOLLOW)
    and leaves closing it to the caller.
    """

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = path
        with open(path, "rb") if fd is None else os.fdopen(fd, "rb", closefd=False) as f:
            self.size = os.fstat(f.fileno()).st_size
            self.flags = check_file_header(os.pread(f.fileno(), FILE_HEADER_SIZE, 0))
            self._map: bytes | mmap.mmap = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if self.size > FILE_HEADER_SIZE
                else FILE_HEADER_BYTES
            )

    def batches(self, start: int = FILE_HEADER_SIZE) -> Iterator[Batch | Damage]:
        return iter_batches(self._map, start)

    def raw(self, start: int, end: int) -> bytes:
        """The file's bytes from `start` to `end` (for copying damage verbatim)."""
        return bytes(self._map[start:end])

    def release(self, upto: int) -> None:
        """Say the bytes before `upto` will not be read again, so their pages leave this process's
        resident set (they stay in the page cache): keeps a reader's memory flat on big segments."""
        if isinstance(self._map, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            length = upto - upto % mmap.PAGESIZE
            if length > 0:
                self._map.madvise(mmap.MADV_DONTNEED, 0, length)

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()

    def __enter__(self) -> SegmentImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_segments(directory: Path) -> list[Path]:
    """Segment files in `directory`, sorted by name (series, then write order)."""
    return sorted(p for p in directory.glob(f"*{SEGMENT_SUFFIX}") if p.is_file())


def segment_name(series: str, first_seq: int) -> str:
    """File name of a segment whose first batch starts at `first_seq`; sorts in write order."""
    return f"{series}-{first_seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(path: Path) -> tuple[str, int]:
    """(series, first_seq) from a name made by `segment_name`; ValueError for any other name."""
    match = _SEGMENT_NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not named <series>-<20-digit first sequence number>{SEGMENT_SUFFIX}")
    return match[1], int(match[2])


def series_segments(directory: Path, series: str) -> list[Path]:
    """The segments of one series, in write order (foreign names are no series' segments)."""
    out = []
    for path in list_segments(directory):
        match = _SEGMENT_NAME.fullmatch(path.name)
        if match is not None and match[1] == series:
            out.append(path)
    return out


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may be partial)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_durably(path: Path, data: bytes, tmp: Path, mode: int = 0o600, *, replace: bool = True) -> None:
    """Write `data` to `tmp` (never through a symlink planted there), fsync it, then rename it over
    `path` (`replace`) and fsync the directory, so `path` holds the old or the new bytes after a crash.
    With `replace=False` the caller moves `tmp` into place itself."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(tmp, path)
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
