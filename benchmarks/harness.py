"""Shared helpers for the benchmarks: payloads, server subprocesses, wrk, /proc sampling, log checks.

Used by the pytest suites in this directory and by run_all.py. Everything talks to 127.0.0.1 only
and every load run is bounded in time. Server processes, configs and the clean environment come from
`telemetry_sink.testing`, which the tests share.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from telemetry_sink import testing
from telemetry_sink.testing import (
    ConfigValues,
    ServerProcess,
    best_of,
    clean_env,
    free_port,
    merge_config,
    tcp_sockets,
    write_config,
)

__all__ = ["ConfigValues", "best_of", "clean_env", "merge_config", "write_config"]  # used by the benchmark suites

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
LUA_POST = BENCH_DIR / "lua" / "post.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = 1024

# -- payloads --


def make_record(i: int) -> dict[str, Any]:
    """One ~150-byte telemetry record (orjson writes it in 150 bytes for i < 100000)."""
    return {
        "node_id": f"greenhouse-{i % 100000:05d}",
        "ts": 1767225600.125 + i,
        "temp_c": 21.53,
        "rh": 43,
        "hpa": 1013,
        "co2_ppm": 612,
        "bat_v": 3.7,
        "rssi_dbm": -67,
        "fw": "2.4.1",
        "status": "ok",
    }


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [make_record(start + i) for i in range(n)]


def json_object_body() -> bytes:
    return orjson.dumps(make_record(0))


def json_array_body(n: int) -> bytes:
    return orjson.dumps(records(n))


def ndjson_body(n: int) -> bytes:
    return b"\n".join(orjson.dumps(r) for r in records(n)) + b"\n"


@dataclass(frozen=True)
class Payload:
    name: str
    body: bytes
    content_type: str
    records_per_request: int


def payload(name: str) -> Payload:
    """`single` (one ~150 B object), `array100`, `ndjson100`, `array1000` (overload)."""
    if name == "single":
        return Payload(name, json_object_body(), "application/json", 1)
    if name == "array100":
        return Payload(name, json_array_body(100), "application/json", 100)
    if name == "ndjson100":
        return Payload(name, ndjson_body(100), "application/x-ndjson", 100)
    if name == "array1000":
        return Payload(name, json_array_body(1000), "application/json", 1000)
    raise ValueError(name)


# -- tools --


def _install_with_apt(package: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=False, capture_output=True,
                   timeout=300)


def ensure_wrk() -> str | None:
    """Path of wrk; installs it with apt-get when missing and we are root. None if unavailable."""
    path = shutil.which("wrk")
    if path is None:
        _install_with_apt("wrk")
        path = shutil.which("wrk")
    return path


def py_spy() -> str | None:
    venv_tool = Path(sys.executable).parent / "py-spy"
    return str(venv_tool) if venv_tool.exists() else shutil.which("py-spy")


def speedups_module(implementation: str) -> ModuleType:
    """The `_speedups` module a server reports in /healthz: "compiled" or "pure-python"; never skips."""
    return testing.speedups_module(implementation, skip_if_missing=False)


def parse_server_extra(items: list[str] | str | None) -> ConfigValues:
    """`["server.workers=2", "writer.batch_size=500"]` (or the same comma-separated) -> config values.

    This is the hook for measuring settings the benchmarks do not set themselves, e.g.
    `--server-extra server.workers=2` (or BENCH_SERVER_EXTRA=server.workers=2) once multi-worker
    serving exists.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: ConfigValues = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, value = part.partition("=")
            section, _, key = name.partition(".")
            if not key or not _:
                raise ValueError(f"server extra {part!r}: expected section.key=value")
            out.setdefault(section.strip(), {})[key.strip()] = value.strip()
    return out


# -- /proc sampling (the server and its descendants, so multi-worker servers count whole) --


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5): utime, stime
    return total / CLK_TCK


def _status_kib(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib(pid: int) -> float:
    """Largest VmHWM (peak resident set) over the process tree, MiB."""
    return max(_status_kib(p, "VmHWM") for p in process_tree(pid)) / 1024


def rss_mib(pid: int) -> float:
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid)) / 1024


# -- server subprocesses --


_SERIAL = itertools.count()


