"""Test and benchmark support: real server subprocesses on loopback ports they report back, config files,
an environment without stray overrides, polling for events, and "the compiled extension or skip".

One module for tests/ and benchmarks/ alike (as aiohttp.test_utils is for aiohttp), importable from a plain
checkout, so benchmarks/harness.py runs on its own. The test-only dependencies (httpx, pytest) are imported
inside the functions that use them: importing the package never needs them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import orjson

if TYPE_CHECKING:
    import ssl

    import httpx

ConfigValues = dict[str, dict[str, Any]]
T = TypeVar("T")

# The line a server logs once its listening socket is bound (serve.py; the reference servers in benchmarks/
# print the same), in text logs and inside a JSON log line's "msg".
_LISTENING = re.compile(r"\blistening on (?P<scheme>https?)://(?P<host>\[[^\]]*\]|[^\s:/\[\]]+):(?P<port>\d+)")
_IMPLEMENTATIONS = {"compiled": "telemetry_sink._speedups", "pure-python": "telemetry_sink._speedups_py"}


def wait_for(probe: Callable[[], T | None], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll `probe` until it returns something truthy and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def best_of(call: Callable[[], object], rounds: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """The shortest time of `rounds` calls by `clock` (the least disturbed by a noisy machine); pass
    time.process_time to count only this process's CPU time."""
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        call()
        best = min(best, clock() - start)
    return best


def free_port() -> int:
    """A loopback port nothing listens on now. Racy by nature (another process may take it before it is
    used): only for a port that must be known before its listener starts (a server started later on
    purpose, a peer's own listener). Servers under test start on port 0 and report theirs instead."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, values: ConfigValues) -> Path:
    """Write `values` ({section: {key: value}}) as an INI file at `path`; return `path`."""
    lines: list[str] = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in keys.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def merge_config(base: ConfigValues, extra: ConfigValues | None) -> ConfigValues:
    """A copy of `base` with the keys of `extra` laid over it, section by section."""
    out = {section: dict(keys) for section, keys in base.items()}
    for section, keys in (extra or {}).items():
        out.setdefault(section, {}).update(keys)
    return out


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without TELEMETRY_SINK_* overrides (a developer's shell must not change what a
    test runs) except the TELEMETRY_SINK_NO_EXTENSIONS switch, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TELEMETRY_SINK_") or k == "TELEMETRY_SINK_NO_EXTENSIONS"}
    env.update(extra or {})
    return env


def run_cli(*args: str, env: Mapping[str, str] | None = None, check: bool = False,
            timeout: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m telemetry_sink ARGS` in a clean environment (plus `env`, with `input` on stdin) and
    capture its output."""
    return subprocess.run([sys.executable, "-m", "telemetry_sink", *args], capture_output=True,
                          env=clean_env(env), check=check, timeout=timeout, input=input)


def speedups_module(implementation: str, *, skip_if_missing: bool = True) -> ModuleType:
    """`_speedups` as "compiled" or "pure-python" (the twin). A compiled one that is not built skips the calling
    test with the reason, or with `skip_if_missing=False` raises ImportError (a gate must fail, never skip)."""
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown speedups implementation {implementation!r}")
    if implementation == "compiled" and skip_if_missing:
        return compiled_speedups()
    return importlib.import_module(_IMPLEMENTATIONS[implementation])


def compiled_speedups() -> ModuleType:
    """The compiled `_speedups` extension; skips the calling test, with the reason, when it is not built."""
    import pytest

    try:
        return importlib.import_module(_IMPLEMENTATIONS["compiled"])
    except ImportError as exc:
        pytest.skip(f"compiled extension not built: {exc}")


