"""The `telemetry-sink` command line, run as a real subprocess: keygen, read, verify, info, --help."""

from __future__ import annotations

import argparse
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import httpx
import orjson
import pytest
from conftest import StartServer, run_cli, write_config
from cryptography.fernet import Fernet

from telemetry_sink import __version__, segment_format, speedups
from telemetry_sink.cli import build_parser
from telemetry_sink.crypto import CryptoService, generate_key, write_key_file
from telemetry_sink.testing import clean_env

Record = dict[str, Any]
CREATED_MS = 1_700_000_000_000


# -- building logs without a server --


def write_segment(directory: Path, crypto: CryptoService, batches: list[list[Record]], first_seq: int,
                  series: str = "w0") -> Path:
    """One segment holding `batches` (each a list of records), sequence numbers from `first_seq`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / segment_format.segment_name(series, first_seq)
    parts = [segment_format.FILE_HEADER_BYTES]
    seq = first_seq
    for i, batch in enumerate(batches):
        tokens = [crypto.encrypt(orjson.dumps(r)) for r in batch]
        parts.append(segment_format.frame_batch(seq, CREATED_MS + i, tokens))
        seq += len(batch)
    path.write_bytes(b"".join(parts))
    return path


def write_log(directory: Path, crypto: CryptoService, segments: list[list[list[Record]]],
              first_seq: int = 0) -> list[Path]:
    """Consecutive segments (each a list of batches), as a writer would have left them."""
    paths = []
    seq = first_seq
    for batches in segments:
        paths.append(write_segment(directory, crypto, batches, seq))
        seq += sum(map(len, batches))
    return paths


def records(node: str, n: int, start: int = 0, ts0: float = 1000.0) -> list[Record]:
    return [{"node_id": node, "i": i, "ts": ts0 + i} for i in range(start, start + n)]


def parse_lines(stdout: bytes) -> list[Record]:
    return [orjson.loads(line) for line in stdout.splitlines()]


def batches(path: Path) -> list[segment_format.Batch | segment_format.Damage]:
    with segment_format.SegmentImage(path) as image:
        return list(image.batches())


class Log:
    """A config file (relative paths), its key and a three-segment log of 18 records."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.key_file = base / "keys" / "sink.key"
        write_key_file(self.key_file)
        self.crypto = CryptoService.from_key_file(self.key_file)
        self.config = write_config(base / "config.ini", {
            "writer": {"directory": "data"},
            "crypto": {"key_file": "keys/sink.key"},
        })
        self.records = records("a", 6) + records("b", 6, start=6) + records("a", 6, start=12)
        r = self.records
        self.segments = write_log(self.data, self.crypto, [
            [r[0:2], r[2:4], r[4:6]],
            [r[6:9], r[9:12]],
            [r[12:14], r[14:16], r[16:18]],
        ])

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run_cli(*args, "--config", str(self.config), env=env)


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return Log(tmp_path)


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("telemetry-sink: error: ")
    return lines[0]


