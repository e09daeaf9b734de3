"""Segment format v1: framing, header checks and the resynchronising reader."""

from __future__ import annotations

import errno
import random
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from telemetry_sink import crc_range, segment_format, segment_keys
from telemetry_sink.segment_format import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    FILE_HEADER_BYTES,
    FILE_HEADER_SIZE,
    Batch,
    Damage,
    frame_batch,
    iter_batches,
)
from telemetry_sink.segment_stream import iter_stream_batches


def image(*batches: bytes) -> bytes:
    return FILE_HEADER_BYTES + b"".join(batches)


def test_file_header_layout() -> None:
    assert b"TSINKLOG" + struct.pack(">HHI", 1, 0, 0) == FILE_HEADER_BYTES
    assert len(FILE_HEADER_BYTES) == 16


def test_frame_batch_layout_byte_for_byte() -> None:
    data = frame_batch(42, 1_700_000_000_123, [b"tok1", b"token-two"])
    body = struct.pack(">QIQ", 42, 2, 1_700_000_000_123) + struct.pack(">I", 4) + b"tok1" + \
        struct.pack(">I", 9) + b"token-two"
    assert data == b"TSB1" + struct.pack(">II", len(body), zlib.crc32(body)) + body


_KEYS = [segment_format.KeyEntry(b"k" * 32, b"b" * 32, 2), segment_format.KeyEntry(b"K" * 32, b"B" * 32, 7)]


def test_keyed_batch_layout_byte_for_byte() -> None:
    data = frame_batch(42, 1_700_000_000_123, [b"tok1"], _KEYS)
    body = struct.pack(">QIQ", 42, 0x80000001, 1_700_000_000_123) + struct.pack(">I", 4) + b"tok1" + \
        b"k" * 32 + b"b" * 32 + struct.pack(">I", 2) + b"K" * 32 + b"B" * 32 + struct.pack(">I", 7) + \
        struct.pack(">I", 2)
    assert data == b"TSB1" + struct.pack(">II", len(body), zlib.crc32(body)) + body
    assert segment_keys.with_keys(frame_batch(42, 1_700_000_000_123, [b"tok1"]), _KEYS) == data


def test_keyed_batches_read_back_with_their_keys_among_plain_ones() -> None:
    data = segment_format.file_header_bytes(segment_format.FLAG_KEYED) + frame_batch(0, 1, [b"a", b"b"], _KEYS) + \
        frame_batch(2, 2, [b"c"]) + frame_batch(3, 3, [], _KEYS[:1])
    assert segment_format.check_file_header(data[:16]) == segment_format.FLAG_KEYED
    batches = list(iter_batches(data))
    assert [(b.first_seq, b.count, b.tokens, b.keys) for b in batches if isinstance(b, Batch)] == [
        (0, 2, [b"a", b"b"], tuple(_KEYS)), (2, 1, [b"c"], ()), (3, 0, [], tuple(_KEYS[:1]))]


@pytest.mark.parametrize("n", [0, 3, 1 << 30], ids=lambda n: f"key-count-{n}")
def test_impossible_key_count_is_damage(n: int) -> None:
    data = bytearray(frame_batch(0, 1, [b"abc"], _KEYS[:1]))
    struct.pack_into(">I", data, len(data) - 4, n)
    body = bytes(data[12:])
    struct.pack_into(">I", data, 8, zlib.crc32(body))  # a valid CRC: the key section itself must be checked
    (item,) = iter_batches(image(bytes(data)))
    assert isinstance(item, Damage)


def test_reader_returns_batches_in_order() -> None:
    items = list(iter_batches(image(frame_batch(0, 1, [b"a", b"b"]), frame_batch(2, 2, []), frame_batch(2, 3, [b"c"]))))
    assert all(isinstance(i, Batch) for i in items)
    batches = [i for i in items if isinstance(i, Batch)]
    assert [(b.first_seq, b.count, b.created_ms, b.tokens) for b in batches] == [
        (0, 2, 1, [b"a", b"b"]), (2, 0, 2, []), (2, 1, 3, [b"c"])]
    assert batches[0].offset == 16 and batches[1].offset == batches[0].end


