"""scripts/cluster.sh for real: SeaweedFS, three sinks and HAProxy; one sink SIGKILLed mid-run and
restarted; afterwards every record that got a 202 (ack = durable) is in the bucket exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import run_cli, wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cluster.sh"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing (apt-get install haproxy)"),
]


def cluster(*args: str) -> str:
    done = subprocess.run([str(SCRIPT), *args], capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done.stdout.decode()


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "cluster"
    try:
        cluster("start", str(directory))
        yield directory
    finally:
        cluster("stop", str(directory))


def env_of(directory: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (directory / "cluster.env").read_text().splitlines())


class Client(threading.Thread):
    """Posts 10 uniquely numbered records a request through the balancer; remembers what got a 202."""

    def __init__(self, url: str, first: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.next, self.stop_event = url, first, stop
        self.acked: list[int] = []
        self.refused = 0

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            for _ in range(20_000):  # bounded, whatever happens
                if self.stop_event.is_set():
                    return
                ids = list(range(self.next, self.next + 10))
                self.next += 10
                try:
                    r = http.post(self.url + "/telemetry", content=orjson.dumps([{"node_id": "n", "i": i}
                                                                                 for i in ids]),
                                  headers={"content-type": "application/json"})
                except httpx.TransportError:
                    self.refused += 1
                    continue
                if r.status_code == 202:
                    self.acked.extend(ids)
                else:
                    self.refused += 1


def test_sigkill_one_instance_behind_haproxy_loses_and_duplicates_nothing(cluster_dir: Path) -> None:
    env = env_of(cluster_dir)
    stop = threading.Event()
    clients = [Client(env["LB_URL"], n * 10_000_000, stop) for n in range(3)]
    for c in clients:
        c.start()
    wait_for(lambda: sum(len(c.acked) for c in clients) > 2000, timeout=60, what="traffic through the balancer")
    victim = int((cluster_dir / "sink-2" / "pid").read_text())
    os.kill(victim, signal.SIGKILL)
    at_kill = sum(len(c.acked) for c in clients)
    wait_for(lambda: sum(len(c.acked) for c in clients) > at_kill + 2000, timeout=60,
             what="traffic to continue on the other sinks")
    assert "sink-2: pid" in cluster("start-sink", str(cluster_dir), "2")  # started again, not "already runs"
    restarted = f"http://127.0.0.1:{env['SINK_2_PORT']}/metrics"

    def restarted_sink_takes_records() -> bool:  # HAProxy puts it back in rotation after 2 checks
        try:
            text = httpx.get(restarted, timeout=5).text
        except httpx.TransportError:
            return False
        return any(line.startswith("telemetry_sink_records_accepted_total ") and float(line.split()[1]) > 0
                   for line in text.splitlines())

    wait_for(restarted_sink_takes_records, timeout=60, what="the restarted sink to take records again")
    stop.set()
    for c in clients:
        c.join(30)
    for i in (1, 2, 3):
        cluster("stop-sink", str(cluster_dir), str(i))  # each drains, seals and ships its last segment
    acked = [i for c in clients for i in c.acked]
    read_env = {"AWS_ACCESS_KEY_ID": env["S3_READ_ONLY_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": env["S3_READ_ONLY_SECRET_ACCESS_KEY"],
                "AWS_ENDPOINT_URL": env["S3_ENDPOINT"], "AWS_ALLOW_HTTP": "true"}
    out = run_cli("read", "--key-file", str(cluster_dir / "sink.key"), f"s3://{env['S3_BUCKET']}/cluster",
                  env=read_env, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    got = [orjson.loads(line)["i"] for line in out.stdout.splitlines()]
    assert len(got) == len(set(got)), "a record is in the bucket twice"
    missing = set(acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged records are not in the bucket"
    log2 = (cluster_dir / "sink-2" / "server.log").read_text()
    assert "sealed segment(s) from before this start not yet confirmed" in log2
    for i in (1, 2, 3):
        assert f"to s3://{env['S3_BUCKET']}/cluster/v1/" in (cluster_dir / f"sink-{i}" / "server.log").read_text()
    verify = run_cli("verify", f"s3://{env['S3_BUCKET']}/cluster", env=read_env, timeout=120)
    assert verify.returncode == 0, verify.stdout.decode()[-2000:]