# -- keygen --


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir" / "sink.key"
    proc = run_cli("keygen", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = out.read_bytes()
    Fernet(key.strip())  # a valid key
    assert str(out) in proc.stderr.decode()

    again = run_cli("keygen", "--out", str(out))
    assert again.returncode != 0
    assert "already exists" in one_error_line(again)
    assert out.read_bytes() == key


def test_keygen_default_path_is_the_configured_key_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = write_config(tmp_path / "conf" / "config.ini", {"crypto": {"key_file": "secret/k.key"}})
    proc = run_cli("keygen", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    key_path = tmp_path / "conf" / "secret" / "k.key"  # relative to the config file
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert CryptoService.from_key_file(key_path).key_count == 1


def test_keygen_keys_differ(tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert run_cli("keygen", "--out", str(tmp_path / name)).returncode == 0
    assert (tmp_path / "one").read_bytes() != (tmp_path / "two").read_bytes()


# -- read --


def test_read_prints_every_record_of_the_configured_directory_in_order(log: Log) -> None:
    proc = log.cli("read")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout == b"".join(orjson.dumps(r) + b"\n" for r in log.records)


def test_read_config_from_environment_variable(log: Log) -> None:
    proc = run_cli("read", env={"TELEMETRY_SINK_CONFIG": str(log.config)})
    assert proc.returncode == 0, proc.stderr
    assert parse_lines(proc.stdout) == log.records


def test_read_explicit_files_and_directories_with_key_file(log: Log, tmp_path: Path) -> None:
    # No --config at all: the paths and the key file are enough.
    first, _, third = log.segments
    proc = run_cli("read", "--key-file", str(log.key_file), str(third), str(first))
    assert proc.returncode == 0, proc.stderr
    assert parse_lines(proc.stdout) == log.records[12:] + log.records[:6]
    proc = run_cli("read", "--key-file", str(log.key_file), str(log.data))
    assert parse_lines(proc.stdout) == log.records
    missing = run_cli("read", "--key-file", str(log.key_file), str(tmp_path / "nope.tslog"))
    assert missing.returncode == 2
    assert "nope.tslog" in one_error_line(missing)


def test_read_filters_by_node_and_since(log: Log) -> None:
    proc = log.cli("read", "--node", "a")
    assert parse_lines(proc.stdout) == [r for r in log.records if r["node_id"] == "a"]
    proc = log.cli("read", "--since", "1010")
    assert parse_lines(proc.stdout) == [r for r in log.records if r["ts"] >= 1010]
    proc = log.cli("read", "--since", "1010", "--node", "b")
    assert parse_lines(proc.stdout) == [r for r in log.records if r["ts"] >= 1010 and r["node_id"] == "b"]
    assert log.cli("read", "--node", "nobody").stdout == b""


def test_read_with_rotated_keys_reads_old_and_new_segments(tmp_path: Path) -> None:
    old_key, new_key = generate_key(), generate_key()
    data = tmp_path / "data"
    old = records("old", 4)
    new = records("new", 3, start=4)
    write_segment(data, CryptoService([old_key.decode()], "old"), [old[:2], old[2:]], 0)
    write_segment(data, CryptoService([new_key.decode()], "new"), [new], 4)

    rotated = tmp_path / "rotated.key"
    rotated.write_bytes(b"# new key first, then the old one\n" + new_key + b"\n\n" + old_key + b"\n")
    rotated.chmod(0o600)
    proc = run_cli("read", "--key-file", str(rotated), str(data))
    assert proc.returncode == 0, proc.stderr
    assert parse_lines(proc.stdout) == old + new

    only_new = tmp_path / "new.key"
    only_new.write_bytes(new_key + b"\n")
    only_new.chmod(0o600)
    proc = run_cli("read", "--key-file", str(only_new), str(data))
    assert proc.returncode == 1
    assert parse_lines(proc.stdout) == new
    assert "4 do not authenticate" in proc.stderr.decode()


def test_read_skips_one_foreign_record_inside_a_batch(tmp_path: Path) -> None:
    """A batch whose middle token is under another key: every other record, in order, one warning;
    --strict stops there, after the records before it."""
    key_text = generate_key().decode()
    key, foreign = CryptoService([key_text], "k"), CryptoService([generate_key().decode()], "f")
    recs = records("n", 5)
    tokens = [(foreign if i == 2 else key).encrypt(orjson.dumps(r)) for i, r in enumerate(recs)]
    data = tmp_path / "data"
    data.mkdir()
    (data / segment_format.segment_name("w0", 0)).write_bytes(
        segment_format.FILE_HEADER_BYTES + segment_format.frame_batch(0, CREATED_MS, tokens))
    key_file = tmp_path / "sink.key"
    key_file.write_text(key_text + "\n")
    key_file.chmod(0o600)
    proc = run_cli("read", "--key-file", str(key_file), str(data))
    assert proc.returncode == 1
    assert parse_lines(proc.stdout) == recs[:2] + recs[3:]
    assert "4 of 5 records decrypted" in proc.stderr.decode()  # one summary line
    strict = run_cli("read", "--strict", "--key-file", str(key_file), str(data))
    assert strict.returncode == 2
    assert parse_lines(strict.stdout) == recs[:2]
    proc = run_cli("verify", "--key-file", str(key_file), str(data))
    assert proc.returncode == 1
    assert "record 2 (batch at offset 16) does not authenticate" in proc.stdout.decode()


def test_read_key_from_environment_overrides_the_key_file(log: Log) -> None:
    other = log.base / "keys" / "other.key"
    write_key_file(other)
    config = write_config(log.base / "other.ini", {"writer": {"directory": "data"},
                                                   "crypto": {"key_file": "keys/other.key"}})
    wrong = run_cli("read", "--config", str(config))
    assert wrong.returncode == 1 and wrong.stdout == b""
    right_key = log.key_file.read_text().strip()
    for value in (right_key, f"{generate_key().decode()},{right_key}"):
        proc = run_cli("read", "--config", str(config), env={"TELEMETRY_SINK_KEY": value})
        assert proc.returncode == 0, proc.stderr
        assert parse_lines(proc.stdout) == log.records


def test_read_without_a_usable_key_says_how_to_make_one(log: Log) -> None:
    log.key_file.unlink()
    proc = log.cli("read")
    assert proc.returncode == 2
    assert "keygen" in one_error_line(proc)
    bad = run_cli("read", "--config", str(log.config), env={"TELEMETRY_SINK_KEY": "not-a-key"})
    assert bad.returncode == 2
    assert "not a Fernet key" in one_error_line(bad)


def flip_byte_in_the_middle(segment: Path, batch: segment_format.Batch, mask: int) -> None:
    raw = bytearray(segment.read_bytes())
    raw[(batch.offset + batch.end) // 2] ^= mask
    segment.write_bytes(bytes(raw))


def test_read_skips_a_damaged_batch_with_a_warning(log: Log) -> None:
    segment = log.segments[0]
    middle = batches(segment)[1]
    assert isinstance(middle, segment_format.Batch)
    flip_byte_in_the_middle(segment, middle, 0xFF)
    proc = log.cli("read")
    assert parse_lines(proc.stdout) == log.records[:2] + log.records[4:]
    assert f"offset {middle.offset}" in proc.stderr.decode()


def test_read_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    key = generate_key()
    data = tmp_path / "data"
    write_log(data, CryptoService([key.decode()], "test"), [[records("x", 500, start=500 * b) for b in range(8)]])
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry_sink", "read", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env({"TELEMETRY_SINK_KEY": key.decode()}),
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    assert orjson.loads(first)["i"] == 0
    proc.stdout.close()
    try:
        rc = proc.wait(30)
        stderr = proc.stderr.read()
    finally:
        proc.stderr.close()
    assert rc == 0, stderr
    assert b"Traceback" not in stderr


# -- read --follow against a live server --


def _lines_to_queue(stream: IO[bytes], out: queue.Queue[bytes]) -> None:
    for line in iter(stream.readline, b""):
        out.put(line)


def test_read_follow_prints_records_as_a_live_server_writes_them(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = start_server({"writer": {"flush_interval_ms": 10, "max_segment_bytes": 2000}})
    assert server.post(orjson.dumps({"node_id": "before", "ts": 1})).status_code == 202
    follower = subprocess.Popen(
        [sys.executable, "-m", "telemetry_sink", "read", "--follow", "--poll-interval", "0.05",
         "--config", str(server.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
    )
    assert follower.stdout is not None and follower.stderr is not None
    lines: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=_lines_to_queue, args=(follower.stdout, lines), daemon=True)
    reader.start()

    def next_record(timeout: float = 5.0) -> Record:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"read --follow printed nothing within {timeout}s") from None
        record: Record = orjson.loads(line)
        return record

    try:
        assert next_record()["node_id"] == "before"
        sent = [{"node_id": "live", "i": i, "ts": 2 + i, "pad": "p" * 200} for i in range(12)]
        with httpx.Client(base_url=server.url, timeout=5.0,
                          headers={"content-type": "application/json"}) as client:
            for i in range(0, 12, 3):  # enough to roll over into new segments
                assert client.post("/telemetry", content=orjson.dumps(sent[i : i + 3])).status_code == 202
                for expected in sent[i : i + 3]:
                    assert next_record() == expected
        assert len(segment_format.list_segments(tmp_path / "data")) > 1
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        reader.join(5)
        follower.stdout.close()
        stderr = follower.stderr.read()
        follower.stderr.close()
    assert b"Traceback" not in stderr, stderr
    assert lines.empty()
    server.stop()


# -- verify --


def test_verify_clean_log(log: Log) -> None:
    proc = log.cli("verify")
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout.decode().splitlines()
    assert out[0] == f"{log.segments[0]}: ok: 3 batches, 6 records, seq 0..5"
    assert out[1] == f"{log.segments[1]}: ok: 2 batches, 6 records, seq 6..11"
    assert out[2] == f"{log.segments[2]}: ok: 3 batches, 6 records, seq 12..17"
    assert out[3] == "3 segments, 8 batches, 18 records, 0 damaged"
    with_key = log.cli("verify", "--key-file", str(log.key_file))
    assert with_key.returncode == 0
    assert "every token authenticated" in with_key.stdout.decode()


def test_verify_needs_no_key(log: Log) -> None:
    log.key_file.unlink()
    proc = run_cli("verify", str(log.data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "18 records, 0 damaged" in proc.stdout.decode()


def test_verify_names_a_corrupt_batch_and_its_offset(log: Log) -> None:
    segment = log.segments[1]  # sealed: a later segment exists
    first = batches(segment)[0]
    assert isinstance(first, segment_format.Batch)
    flip_byte_in_the_middle(segment, first, 0x01)
    proc = log.cli("verify")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"{segment}: DAMAGED" in out
    assert f"corrupt batch at offset {first.offset} ({first.end - first.offset} bytes: CRC mismatch)" in out
    assert f"{log.segments[0]}: ok" in out and f"{log.segments[2]}: ok" in out
    assert out.splitlines()[-1].endswith("1 damaged")


def test_verify_reports_a_torn_tail(log: Log) -> None:
    segment = log.segments[2]
    last = batches(segment)[-1]
    assert isinstance(last, segment_format.Batch)
    os.truncate(segment, last.end - 7)
    proc = log.cli("verify")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"{segment}: DAMAGED: 2 batches, 4 records, seq 12..15" in out
    assert f"torn tail at offset {last.offset}" in out


def test_verify_with_a_wrong_key_reports_records_that_do_not_authenticate(log: Log, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong)
    proc = log.cli("verify", "--key-file", str(wrong))
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "record 0 (batch at offset 16) does not authenticate" in out
    assert out.count("does not authenticate") == 18
    assert "every token authenticated" not in out


def test_verify_reports_a_sequence_gap(log: Log) -> None:
    log.segments[1].unlink()
    proc = log.cli("verify")
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert f"{log.segments[2]}: DAMAGED" in out
    assert "sequence gap at offset 16: expected 6, found 12" in out


def test_verify_without_segments_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_cli("verify", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "no segments" in one_error_line(proc)


# -- info, --help, --version --


def test_info_prints_version_implementation_openssl_and_config(log: Log) -> None:
    proc = log.cli("info")
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(": ", 1) for line in proc.stdout.decode().splitlines())
    assert rows["version"] == __version__
    assert rows["implementation"] == speedups.IMPLEMENTATION
    assert "OpenSSL" in rows["openssl"] or "LibreSSL" in rows["openssl"] or "BoringSSL" in rows["openssl"]
    assert rows["config"] == str(log.config.resolve())
    assert rows["python"] == ".".join(map(str, sys.version_info[:3]))


def test_info_reports_the_config_named_by_the_environment(log: Log) -> None:
    proc = run_cli("info", env={"TELEMETRY_SINK_CONFIG": str(log.config)})
    assert f"config: {log.config.resolve()}" in proc.stdout.decode().splitlines()


def _subcommands(parser: argparse.ArgumentParser | None = None) -> list[str]:
    for action in (parser or build_parser())._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    raise AssertionError("no subcommands")


def _leaf_commands() -> list[str]:
    """Every runnable command line: `serve`, `token add`, ..."""
    out = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                out.extend(f"{name} {leaf}" for leaf in _subcommands(sub)) if nested else out.append(name)
    return sorted(out)


def test_every_documented_subcommand_is_covered() -> None:
    assert {"serve", "keygen", "read", "verify", "info"} <= set(_subcommands())


@pytest.mark.parametrize("command", _leaf_commands())
def test_help_for_every_subcommand(command: str) -> None:
    proc = run_cli(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert out.startswith(f"usage: telemetry-sink {command}")
    assert "--config" in out
    description = out.split("\n\n")[1].strip()
    assert len(description) > 20, out  # says what the command does


def test_top_level_help_and_version() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    out = proc.stdout.decode()
    for command in _subcommands():
        assert command in out
    assert "TELEMETRY_SINK_" in out
    version = run_cli("--version")
    assert (version.returncode, version.stdout.decode().strip()) == (0, f"telemetry-sink {__version__}")
    missing = run_cli()
    assert missing.returncode == 2 and b"usage:" in missing.stderr