@pytest.mark.parametrize("cut", [1, 11, 12, 20, 31, 40], ids=lambda c: f"cut-{c}-bytes-in")
def test_torn_tail_is_reported_where_it_starts(cut: int) -> None:
    first = frame_batch(0, 1, [b"x" * 10])
    second = frame_batch(1, 2, [b"y" * 30])
    data = image(first, second[:cut])
    items = list(iter_batches(data))
    assert isinstance(items[0], Batch)
    assert items[1] == Damage(16 + len(first), len(data), "torn", items[1].detail)  # type: ignore[union-attr]


@pytest.mark.parametrize("where", [0, 5, 9, 14, 25, 60], ids=lambda w: f"byte-{w}")
def test_corrupt_batch_in_the_middle_is_skipped_by_resync(where: int) -> None:
    batches = [frame_batch(i, i, [b"record-%d" % i * 5]) for i in range(3)]
    damaged = bytearray(batches[1])
    damaged[where] ^= 0xFF
    items = list(iter_batches(image(batches[0], bytes(damaged), batches[2])))
    kinds = [i.kind if isinstance(i, Damage) else i.first_seq for i in items]
    assert kinds == [0, "corrupt", 2]
    damage = items[1]
    assert isinstance(damage, Damage) and damage.offset == 16 + len(batches[0])
    assert damage.end == 16 + len(batches[0]) + len(batches[1])


def test_crc_catches_a_flipped_token_byte() -> None:
    data = bytearray(image(frame_batch(0, 0, [b"abcdef"])))
    data[-2] ^= 1
    (item,) = iter_batches(bytes(data))
    assert isinstance(item, Damage) and item.detail == "CRC mismatch"


def test_impossible_length_does_not_allocate() -> None:
    data = image(b"TSB1" + struct.pack(">II", 0xFFFFFFFF, 0))
    (item,) = iter_batches(data)
    assert isinstance(item, Damage) and item.kind == "torn"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param(b"TSINKLO", "file header is 7 bytes", id="short"),
        pytest.param(b"XSINKLOG" + bytes(8), "bad file magic", id="magic"),
        pytest.param(b"TSINKLOG" + struct.pack(">HHI", 2, 0, 0), "unsupported format version 2", id="version"),
        pytest.param(b"TSINKLOG" + struct.pack(">HHI", 1, 2, 0), "unsupported flags 0x0002", id="flags"),
    ],
)
def test_bad_file_headers(header: bytes, message: str) -> None:
    with pytest.raises(segment_format.SegmentFormatError, match=message):
        segment_format.check_file_header(header)


def test_segment_image_and_names(tmp_path: Path) -> None:
    names = [segment_format.segment_name("w0", s) for s in (0, 9, 10, 123456789012)]
    assert names == sorted(names)
    path = tmp_path / names[0]
    path.write_bytes(image(frame_batch(0, 0, [b"q"])))
    (tmp_path / "other.txt").write_text("x")
    assert segment_format.list_segments(tmp_path) == [path]
    with segment_format.SegmentImage(path) as seg:
        assert [b.tokens for b in seg.batches() if isinstance(b, Batch)] == [[b"q"]]
    empty = tmp_path / names[1]
    empty.write_bytes(FILE_HEADER_BYTES)
    with segment_format.SegmentImage(empty) as seg:
        assert list(seg.batches()) == []


def test_segment_names_parse_back_and_select_one_series(tmp_path: Path) -> None:
    for series, seq in (("w0", 0), ("w12", 98765), ("my-host-w1", 7)):
        assert segment_format.parse_segment_name(tmp_path / segment_format.segment_name(series, seq)) == (series, seq)
    for series, seq in (("w1", 5), ("w0", 9), ("w10", 1), ("w0", 0)):
        (tmp_path / segment_format.segment_name(series, seq)).write_bytes(FILE_HEADER_BYTES)
    assert [p.name for p in segment_format.series_segments(tmp_path, "w0")] == [
        segment_format.segment_name("w0", 0), segment_format.segment_name("w0", 9)]


def crafted_segment(size: int) -> bytes:
    """The hostile file of issue 10: a fake batch header every 12 bytes, each claiming a body that
    runs exactly to the end of the file, each with a wrong CRC."""
    n = (size - FILE_HEADER_SIZE) // BATCH_HEADER_SIZE
    total = FILE_HEADER_SIZE + BATCH_HEADER_SIZE * n
    return FILE_HEADER_BYTES + b"".join(
        BATCH_HEADER.pack(b"TSB1", total - off - BATCH_HEADER_SIZE, 0xDEADBEEF)
        for off in range(FILE_HEADER_SIZE, total, BATCH_HEADER_SIZE))