def listening_port(pid: int) -> int | None:
    """The TCP port process `pid` listens on, as the kernel reports it: for checkouts older than the
    "listening on" log line (A/B runs against an old commit). None if none yet."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    return next((local for local, _, state, _, inode in tcp_sockets() if state == "0A" and inode in inodes), None)


class Server(ServerProcess):
    """A benchmark server subprocess: the product, the raw ASGI ceiling or the naive app, with what
    check_log reads back (its log directory and key file)."""

    def __init__(self, kind: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
                 config: Path | None = None, data_dir: Path | None = None, key_file: Path | None = None) -> None:
        super().__init__(argv, workdir / f"{kind}-{next(_SERIAL)}.log", env=env, cwd=workdir, name=kind,
                         config_path=config)
        self.kind = kind
        self.workdir = workdir
        self.data_dir = data_dir
        self.key_file = key_file

    def reported_address(self) -> tuple[str, str, int] | None:
        found = super().reported_address()
        if found is None and (port := listening_port(self.pid)) is not None:  # checkouts older than the line
            return "http", "127.0.0.1", port
        return found

    def wait_ready(self, timeout: float = 30.0, status: int | None = None) -> None:
        """Any answer to /healthz will do (the raw ceiling answers 202 to everything)."""
        super().wait_ready(timeout, status)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait (two minutes: a loaded product drains a large buffer to disk first)."""
        return super().stop(timeout)


def bench_config(port: int, data_dir: Path, key_file: Path) -> ConfigValues:
    """The product's benchmark config: rate limit off, fsync = interval, log in a tmp dir."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 120},
        "rate_limit": {"bytes_per_second": 0},
        "writer": {"directory": str(data_dir), "fsync": "interval"},
        "crypto": {"key_file": str(key_file)},
    }


def default_config(port: int, data_dir: Path, key_file: Path) -> ConfigValues:
    """config.ini's defaults with only port, log directory and key file changed."""
    return {
        "server": {"port": port},
        "writer": {"directory": str(data_dir)},
        "crypto": {"key_file": str(key_file)},
    }


def start_product(workdir: Path, *, values: ConfigValues | None = None, extra: ConfigValues | None = None,
                  env: dict[str, str] | None = None, name: str = "product") -> Server:
    """`python -m telemetry_sink serve --config X` with the benchmark config (or `values`) + `extra`,
    on a port it picks and reports back."""
    from telemetry_sink.crypto import write_key_file

    workdir.mkdir(parents=True, exist_ok=True)
    serial = next(_SERIAL)
    key_file = workdir / "sink.key"
    if not key_file.exists():
        write_key_file(key_file)
    data_dir = workdir / f"data-{name}-{serial}"
    base = values if values is not None else bench_config(0, data_dir, key_file)
    base = merge_config(base, {"server": {"port": 0}, "writer": {"directory": str(data_dir)}})
    config = write_config(workdir / f"config-{name}-{serial}.ini", merge_config(base, extra))
    # --log-level info: the "listening on" line is an info line; the access log stays off.
    server = Server(name, [sys.executable, "-m", "telemetry_sink", "serve", "--config", str(config),
                           "--log-level", "info"],
                    workdir, env=env, config=config, data_dir=data_dir, key_file=key_file)
    server.wait_ready()
    return server


def start_reference(kind: str, workdir: Path) -> Server:
    """`raw` (benchmarks/raw_asgi.py) or `naive` (benchmarks/naive_fastapi.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "raw":
        argv = [sys.executable, str(BENCH_DIR / "raw_asgi.py"), "--port", "0"]
        server = Server(kind, argv, workdir)
    elif kind == "naive":
        out = workdir / f"naive-{next(_SERIAL)}.log.enc"
        argv = [sys.executable, str(BENCH_DIR / "naive_fastapi.py"), "--port", "0", "--out", str(out)]
        server = Server(kind, argv, workdir, data_dir=out)
    else:
        raise ValueError(kind)
    server.wait_ready()
    return server


# -- Fluent Bit 5.1.1, the C peer (../shared/peers/fluent-bit/README.md, beside the checkout) --

FLUENT_BIT = Path(os.environ.get("FLUENT_BIT", ROOT.parent / "shared" / "peers" / "fluent-bit" / "fluent-bit"))
_FLUENT_BIT_CONF = """[SERVICE]
    Flush        1
    Grace        30
    Log_Level    warn
[INPUT]
    Name         http
    Listen       127.0.0.1
    Port         {port}
    storage.type memory
[OUTPUT]
    Name   file
    Match  *
    Path   {out_dir}
    File   out.log
    Format plain