def skip_or_fail_in_ci(reason: str) -> NoReturn:
    """Skip the calling test with `reason`, but fail it under CI=true: a check CI cannot run must be noticed."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true, so this may not skip: {reason}")
    pytest.skip(reason)


def listening_address(log_text: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) from the first "listening on" line of a server's log, text or JSON; None if none yet."""
    for line in log_text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("event") == "listening":
                    found = _LISTENING.search(str(event.get("msg", "")))
                    return (found["scheme"] if found else "http"), str(event["host"]), int(event["port"])
            continue
        found = _LISTENING.search(line)
        if found:
            return found["scheme"], found["host"].strip("[]"), int(found["port"])
    return None


def tcp_sockets() -> Iterator[tuple[int, int, str, int, str]]:
    """(local port, remote port, state (hex, as in the kernel: 01 ESTABLISHED, 0A LISTEN), bytes unread, inode) of
    every TCP socket, from /proc/net/tcp{,6}: what the kernel reports, with no sleeping or guessing."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                yield (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16), fields[3],
                       int(fields[4].split(":")[1], 16), fields[9])


def server_connections(port: int) -> tuple[int, int]:
    """(accepted, queued): connections to the server listening on `port` that it accepted and still holds open,
    and those waiting in its accept queue, as the kernel reports them."""
    accepted = queued = 0
    for local, _, state, _, inode in tcp_sockets():
        if local == port and state in ("01", "08"):  # ESTABLISHED, CLOSE_WAIT (the client hung up first)
            if inode == "0":
                queued += 1
            else:
                accepted += 1
    return accepted, queued


class StalledPost:
    """POST /telemetry over a connection of its own, in two parts: the head and `first` at once, `rest` on
    finish(). wait_read() waits until the kernel reports that the server accepted the connection and read all
    that was sent (so a test can act while the server holds the request, without sleeping)."""

    def __init__(self, port: int, first: bytes, rest: bytes = b"", content_type: str = "application/json",
                 headers: Mapping[str, str] | None = None) -> None:
        import http.client

        self.server_port, self._rest = port, rest
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self._conn.putrequest("POST", "/telemetry")
        for name, value in {"content-type": content_type, "content-length": str(len(first) + len(rest)),
                            **(headers or {})}.items():
            self._conn.putheader(name, value)
        self._conn.endheaders(first)
        assert self._conn.sock is not None
        self.client_port: int = self._conn.sock.getsockname()[1]

    def _read_by_server(self) -> bool:
        return any(local == self.server_port and remote == self.client_port and inode != "0" and unread == 0
                   for local, remote, _, unread, inode in tcp_sockets())

    def wait_read(self, timeout: float = 10.0) -> None:
        wait_for(self._read_by_server, timeout, "the server to accept and read the request so far")

    def finish(self) -> tuple[int, bytes]:
        """Send the rest of the body (if the server still reads it); return the answer's (status, body)."""
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if self._rest:
                    self._conn.send(self._rest)
            response = self._conn.getresponse()
            return response.status, response.read()
        finally:
            self._conn.close()


def serve_reporting_port(app: Any, name: str, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any) -> None:
    """Run an ASGI `app` under uvicorn on a socket bound first, printing `NAME listening on http://HOST:PORT` as
    telemetry-sink's serve does, so a `ServerProcess` finds a reference server's port the same way."""
    import socket

    import uvicorn

    with socket.create_server((host, port)) as sock:
        bound_host, bound_port = sock.getsockname()[:2]
        print(f"{name} listening on http://{bound_host}:{bound_port}", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, **uvicorn_options)).run(sockets=[sock])


