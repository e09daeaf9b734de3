"""The offline reading tools' user-facing edges, run as real subprocesses: what read and verify say
about files that are not segments, a wrong key (one summary, not a line per record), and the time
forms --since/--until accept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from conftest import run_cli, write_log

from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.reader import parse_time
from telemetry_sink.segment_format import FILE_HEADER_BYTES, frame_batch, segment_name


def _key_file(path: Path, key: bytes) -> Path:
    path.write_bytes(key + b"\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("content", [b"hello\n", b"X" * 64], ids=["short", "bad-magic"])
@pytest.mark.parametrize("command", ["read", "verify"])
def test_a_file_that_is_not_a_segment_is_one_line_and_exit_2(tmp_path: Path, command: str, content: bytes) -> None:
    stray = tmp_path / "notes.tslog"
    stray.write_bytes(content)
    args = ["--key-file", str(_key_file(tmp_path / "k.key", generate_key()))] if command == "read" else []
    proc = run_cli(command, *args, str(stray))
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines == [f"telemetry-sink: error: {stray} is not a telemetry-sink segment ({lines[0].split('(', 1)[1]}"]
    assert "Traceback" not in proc.stderr.decode()


def test_read_with_the_wrong_key_prints_one_summary_and_exits_1(tmp_path: Path) -> None:
    write_log(tmp_path / "data", generate_key(), 1005)
    wrong = _key_file(tmp_path / "wrong.key", generate_key())
    proc = run_cli("read", "--key-file", str(wrong), str(tmp_path / "data"))
    assert proc.returncode == 1
    assert proc.stdout == b""
    lines = proc.stderr.decode().strip().splitlines()
    assert lines == [f"telemetry-sink: warning: 0 of 1,005 records decrypted: is this the right key? (1,005 do not "
                     f"authenticate with the key(s) from key file {wrong})"]


def test_verify_of_a_file_with_a_foreign_name_checks_it_without_a_sequence(tmp_path: Path) -> None:
    write_log(tmp_path / "data", generate_key(), 40, segment_bytes=1 << 20)
    [segment] = sorted((tmp_path / "data").glob("*.tslog"))
    renamed = segment.rename(tmp_path / "copy-of-yesterday.tslog")
    proc = run_cli("verify", str(renamed))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{renamed}: ok: 2 batches, 40 records, seq 0..39" in proc.stdout.decode()


NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("text", "expected"), [
    ("1767225600", 1767225600.0),
    ("1767225600.5", 1767225600.5),
    ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
    ("2026-12-01T10:30", datetime(2026, 12, 1, 10, 30, tzinfo=UTC).timestamp()),
    ("2026-12-01T10:30:00Z", datetime(2026, 12, 1, 10, 30, tzinfo=UTC).timestamp()),
    ("2026-12-01T11:30:00+01:00", datetime(2026, 12, 1, 10, 30, tzinfo=UTC).timestamp()),
    ("30m", NOW - 1800),
    ("1h", NOW - 3600),
    ("1h30m", NOW - 5400),
    ("2d", NOW - 2 * 86400),
    ("90s", NOW - 90),
])
def test_parse_time_accepts_unix_iso_and_relative(text: str, expected: float) -> None:
    assert parse_time(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "1x", "h1", "", "2026-13-01", "1h junk"])
def test_parse_time_refuses_other_text_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time(text, now=NOW)


def test_read_since_until_select_a_time_window(tmp_path: Path) -> None:
    key = generate_key()
    crypto = CryptoService([key.decode()], "test")
    records = [{"node_id": "n", "ts": datetime(2026, 12, 1, h, tzinfo=UTC).timestamp(), "h": h} for h in range(6)]
    data = tmp_path / "data"
    data.mkdir()
    tokens = [crypto.encrypt(orjson.dumps(r)) for r in records]
    (data / segment_name("w0", 0)).write_bytes(FILE_HEADER_BYTES + frame_batch(0, 0, tokens))
    proc = run_cli("read", "--key-file", str(_key_file(tmp_path / "k.key", key)), "--since", "2026-12-01T02:00Z",
                   "--until", "2026-12-01T04:00:00+00:00", str(data))
    assert proc.returncode == 0, proc.stderr
    assert [orjson.loads(line)["h"] for line in proc.stdout.splitlines()] == [2, 3]
    bad = run_cli("read", "--key-file", str(tmp_path / "k.key"), "--since", "last tuesday", str(data))
    assert bad.returncode == 2 and b"ISO 8601" in bad.stderr and b"Traceback" not in bad.stderr
