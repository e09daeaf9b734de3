"""The streamed walk yields exactly what the mapped walk yields, whatever the damage and the chunk sizes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_log
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_sink import segment_format, segment_stream
from telemetry_sink.segment_format import FILE_HEADER_SIZE, SegmentFormatError, iter_batches
from telemetry_sink.segment_stream import iter_stream_batches


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("stream")
    write_log(directory, Fernet.generate_key(), 200, segment_bytes=1 << 20)
    [segment] = segment_format.list_segments(directory)
    return Path(segment).read_bytes()


def chunked(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos, i = pos + n, i + 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 10**9), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
       start_batch=st.integers(0, 3))
def test_same_walk_as_the_mapped_reader(image: bytes, edits: list[tuple[int, int]], cut: int, sizes: list[int],
                                        start_batch: int) -> None:
    data = bytearray(image)
    for pos, value in edits:
        data[FILE_HEADER_SIZE + pos % (len(data) - FILE_HEADER_SIZE)] = value
    data = data[: max(FILE_HEADER_SIZE, len(image) - cut % 3000)] if cut % 2 else data
    whole = bytes(data)
    starts = [FILE_HEADER_SIZE] + [b.end for b in iter_batches(whole) if isinstance(b, segment_format.Batch)]
    start = starts[min(start_batch, len(starts) - 1)]
    assert list(iter_stream_batches(chunked(whole, sizes), len(whole), start)) == list(iter_batches(whole, start))


def test_big_chunks_and_a_bad_header(image: bytes) -> None:
    assert list(iter_stream_batches(iter([image]), len(image))) == list(iter_batches(image))
    with pytest.raises(SegmentFormatError, match="bad file magic"):
        list(iter_stream_batches(iter([b"NOTALOG!" + image[8:]]), len(image)))
    # An object shorter than its listing (cut short in transit) ends in a torn tail, like a short file.
    short = image[: len(image) - 7]
    assert list(iter_stream_batches(iter([short]), len(image))) == list(iter_batches(short))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), max_size=4),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=3))
def test_same_walk_when_every_consumed_byte_is_dropped_at_once(image: bytes, edits: list[tuple[int, int]],
                                                               sizes: list[int]) -> None:
    data = bytearray(image)
    for pos, value in edits:
        data[FILE_HEADER_SIZE + pos % (len(data) - FILE_HEADER_SIZE)] = value
    whole = bytes(data)
    saved = segment_stream._RELEASE_BYTES
    segment_stream._RELEASE_BYTES = 1  # the window forgets everything behind it as soon as it may
    try:
        assert list(iter_stream_batches(chunked(whole, sizes), len(whole))) == list(iter_batches(whole))
    finally:
        segment_stream._RELEASE_BYTES = saved
