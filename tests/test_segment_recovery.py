"""Start-up checks of the log directory against a real server: symlinks, names out of range,
foreign names and files that are not segments each get one line and exit status 2 (or one
warning), and recovery never rewrites what it must not."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from conftest import StartServer, wait_for

from telemetry_sink import segment_format
from telemetry_sink.segment_format import FILE_HEADER_BYTES, MAX_SEQ, frame_batch, segment_name


def refused(start_server: StartServer, data: Path, workers: int = 1) -> str:
    """Start a server on `data`; assert it exits 2 with one line and no traceback; return the line."""
    server = start_server({"server": {"workers": workers}, "writer": {"directory": str(data)}}, wait=False,
                          separate_stderr=True)
    assert server.wait() == 2
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("telemetry-sink: error: "), server.stderr()
    assert "Traceback" not in server.log()
    return lines[0]


def torn_segment() -> bytes:
    return FILE_HEADER_BYTES + frame_batch(0, 1, [b"kept"]) + frame_batch(1, 2, [b"torn" * 10])[:-7]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_symlinked_segment_is_refused_and_its_target_never_truncated(
        start_server: StartServer, tmp_path: Path, workers: int) -> None:
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(torn_segment())  # recovery would cut its torn tail, through the link
    data = tmp_path / "data"
    data.mkdir()
    (data / segment_name("w0", 0)).symlink_to(target)
    line = refused(start_server, data, workers)
    assert "is a symbolic link" in line and segment_name("w0", 0) in line
    assert target.read_bytes() == torn_segment()


def test_a_symlinked_lock_file_is_refused_and_nothing_is_created_through_it(
        start_server: StartServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "w0.lock").symlink_to(tmp_path / "planted")
    line = refused(start_server, data)
    assert "w0.lock is a symbolic link" in line
    assert not (tmp_path / "planted").exists()


def test_the_data_directory_itself_may_be_a_symlink(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    real = tmp_path / "real-data"
    real.mkdir()
    (tmp_path / "data-link").symlink_to(real, target_is_directory=True)
    server = start_server({"writer": {"directory": str(tmp_path / "data-link")}})
    assert server.post(b'{"node_id":"n"}').status_code == 202
    server.stop()
    assert [p.name for p in segment_format.list_segments(real)] == [segment_name("w0", 0)]


@pytest.mark.parametrize("seq", [MAX_SEQ + 1, 10**20 - 1], ids=["2**64", "largest-20-digit"])
def test_a_sequence_number_beyond_64_bits_in_a_name_is_refused(start_server: StartServer,
                                                                 tmp_path: Path, seq: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / segment_name("w0", seq)).write_bytes(FILE_HEADER_BYTES)
    line = refused(start_server, data, workers=2 if seq > MAX_SEQ + 1 else 1)
    assert f"first sequence number {seq} is beyond the largest possible" in line


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("content", [b"this is a text file, not a segment\n", b"hello"], ids=["long", "short"])
def test_a_newest_segment_with_bad_magic_is_refused_and_left_alone(start_server: StartServer,
                                                                    tmp_path: Path, content: bytes,
                                                                    workers: int) -> None:
    data = tmp_path / "data"
    data.mkdir()
    victim = data / segment_name("w0", 0)
    victim.write_bytes(content)
    line = refused(start_server, data, workers)
    assert f"{victim} is not a segment" in line and "move it out" in line
    assert victim.read_bytes() == content


def test_foreign_names_are_ignored_with_one_warning(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    foreign = {"notes.tslog": b"not ours", "w0-12.tslog": b"short number", "w0-x.tslog": b"no number"}
    for name, content in foreign.items():
        (data / name).write_bytes(content)
    server = start_server({"writer": {"directory": str(data)}})
    r = server.post(orjson.dumps({"node_id": "n", "k": 1}))
    assert r.status_code == 202
    wait_for(lambda: any(p.name == segment_name("w0", 0) for p in data.iterdir()), what="the writer's segment")
    server.stop()
    warnings = [line for line in server.log().splitlines() if "not named as segments are" in line]
    assert len(warnings) == 1 and all(name in warnings[0] for name in foreign)
    assert {name: (data / name).read_bytes() for name in foreign} == foreign  # untouched
    assert segment_format.series_segments(data, "w0") == [data / segment_name("w0", 0)]
    assert os.path.getsize(data / segment_name("w0", 0)) > len(FILE_HEADER_BYTES)


def test_a_series_whose_batches_used_every_sequence_number_is_refused(start_server: StartServer,
                                                                       tmp_path: Path) -> None:
    """The name is in range but a batch in it runs to the last number: nothing more can be written."""
    data = tmp_path / "data"
    data.mkdir()
    (data / segment_name("w0", 0)).write_bytes(FILE_HEADER_BYTES + frame_batch(MAX_SEQ - 1, 1, [b"a", b"b"]))
    line = refused(start_server, data)
    assert f"has used every sequence number up to {MAX_SEQ}" in line
