"""Progress bars: drawn (records, throughput, time left) on a terminal, silent on a pipe, where the
offline commands write them."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import run_cli, write_log

from telemetry_sink.crypto import generate_key
from telemetry_sink.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_shows_what_records_and_speed() -> None:
    screen = Terminal()
    with Progress("export", 10_000_000, stream=screen) as progress:
        for _ in range(5):
            progress.advance(1000, 1_000_000)
        progress._bar.refresh()  # draw now instead of at the next refresh tick
        shown = screen.getvalue()
    assert "export" in shown and "5,000 records" in shown
    assert "5.0/10.0 MB" in shown


def test_off_a_terminal_it_writes_nothing() -> None:
    pipe = io.StringIO()
    with Progress("verify", 100, stream=pipe) as progress:
        progress.advance(10, 50)
    assert pipe.getvalue() == ""


def test_verify_prints_no_bar_into_a_pipe(tmp_path: Path) -> None:
    key = generate_key()
    write_log(tmp_path / "data", key, 200)
    proc = run_cli("verify", str(tmp_path / "data"))
    assert proc.returncode == 0
    assert proc.stderr == b""
    assert proc.stdout.decode().splitlines()[-1].endswith("200 records, 0 damaged")
