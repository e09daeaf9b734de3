"""Shared fixtures: both `_speedups` implementations, keys, configs and real server subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from telemetry_sink import speedups
from telemetry_sink.buffer import BufferManager
from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.segment_writer import SegmentWriter


def pytest_report_header() -> str:
    return f"telemetry_sink speedups: {speedups.IMPLEMENTATION}"


@pytest.fixture(params=["compiled", "pure-python"])
def speedups_impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each `_speedups` implementation in turn; the compiled one skips, with a reason, if not built."""
    if request.param == "pure-python":
        return importlib.import_module("telemetry_sink._speedups_py")
    try:
        return importlib.import_module("telemetry_sink._speedups")
    except ImportError as exc:
        pytest.skip(f"compiled extension not built: {exc}")


# -- keys, configs and real server subprocesses --

ConfigValues = dict[str, dict[str, Any]]
T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, values: ConfigValues) -> Path:
    lines: list[str] = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in keys.items())
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "sink.key"
    write_key_file(path)
    return path


class ServerProcess:
    """`python -m telemetry_sink serve` as a real subprocess on a loopback port."""

    def __init__(self, config_path: Path, port: int, log_path: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), stderr_path: Path | None = None) -> None:
        """Output goes to `log_path`; with `stderr_path`, stderr goes there instead."""
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.stderr_path = stderr_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_SINK_")
                    or k == "TELEMETRY_SINK_NO_EXTENSIONS"}
        full_env.update(env or {})
        with open(stderr_path, "ab") if stderr_path else contextlib.nullcontext() as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "telemetry_sink", "serve", "--config", str(config_path), *args],
                stdout=self._log, stderr=err if err is not None else subprocess.STDOUT, env=full_env,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def post(self, body: bytes | str, content_type: str = "application/json", **kw: Any) -> httpx.Response:
        headers = {"content-type": content_type, **kw.pop("headers", {})}
        return httpx.post(self.url + "/telemetry", content=body, headers=headers, timeout=10.0, **kw)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        self.signal(signal.SIGTERM)
        return self.wait()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stderr(self) -> str:
        """What the server wrote to stderr (all its output unless stderr_path was given)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else self.log()


@pytest.fixture
def start_server(tmp_path: Path, key_file: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start a server with config `overrides` ({section: {key: value}}); killed at teardown."""
    started: list[ServerProcess] = []

    def start(overrides: ConfigValues | None = None, *, env: dict[str, str] | None = None,
              wait: bool = True, port: int | None = None, args: tuple[str, ...] = (),
              separate_stderr: bool = False) -> ServerProcess:
        values: ConfigValues = {
            "server": {"host": "127.0.0.1", "port": port or free_port(), "shutdown_timeout_s": 20},
            "writer": {"directory": str(tmp_path / "data"), "flush_interval_ms": 50},
            "crypto": {"key_file": str(key_file)},
        }
        for section, keys in (overrides or {}).items():
            values.setdefault(section, {}).update(keys)
        config = write_config(tmp_path / f"config-{len(started)}.ini", values)
        n = len(started)
        server = ServerProcess(config, int(values["server"]["port"]), tmp_path / f"server-{n}.log", env, args,
                               tmp_path / f"server-{n}.stderr" if separate_stderr else None)
        started.append(server)
        if wait:
            server.wait_ready()
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server._log.close()


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m telemetry_sink ARGS` (with `input` on stdin) and capture its output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRY_SINK_")
                or k == "TELEMETRY_SINK_NO_EXTENSIONS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "telemetry_sink", *args], capture_output=True,
                          env=full_env, check=check, timeout=timeout, input=input)


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
def shared_server(tmp_path_factory: pytest.TempPathFactory, name: str,
                  overrides: ConfigValues | None = None) -> Iterator[tuple[ServerProcess, Path, Path]]:
    """A server for a whole test module (fresh key, rate limit off, 20 ms flushes):
    yields (server, its base directory, its key file); killed at the end."""
    base = tmp_path_factory.mktemp(name)
    key = base / "sink.key"
    write_key_file(key)
    port = free_port()
    values: ConfigValues = {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 10},
        "rate_limit": {"bytes_per_second": 0},
        "writer": {"directory": str(base / "data"), "flush_interval_ms": 20, "fsync": "never"},
        "crypto": {"key_file": str(key)},
    }
    for section, keys in (overrides or {}).items():
        values.setdefault(section, {}).update(keys)
    server = ServerProcess(write_config(base / "config.ini", values), port, base / "server.log")
    try:
        server.wait_ready()
        yield server, base, key
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.wait()


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