def test_crafted_fake_headers_are_one_torn_tail() -> None:
    data = crafted_segment(4096)
    assert list(iter_batches(data)) == [Damage(16, len(data), "torn", "CRC mismatch")]


def test_resync_finds_a_valid_batch_behind_crafted_fake_headers() -> None:
    good = frame_batch(7, 1, [b"survivor"])
    fake = crafted_segment(2048)[FILE_HEADER_SIZE:]
    items = list(iter_batches(image(frame_batch(0, 0, [b"first"]), fake, good)))
    assert [type(i).__name__ for i in items] == ["Batch", "Damage", "Batch"]
    assert isinstance(items[2], Batch) and items[2].tokens == [b"survivor"]


def mapped_walk(data: bytes) -> None:
    list(iter_batches(data))


def streamed_walk(data: bytes) -> None:
    """The walk of a segment downloaded in 64 KiB chunks (read/verify of s3:// sources)."""
    list(iter_stream_batches((data[i : i + 65536] for i in range(0, len(data), 65536)), len(data)))


def hashed_bytes(data: bytes, monkeypatch: pytest.MonkeyPatch, walk: Callable[[bytes], None] = mapped_walk) -> int:
    """Bytes fed to the readers' CRC-32 while walking `data`: their work, independent of machine load."""
    counted = [0]
    real = crc_range.crc32

    def counting(buf: Any, value: int = 0) -> int:
        counted[0] += len(buf)
        return real(buf, value)

    with monkeypatch.context() as m:
        m.setattr(crc_range, "crc32", counting)
        walk(data)
    return counted[0]


@pytest.mark.parametrize("walk", [mapped_walk, streamed_walk], ids=["mapped", "streamed"])
def test_resync_work_is_linear_in_the_size_of_a_crafted_file(monkeypatch: pytest.MonkeyPatch,
                                                             walk: Callable[[bytes], None]) -> None:
    """Quadratic resynchronisation (34 s at 1 MiB) hashed each fake body to the end of the file."""
    small = hashed_bytes(crafted_segment(64 << 10), monkeypatch, walk)
    large = hashed_bytes(crafted_segment(256 << 10), monkeypatch, walk)
    assert large / small < 4 * 1.25  # linear: 4x; quadratic: 16x
    assert large < 64 * (256 << 10)  # and a small constant per byte


def walk_time(data: bytes) -> float:
    started = time.perf_counter()
    list(iter_batches(data))
    return time.perf_counter() - started


def test_resync_time_grows_linearly_not_quadratically() -> None:
    """An 8x larger crafted file takes about 8x as long (64x when quadratic): best of 5 rounds,
    the two sizes interleaved so that a burst of load on the machine hits both alike."""
    small_data, large_data = crafted_segment(64 << 10), crafted_segment(512 << 10)
    rounds = [(walk_time(small_data), walk_time(large_data)) for _ in range(5)]
    small, large = min(r[0] for r in rounds), min(r[1] for r in rounds)
    assert large / small < 24, f"{small:.3f}s -> {large:.3f}s"


@pytest.mark.parametrize("seed", range(5))
def test_range_crc_matches_zlib(seed: int) -> None:
    rng = random.Random(seed)
    buf = rng.randbytes(rng.randrange(1, 20_000))
    crcs = crc_range.RangeCrc(buf, stride=rng.choice([1, 7, 64, 1024]))
    for _ in range(200):
        a = rng.randrange(len(buf) + 1)
        b = rng.randrange(a, len(buf) + 1)
        assert crcs.range(a, b) == zlib.crc32(buf[a:b])


def test_readers_use_zlib_ngs_crc32_and_it_is_zlibs() -> None:
    """The readers' CRC-32 is zlib-ng's (a dependency: 13x zlib's) and gives zlib's values, chained
    from any start value, on views of maps as on bytes."""
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    assert crc_range.crc32 is zlib_ng.crc32
    rng = random.Random(7)
    for size in (0, 1, 15, 16, 63, 64, 65, 4095, 300_000):
        data = rng.randbytes(size)
        start = rng.randrange(1 << 32)
        assert crc_range.crc32(data) == zlib.crc32(data)
        assert crc_range.crc32(memoryview(data)[1:], start) == zlib.crc32(data[1:], start)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 255, 1 << 20, (1 << 32) - 1, 1 << 32, (1 << 40) + 3])