"""


def start_fluent_bit(workdir: Path) -> Server:
    """Fluent Bit's in_http -> out_file (one JSON record a line; it does not encrypt). It answers 201;
    `data_dir` is its output file, counted after stop() like the naive app's."""
    if not FLUENT_BIT.is_file():
        raise RuntimeError(f"Fluent Bit not found at {FLUENT_BIT} (set FLUENT_BIT=PATH)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()  # Fluent Bit cannot report a port it picked (see Server.reported_address)
    out_dir = workdir / f"fluentbit-{port}"
    out_dir.mkdir()
    conf = workdir / f"fluentbit-{port}.conf"
    conf.write_text(_FLUENT_BIT_CONF.format(port=port, out_dir=out_dir))
    server = Server("fluentbit", [str(FLUENT_BIT), "-c", str(conf)], workdir, data_dir=out_dir / "out.log")
    server.wait_ready()
    return server


# -- wrk --


@dataclass
class WrkResult:
    seconds: float
    requests: int
    statuses: dict[str, int]
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    raw_output: str = field(repr=False, default="")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def accepted(self) -> int:
        """Answers with a 2xx status (the product answers 202 to every stored request)."""
        return sum(n for status, n in self.statuses.items() if status.startswith("2"))

    @property
    def refused(self) -> dict[str, int]:
        """Answers by status that are not 2xx."""
        return {status: n for status, n in self.statuses.items() if not status.startswith("2")}


def run_wrk(url: str, body: Payload, seconds: float, connections: int = 64, threads: int = 1,
            timeout_s: float = 10.0, script: Path = LUA_POST, script_args: tuple[str, ...] = ()) -> WrkResult:
    """One bounded wrk run (POST `body` over `connections` keep-alive connections); `script` and its
    extra `script_args` (after BODY_FILE CONTENT_TYPE) may replace lua/post.lua."""
    wrk = ensure_wrk()
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    fd, name = tempfile.mkstemp(prefix="bench-body-")
    body_file = Path(name)
    with os.fdopen(fd, "wb") as f:
        f.write(body.body)
    try:
        argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                f"--timeout={timeout_s:g}s", "-s", str(script), url + "/telemetry", "--",
                str(body_file), body.content_type, *script_args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    finally:
        body_file.unlink(missing_ok=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len("BENCH_JSON ") :])
    return WrkResult(
        seconds=data["duration_us"] / 1e6,
        requests=int(data["requests"]),
        statuses={str(k): int(v) for k, v in data["statuses"].items()},
        errors={k: int(v) for k, v in data["errors"].items()},
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000, p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000, raw_output=done.stdout,
    )


# -- checking what reached the log --


def count_logged(data_dir: Path, key_file: Path, decrypt_every: int = 50) -> tuple[int, int]:
    """(records in every segment of `data_dir`, tokens decrypted): CRC-checked counts from the
    segment reader, and every `decrypt_every`-th token authenticated and decrypted with the key."""
    from telemetry_sink import segment_format
    from telemetry_sink.crypto import CryptoService

    crypto = CryptoService.from_key_file(key_file)
    total = decrypted = 0
    for path in segment_format.list_segments(data_dir):
        with segment_format.SegmentImage(path) as image:
            for item in image.batches():
                if not isinstance(item, segment_format.Batch):
                    raise AssertionError(f"{path}: damaged log: {item}")
                for token in item.tokens[:: max(1, decrypt_every)]:
                    orjson.loads(crypto.decrypt(token))
                    decrypted += 1
                total += item.count
    return total, decrypted


def count_naive_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


@dataclass
class PointResult:
    """One end-to-end measurement: one server kind, one payload, one load run (plus warm-up)."""

    server: str
    payload: str
    seconds: float
    connections: int
    records_per_request: int
    body_bytes: int
    requests: int
    rps: float
    records_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: dict[str, int]
    server_cpu_s: float
    server_cpu_util: float
    peak_rss_mib: float
    accepted_total: int = 0  # 202s including the warm-up run
    logged_records: int | None = None
    log_check: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(server: Server, body: Payload, seconds: float, connections: int = 64, threads: int = 1,
            warmup_s: float = 1.0) -> tuple[PointResult, list[WrkResult]]:
    """Warm up, then one measured wrk run with CPU and peak RSS of the server around it."""
    runs: list[WrkResult] = []
    if warmup_s > 0:
        runs.append(run_wrk(server.url, body, warmup_s, connections, threads))
    cpu0 = cpu_seconds(server.pid)
    res = run_wrk(server.url, body, seconds, connections, threads)
    cpu1 = cpu_seconds(server.pid)
    runs.append(res)
    point = PointResult(
        server=server.kind, payload=body.name, seconds=res.seconds, connections=connections,
        records_per_request=body.records_per_request, body_bytes=len(body.body), requests=res.requests,
        rps=res.rps, records_per_s=res.accepted * body.records_per_request / res.seconds,
        p50_ms=res.p50_ms, p90_ms=res.p90_ms, p99_ms=res.p99_ms, max_ms=res.max_ms,
        statuses=res.statuses, errors=res.errors, server_cpu_s=cpu1 - cpu0,
        server_cpu_util=(cpu1 - cpu0) / res.seconds, peak_rss_mib=peak_rss_mib(server.pid),
    )
    return point, runs