class ServerProcess:
    """A server as a real subprocess, learning its address from the line it logs once its socket is bound (so
    port 0 works and no port is guessed beforehand). Output goes to `log_path`; with `stderr_path`, stderr (where
    the logs go) goes there instead. The environment is `clean_env(env)`."""

    def __init__(self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 stderr_path: Path | None = None, cwd: Path | None = None, name: str = "server",
                 config_path: Path | None = None) -> None:
        self.name = name
        self.config_path = config_path
        self.log_path = log_path
        self.stderr_path = stderr_path
        self._address: tuple[str, str, int] | None = None
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait() and close()
        with open(stderr_path, "ab") if stderr_path else contextlib.nullcontext() as err:
            self.proc = subprocess.Popen(list(argv), stdout=self._log, stderr=err or subprocess.STDOUT,
                                         env=clean_env(env), cwd=cwd)
        self.pid = self.proc.pid

    @classmethod
    def serve(cls, config_path: Path, log_path: Path, *, args: Sequence[str] = (),
              env: Mapping[str, str] | None = None, stderr_path: Path | None = None,
              cwd: Path | None = None, name: str = "server") -> ServerProcess:
        """`python -m telemetry_sink serve --config CONFIG ARGS`."""
        argv = [sys.executable, "-m", "telemetry_sink", "serve", "--config", str(config_path), *args]
        return cls(argv, log_path, env=env, stderr_path=stderr_path, cwd=cwd, name=name, config_path=config_path)

    def reported_address(self) -> tuple[str, str, int] | None:
        """(scheme, host, port) from the server's "listening on" line; None while it has not logged one."""
        return listening_address(self.stderr())

    def address(self, timeout: float = 30.0) -> tuple[str, str, int]:
        """(scheme, host, port) the server reported; waits for its "listening on" line (fails if it exits first)."""
        if self._address is None:
            def reported() -> tuple[str, str, int] | None:
                found = self.reported_address()
                if found is None and self.proc.poll() is not None:
                    found = self.reported_address()  # logged just before it exited?
                    if found is None:
                        raise AssertionError(f"{self.name} exited with {self.proc.returncode} before listening:\n"
                                             f"{self.stderr()[-4000:]}")
                return found

            self._address = wait_for(reported, timeout, f"{self.name} to log its listening address")
        return self._address

    @property
    def port(self) -> int:
        """The port the server is listening on (as it reported it)."""
        return self.address()[2]

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`: the plain-HTTP base URL, whatever the server speaks (see `reported_url`)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def reported_url(self) -> str:
        """`SCHEME://127.0.0.1:PORT` with the scheme the server reported: https when it serves TLS."""
        return f"{self.address()[0]}://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0, status: int | None = 200, verify: ssl.SSLContext | bool = True) -> None:
        """Wait until the server answers GET /healthz at `reported_url` with `status` (any answer if None);
        `verify` is the TLS client context (CA, client certificate) for a server that speaks https."""
        import httpx

        deadline = time.monotonic() + timeout
        self.address(timeout)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                code = httpx.get(self.reported_url + "/healthz", timeout=1.0, verify=verify).status_code
            except httpx.TransportError:
                return False
            return status is None or code == status

        wait_for(answers, max(0.0, deadline - time.monotonic()), f"{self.name} to answer /healthz", interval=0.05)

    def healthz(self) -> dict[str, Any] | None:
        """GET /healthz as a dict; None when it cannot be had."""
        import httpx

        try:
            return dict(httpx.get(self.url + "/healthz", timeout=5.0).json())
        except (httpx.HTTPError, ValueError):
            return None

    def post(self, body: bytes | str, content_type: str = "application/json", **kw: Any) -> httpx.Response:
        """POST `body` to /telemetry (extra keyword arguments go to httpx.post)."""
        import httpx

        headers = {"content-type": content_type, **kw.pop("headers", {})}
        return httpx.post(self.url + "/telemetry", content=body, headers=headers, timeout=10.0, **kw)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; return its exit status."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the graceful path: the server drains its buffer to disk) and wait; kill if it overruns."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise

    def close(self) -> None:
        """Kill the process if it still runs; close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log(self) -> str:
        """Everything the server wrote to `log_path` so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stderr(self) -> str:
        """What the server wrote to stderr (all its output unless stderr_path was given)."""
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else self.log()


StartServer = Callable[..., ServerProcess]
"""The type of tests/conftest.py's `start_server` fixture: (overrides, *, env, wait, port, args, separate_stderr)."""