def test_shift_agrees_with_the_slow_polynomial_product(n: int) -> None:
    crc = 0x12345678
    assert crc_range.shift(crc, n) == crc_range._multmodp(crc_range._x8n(n), crc)
    if n < 1 << 16:
        assert crc_range.combine(zlib.crc32(b"abc"), zlib.crc32(bytes(n)), n) == zlib.crc32(b"abc" + bytes(n))


@pytest.mark.parametrize("n", [0, 1, 3, 257], ids=lambda n: f"{n}-records")
def test_keys_added_to_a_framed_batch_equal_framing_with_them(n: int) -> None:
    """keyed_parts derives the new CRC without hashing the records again: it must equal a fresh CRC."""
    tokens = [b"t%d-" % i * (1 + i % 13) for i in range(n)]
    plain = frame_batch(7, 1_700_000_000_000, tokens)
    assert segment_keys.with_keys(plain, _KEYS) == frame_batch(7, 1_700_000_000_000, tokens, _KEYS)
    (batch,) = iter_batches(image(segment_keys.with_keys(plain, _KEYS[:1])))
    assert isinstance(batch, Batch) and batch.tokens == tokens and batch.keys == tuple(_KEYS[:1])


def tiny_token_segment(path: Path, size: int) -> Path:
    """One valid batch of zero-length tokens filling `size` bytes: millions of records that do not
    authenticate (verify --key-file on 19 MiB of this peaked at 730 MiB)."""
    n = (size - FILE_HEADER_SIZE - BATCH_HEADER_SIZE - 20) // 4
    body = struct.pack(">QIQ", 0, n, 1) + bytes(4 * n)
    path.write_bytes(FILE_HEADER_BYTES + BATCH_HEADER.pack(b"TSB1", len(body), zlib.crc32(body)) + body)
    return path


def verify_peak_rss_kib(segment: Path, key: Path) -> int:
    """Peak RSS of a `verify --key-file` run (measured inside the child, so no other process counts)."""
    code = ("import resource, sys; from telemetry_sink.cli import main; sys.stdout = open('/dev/null', 'w'); "
            "rc = main(['verify', '--key-file', sys.argv[1], sys.argv[2]]); "
            "sys.stderr.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(key), str(segment)], capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr  # damaged: the records do not authenticate
    return int(done.stderr.decode().strip().splitlines()[-1])


def test_verify_memory_does_not_grow_with_the_number_of_records(tmp_path: Path, key_file: Path) -> None:
    small = verify_peak_rss_kib(tiny_token_segment(tmp_path / segment_format.segment_name("a", 0), 1 << 20), key_file)
    large = verify_peak_rss_kib(tiny_token_segment(tmp_path / segment_format.segment_name("b", 0), 4 << 20), key_file)
    # The mapped file itself may be resident (3 MiB more); per-record lists or lines were ~110 MiB more.
    assert large - small < 12 * 1024, f"{small} KiB -> {large} KiB"


@pytest.mark.parametrize("size", [1, 7, 1000, 5000])
def test_token_chunks_and_iter_tokens_give_the_tokens_in_order(size: int) -> None:
    tokens = [b"t%d" % i * (i % 5) for i in range(3001)]
    (batch,) = iter_batches(image(frame_batch(0, 1, tokens)))
    assert isinstance(batch, Batch)
    chunks = list(batch.token_chunks(size))
    assert all(0 < len(c) <= size for c in chunks) and [t for c in chunks for t in c] == tokens
    assert list(batch.iter_tokens()) == batch.tokens == tokens


def test_write_durably_never_writes_through_a_symlink_planted_at_its_temp_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    tmp = tmp_path / "state.tmp"
    tmp.symlink_to(victim)
    with pytest.raises(OSError) as info:
        segment_format.write_durably(tmp_path / "state", b"new", tmp)
    assert info.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "state").exists()
    tmp.unlink()
    segment_format.write_durably(tmp_path / "state", b"new", tmp)
    assert (tmp_path / "state").read_bytes() == b"new" and not tmp.exists()
