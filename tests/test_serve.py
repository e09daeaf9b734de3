"""Start-up failures of `serve`, against the real command: one line, exit status 2, no traceback,
before the writer opens or locks anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import ServerProcess, StartServer


def only_error_line(server: ServerProcess) -> str:
    assert server.wait(timeout=30) == 2, server.log()
    log = server.log()
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, log
    assert errors[0].startswith("telemetry-sink: error: ")
    return errors[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_is_one_line_naming_the_address_before_the_log_is_touched(
        start_server: StartServer, tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server({"server": {"workers": workers}}, port=port, wait=False)
        line = only_error_line(server)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert not (tmp_path / "data").exists()  # nothing opened, locked or created


def test_data_directory_that_is_a_file_is_one_line(start_server: StartServer, tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    line = only_error_line(start_server(wait=False))
    assert f"[writer] directory {tmp_path / 'data'}: cannot use it" in line
