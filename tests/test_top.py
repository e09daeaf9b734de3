"""`telemetry-sink top`: figures computed from two real scrapes, and the live view run under tmux
against a real server under load, read from the pane, quit with q."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, StartServer, wait_for

from telemetry_sink.top import compute_view, fetch


def post_records(url: str, stop: threading.Event, per_request: int = 10) -> None:
    body = b"[" + b",".join(b'{"node_id":"top-%d"}' % i for i in range(per_request)) + b"]"
    with httpx.Client(timeout=5) as client:
        deadline = time.monotonic() + 60  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < deadline:
            client.post(url + "/telemetry", content=body, headers={"content-type": "application/json"})


@pytest.fixture
def loaded(start_server: StartServer) -> Iterator[ServerProcess]:
    server = start_server({"rate_limit": {"bytes_per_second": 0}})
    stop = threading.Event()
    thread = threading.Thread(target=post_records, args=(server.url, stop), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(10)


def test_rates_come_from_two_scrapes_of_a_real_server(loaded: ServerProcess) -> None:
    before = fetch(loaded.url)
    started = time.monotonic()
    def progressed() -> bool:
        scrape = fetch(loaded.url)
        return (scrape["records_accepted_total"] >= before["records_accepted_total"] + 200
                and scrape["flush_seconds_count"] > before["flush_seconds_count"])

    wait_for(progressed, what="more records to be accepted and written")
    now = fetch(loaded.url)
    view = compute_view(loaded.url, now, before, time.monotonic() - started)
    assert float(view.rows["records/s"].replace(",", "")) > 0
    assert float(view.rows["requests/s"].replace(",", "")) > 0
    assert re.fullmatch(r"202:[\d,]+", view.rows["answers (total)"])
    assert "% full" in view.rows["buffer"]
    assert view.rows["write latency"].startswith("mean ")


def test_top_in_tmux_shows_the_live_rates_and_quits_on_q(loaded: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing in CI: scripts/bootstrap.sh installs it")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    session = f"top-{os.getpid()}"
    done = tmp_path / "exit-status"
    command = f"{sys.executable} -m telemetry_sink top {loaded.url} --interval 0.3; echo $? > {done}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30", command], check=True)
    try:
        def pane() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        def nonzero_rate() -> bool:
            match = re.search(r"records/s\s*│\s*([\d,]+)", pane())
            return match is not None and int(match.group(1).replace(",", "")) > 0

        wait_for(nonzero_rate, timeout=20, what=f"a live records/s rate in the pane:\n{pane()}")
        assert "answers (total)" in pane() and loaded.url in pane()
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        wait_for(lambda: done.exists() and done.read_text().strip() != "", timeout=10, what="top to quit on q")
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_top_names_a_server_it_cannot_scrape(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "telemetry_sink", "top", "http://127.0.0.1:9", "--iterations", "1",
                           "--interval", "0.1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert "cannot scrape" in proc.stdout and "Traceback" not in proc.stderr
