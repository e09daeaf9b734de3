"""`telemetry-sink send` against a real server: files and stdin, --node-id, a bad input line, refusals,
an outage with and without --spool, the progress bar on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from conftest import ServerProcess, StartServer, free_port, read_records, run_cli, wait_for, write_config


def ndjson(n: int, start: int = 0, node: str | None = "send-test") -> bytes:
    rows = [{"i": i} if node is None else {"node_id": node, "i": i} for i in range(start, start + n)]
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


def stored(server: ServerProcess, expect: int) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        found = read_records(server.config_path)
        return found if len(found) >= expect else None

    return sorted(wait_for(probe, what=f"{expect} records on disk"), key=lambda r: int(r["i"]))


def test_send_files_and_stdin(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    first = tmp_path / "a.ndjson"
    first.write_bytes(ndjson(1500) + b"\n   \n" + ndjson(500, start=1500))  # blank lines are skipped
    proc = run_cli("send", "--url", server.url, "--batch-records", "400", str(first), "-", input=ndjson(10, 2000))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b"", "no progress line when stderr is not a terminal"
    assert [r["i"] for r in stored(server, 2010)] == list(range(2010))


def test_send_fills_in_node_id_and_takes_the_url_from_a_config(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()  # on port 0: its own config cannot say where it listens
    refused = run_cli("send", "--config", str(server.config_path), input=ndjson(1))
    assert refused.returncode == 2 and b"[server] port: 0" in refused.stderr
    config = write_config(tmp_path / "client.ini", {"server": {"host": "127.0.0.1", "port": server.port}})
    proc = run_cli("send", "--config", str(config), "--node-id", "filled", input=ndjson(3, node=None))
    assert proc.returncode == 0, proc.stderr.decode()
    assert [r["node_id"] for r in stored(server, 3)] == ["filled"] * 3


def test_a_bad_line_stops_reading_and_what_came_before_is_delivered(start_server: StartServer,
                                                                   tmp_path: Path) -> None:
    server = start_server()
    path = tmp_path / "bad.ndjson"
    path.write_bytes(ndjson(2) + b"[1, 2]\n" + ndjson(2, start=2))
    proc = run_cli("send", "--url", server.url, str(path))
    assert proc.returncode == 2
    assert f"{path}:3: not a JSON object" in proc.stderr.decode()
    assert [r["i"] for r in stored(server, 2)] == [0, 1]


def test_refused_records_are_reported_with_the_servers_index(start_server: StartServer) -> None:
    server = start_server()
    body = ndjson(2) + b'{"i": 2}\n'  # no node_id
    proc = run_cli("send", "--url", server.url, input=body)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "422 invalid_record at index 2" in err and 'record: {"i": 2}' in err
    assert "3 records refused by the server" in err


def test_an_outage_leaves_records_in_the_spool_for_the_next_run(start_server: StartServer, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spool = tmp_path / "spool"
    down = run_cli("send", "--url", url, "--timeout", "1", input=ndjson(5))
    assert down.returncode == 3 and "5 records not delivered in time (no spool" in down.stderr.decode()
    spooled = run_cli("send", "--url", url, "--timeout", "1", "--spool", str(spool), input=ndjson(5))
    assert spooled.returncode == 3 and f"they stay in the spool {spool}" in spooled.stderr.decode()

    server = start_server(port=port)
    resumed = run_cli("send", "--url", url, "--spool", str(spool), input=b"")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert [r["i"] for r in stored(server, 5)] == [0, 1, 2, 3, 4]


def test_progress_bar_on_a_terminal(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server()
    source = tmp_path / "in.ndjson"
    source.write_bytes(ndjson(3000))
    main, child = pty.openpty()
    try:
        # The lean entry point, which loads none of the server's modules.
        proc = subprocess.run([sys.executable, "-m", "telemetry_sink.client", "--url", server.url, str(source)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=child, timeout=60)
        os.close(child)
        child = -1
        out = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
        if child >= 0:
            os.close(child)
    assert proc.returncode == 0
    assert b"send" in out and b"3,000 records" in out, out
    assert len(stored(server, 3000)) == 3000