def check_log(server: Server, runs: list[WrkResult], records_per_request: int,
              connections: int) -> tuple[int | None, str]:
    """After stop(): compare the records on disk with the 202s wrk saw.

    At least one record must be on disk, every record that got a 202 too, and nothing else but whole
    requests that were in flight when a wrk run ended (wrk abandons at most one request per
    connection per run without reading its answer; the server may have accepted it).
    Returns (records logged, verdict).
    """
    accepted = sum(r.accepted for r in runs) * records_per_request
    slack = len(runs) * connections * records_per_request
    if server.kind == "raw":
        return None, "n/a (stores nothing)"
    if server.kind in ("naive", "fluentbit"):
        assert server.data_dir is not None
        logged = count_naive_lines(server.data_dir)
        decrypted = 0
    else:
        assert server.data_dir is not None and server.key_file is not None
        logged, decrypted = count_logged(server.data_dir, server.key_file)
    extra = logged - accepted
    # An empty log proves nothing: a point whose every request was refused must not pass.
    ok = logged > 0 and 0 <= extra <= slack and extra % records_per_request == 0
    verdict = (f"{'ok' if ok else 'FAILED'}: {logged} records on disk, {accepted} acknowledged (202), "
               f"{extra // records_per_request if records_per_request else extra} extra whole request(s) "
               f"in flight at wrk's stop (allowed <= {len(runs) * connections})")
    if decrypted:
        verdict += f"; {decrypted} sampled tokens decrypted"
    return logged, verdict


# -- profiling --


# Frames every sample of the server shares (process start-up, uvicorn's run loop): left out of the
# inclusive ranking, which would otherwise start with a dozen 100 % rows.
_PROFILE_PLUMBING = ("<module> ", "_run_module_as_main ", "_run_code ", "main (telemetry_sink/cli.py",
                     "cmd_serve ", "Server.run ", "asyncio_run ", "Runner.run ", "run (uvicorn/", "_worker ",
                     "Thread.run ", "Thread._bootstrap", "run (asyncio/runners.py")


def profile_summary(raw_path: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Summarise py-spy's raw (collapsed) output: top functions by self and by inclusive samples."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        self_counts[frames[-1]] += count
        for frame in set(frames):
            if not frame.startswith(_PROFILE_PLUMBING):
                incl_counts[frame] += count
    if not total:
        return {"self": [], "inclusive": []}

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)]

    return {"self": pct(self_counts), "inclusive": pct(incl_counts), "samples": [("total", float(total))]}


def profile_under_load(server: Server, body: Payload, seconds: float, out: Path,
                       connections: int = 64) -> dict[str, Any]:
    """Run wrk against `server` while py-spy samples it (idle threads excluded, native off)."""
    tool = py_spy()
    if tool is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([tool, "record", "--pid", str(server.pid), "--duration", str(max(1, int(seconds))),
                            "--rate", "100", "--format", "raw", "--output", str(out), "--nonblocking"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    try:
        res = run_wrk(server.url, body, seconds, connections)
    finally:
        spy_out, _ = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed ({spy.returncode}): {spy_out[-500:]}"}
    summary: dict[str, Any] = dict(profile_summary(out))
    summary["rps_while_profiled"] = res.rps
    return summary


def sample_while(server: Server, stop: threading.Event, interval_s: float = 1.0) -> Iterator[dict[str, Any]]:
    """Yield /healthz buffer fill and RSS every `interval_s` until `stop` is set."""
    while not stop.wait(interval_s):
        health = server.healthz() or {}
        yield {"t": time.monotonic(), "rss_mib": rss_mib(server.pid),
               "buffer_records": health.get("buffer_records")}
