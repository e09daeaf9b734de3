"""rotate-key: re-encrypts sealed segments under the first key, crash-safely, idempotently."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_config, write_log
from cryptography.fernet import Fernet

from telemetry_sink import segment_format
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.rotate import rotate_directory
from telemetry_sink.segment_writer import SegmentWriter
from telemetry_sink.testing import clean_env


def tokens(directory: Path) -> list[tuple[int, bytes]]:
    out = []
    for path in segment_format.list_segments(directory):
        with segment_format.SegmentImage(path) as seg:
            for item in seg.batches():
                assert isinstance(item, segment_format.Batch)
                out.extend((item.first_seq + i, t) for i, t in enumerate(item.tokens))
    return out


@pytest.fixture
def rotated_setup(tmp_path: Path) -> tuple[Path, Path, bytes, bytes]:
    old, new = generate_key(), generate_key()
    data = tmp_path / "data"
    write_log(data, old, 40_000, segment_bytes=100_000)
    key_file = tmp_path / "keys"
    key_file.write_bytes(new + b"\n" + old + b"\n")
    os.chmod(key_file, 0o600)
    values = {"writer": {"directory": str(data)}, "crypto": {"key_file": str(key_file)}}
    config = write_config(tmp_path / "c.ini", values)
    return config, data, old, new


def test_rotate_key_reencrypts_everything_keeps_content_then_is_a_no_op(
        rotated_setup: tuple[Path, Path, bytes, bytes]) -> None:
    config, data, old, new = rotated_setup
    before = tokens(data)
    assert len(segment_format.list_segments(data)) > 3
    done = run_cli("rotate-key", "--config", str(config))
    assert done.returncode == 0, done.stderr.decode()
    assert b"segments re-encrypted (40000 records)" in done.stdout
    after = tokens(data)
    assert [seq for seq, _ in after] == [seq for seq, _ in before]
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert Fernet(new).decrypt(b) == Fernet(old).decrypt(a)  # same record, new key
        assert Fernet(new).extract_timestamp(b) == Fernet(old).extract_timestamp(a)
    assert run_cli("verify", str(data)).returncode == 0
    again = run_cli("rotate-key", "--config", str(config))
    assert b"0 segments re-encrypted" in again.stdout
    assert tokens(data) == after  # byte-for-byte untouched


def test_rotate_key_killed_midway_leaves_every_segment_readable(rotated_setup: tuple[Path, Path, bytes, bytes],
                                                                tmp_path: Path) -> None:
    config, data, old, new = rotated_setup
    expected = sorted(Fernet(old).decrypt(t) for _, t in tokens(data))
    env = clean_env()
    interrupted = 0

    def inodes() -> dict[str, int]:
        out = {}
        for path in data.glob("*.tslog"):
            with contextlib.suppress(FileNotFoundError):  # being renamed over right now
                out[path.name] = path.stat().st_ino
        return out

    for _ in range(5):
        # Killed just after the run has replaced a segment (a rename gives it a new inode): midway,
        # however fast the rotation is, not at a guessed moment.
        before = inodes()
        proc = subprocess.Popen([sys.executable, "-m", "telemetry_sink", "rotate-key", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            now = inodes()
            if any(now.get(name, ino) != ino for name, ino in before.items()):
                break
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        interrupted += proc.wait() == -signal.SIGKILL
        crypto = CryptoService.from_key_file(tmp_path / "keys")
        assert sorted(crypto.decrypt(t) for _, t in tokens(data)) == expected
    assert interrupted >= 2, "the rotation finished before any kill: make the log bigger"
    done = run_cli("rotate-key", "--config", str(config))
    assert done.returncode == 0
    assert all(Fernet(new).decrypt(t) for _, t in tokens(data))
    assert not list(data.glob("*.rotating"))


def test_active_segment_of_a_running_writer_is_skipped(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    data = tmp_path / "data"
    write_log(data, old, 200, segment_bytes=1 << 20)  # one segment, not full: a writer would append to it
    (segment,) = segment_format.list_segments(data)
    holder = SegmentWriter(data, CryptoService([old.decode()], "old"), batch_size=1, flush_interval_ms=5, fsync="never",
                       fsync_interval_ms=1000, max_segment_bytes=1 << 20)
    holder.open()
    crypto = CryptoService([new.decode(), old.decode()], "rotated")
    report = rotate_directory(data, crypto)
    assert report.skipped_active == [segment] and not report.rewritten
    holder.close()
    report = rotate_directory(data, crypto)
    assert report.rewritten == [segment]


def test_unreadable_record_fails_that_segment_only(tmp_path: Path) -> None:
    old = generate_key()
    data = tmp_path / "data"
    write_log(data, old, 300)
    crypto = CryptoService([generate_key().decode()], "unrelated")  # cannot decrypt anything
    before = tokens(data)
    report = rotate_directory(data, crypto)
    assert report.failed and not report.rewritten
    assert tokens(data) == before


def test_rotation_keeps_each_tokens_time_and_untouched_batches(tmp_path: Path) -> None:
    """A segment mixing a batch the framer wrote (one time for all), a batch of tokens with their
    own times (as an earlier MultiFernet.rotate leaves them) and a batch already under the new key."""
    old, new = generate_key(), generate_key()
    data = tmp_path / "data"
    data.mkdir()
    framed = CryptoService([old.decode()], "old").new_framer().frame(0, 1_700_000_000_999, [b"a", b"b"])
    own_times = segment_format.frame_batch(2, 1_700_000_000_000, [Fernet(old).encrypt_at_time(b"c", 5),
                                                                  Fernet(new).encrypt_at_time(b"d", 6)])
    current = CryptoService([new.decode()], "new").new_framer().frame(4, 1_700_000_001_000, [b"e"])
    path = data / segment_format.segment_name("w0", 0)
    path.write_bytes(segment_format.FILE_HEADER_BYTES + framed + own_times + current)
    report = rotate_directory(data, CryptoService([new.decode(), old.decode()], "both"))
    assert report.rewritten == [path] and report.tokens_rotated == 3
    after = [t for _, t in tokens(data)]
    assert [Fernet(new).decrypt(t) for t in after] == [b"a", b"b", b"c", b"d", b"e"]
    assert [Fernet(new).extract_timestamp(t) for t in after] == [1_700_000_000, 1_700_000_000, 5, 6, 1_700_000_001]
    assert path.read_bytes().endswith(current)  # a batch already under the first key is copied as it was


def test_rotation_keeps_the_keyed_flag_and_key_sections(tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    keys = (segment_format.KeyEntry(b"k" * 32, b"b" * 32, 1),)
    data = tmp_path / "data"
    data.mkdir()
    path = data / segment_format.segment_name("w0", 0)
    other = (segment_format.KeyEntry(b"K" * 32, b"B" * 32, 1),)
    path.write_bytes(segment_format.file_header_bytes(segment_format.FLAG_KEYED)
                     + segment_format.frame_batch(0, 1_000, [Fernet(old).encrypt_at_time(b"r", 1)], keys)
                     + segment_format.frame_batch(1, 9_000, [Fernet(old).encrypt_at_time(b"s", 7)], other))
    report = rotate_directory(data, CryptoService([new.decode(), old.decode()], "test"))
    assert report.tokens_rotated == 2  # the first batch re-framed in one call, the second token by token
    with segment_format.SegmentImage(path) as image:
        assert image.flags == segment_format.FLAG_KEYED
        batches = [b for b in image.batches() if isinstance(b, segment_format.Batch)]
        assert [b.keys for b in batches] == [keys, other]
        assert [Fernet(new).decrypt(b.tokens[0]) for b in batches] == [b"r", b"s"]


def test_a_foreign_name_in_the_directory_does_not_stop_rotation(tmp_path: Path) -> None:
    """Foreign *.tslog names are no series' segments (the server ignores them with a warning)."""
    old, new = generate_key(), generate_key()
    data = tmp_path / "data"
    write_log(data, old, 100)
    (data / "notes.tslog").write_bytes(b"not a segment")
    report = rotate_directory(data, CryptoService([new.decode(), old.decode()], "rotated"))
    assert report.rewritten and len(report.failed) == 1 and "notes.tslog" in report.failed[0]
