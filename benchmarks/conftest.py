"""pytest configuration of the benchmark suites (markers, options, shared fixtures).

Markers: `quick` (the CI gate, benchmarks/run_quick.sh), `e2e` (HTTP over loopback with wrk),
`overload` (sustained load above the rate limit), `profile` (py-spy of the server under load).
Options (also as environment variables, for run_all.py and CI):

  --e2e-seconds N         seconds per end-to-end point (BENCH_E2E_SECONDS, default 10)
  --overload-seconds N    duration of the overload test (BENCH_OVERLOAD_SECONDS, default 60)
  --connections N         wrk connections (BENCH_CONNECTIONS, default 64)
  --server-extra S.K=V    extra product config, repeatable (BENCH_SERVER_EXTRA, comma-separated),
                          e.g. --server-extra server.workers=2 to measure 1 vs 2 workers
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from telemetry_sink import speedups

MARKERS = {
    "quick": "the quick CI gate (benchmarks/run_quick.sh): ratio asserts with wide margins",
    "e2e": "end to end over HTTP on loopback with wrk (server subprocesses)",
    "overload": "sustained load above the rate limit with the default config (memory bound)",
    "profile": "py-spy profile of the server under load",
}
# The framing gate of benchmarks/test_bench_speedups.py (compiled >= 3x Fernet.encrypt) is part of
# the quick gate too; it also runs in the framing suite, so the marker is added here.
QUICK_ELSEWHERE = ("test_bench_speedups.py::test_gate_compiled_vs_fernet",)
# Every gate `-m quick` must run: a gate that lost its marker or its file fails the run, not shrinks it.
QUICK_GATES = (
    "test_bench_http.py::test_quick_gate_single_post",
    "test_bench_micro.py::test_quick_server_runs_compiled_extension",
    "test_bench_micro.py::test_quick_gate_compiled_framer_vs_twin",
    "test_bench_speedups.py::test_gate_compiled_vs_fernet",
)


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("telemetry-sink benchmarks")
    group.addoption("--e2e-seconds", type=float, default=float(os.environ.get("BENCH_E2E_SECONDS", 10)),
                    help="seconds of wrk load per end-to-end point (default 10)")
    group.addoption("--overload-seconds", type=float,
                    default=float(os.environ.get("BENCH_OVERLOAD_SECONDS", 60)),
                    help="duration of the sustained-overload memory test (default 60)")
    group.addoption("--connections", type=int, default=int(os.environ.get("BENCH_CONNECTIONS", 64)),
                    help="wrk connections (default 64)")
    group.addoption("--server-extra", action="append",
                    default=[os.environ["BENCH_SERVER_EXTRA"]] if os.environ.get("BENCH_SERVER_EXTRA") else [],
                    help="extra product config as section.key=value (repeatable), e.g. server.workers=2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    overload_s = float(config.getoption("--overload-seconds"))
    for item in items:
        if item.nodeid.endswith(QUICK_ELSEWHERE):
            item.add_marker(pytest.mark.quick)
        if item.get_closest_marker("overload") is not None:
            # pytest-timeout's default (300 s) would cut a 10-minute overload run short.
            item.add_marker(pytest.mark.timeout(overload_s + 600))


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.getoption("markexpr") != "quick" or session.config.getoption("keyword"):
        return  # not the gate, or a subset of it asked for with -k
    missing = [gate for gate in QUICK_GATES if not any(item.nodeid.endswith(gate) for item in session.items)]
    if missing:
        raise pytest.UsageError(f"the quick gate lacks {', '.join(missing)} (QUICK_GATES, benchmarks/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A quick gate never skips (in CI or anywhere): a skip there is reported as a failure."""
    report: pytest.TestReport = yield
    if report.skipped and item.get_closest_marker("quick") is not None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"a quick gate must not skip ({report.longrepr!r}): fix the cause, see docs/BENCHMARKS.md"
    return report


def pytest_report_header() -> str:
    return (f"telemetry_sink speedups: {speedups.IMPLEMENTATION}; "
            f"TELEMETRY_SINK_NO_EXTENSIONS={os.environ.get('TELEMETRY_SINK_NO_EXTENSIONS', '')!r}")


@pytest.fixture(scope="session")
def bench_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    import harness

    opt = request.config.getoption
    return {
        "e2e_seconds": float(opt("--e2e-seconds")),
        "overload_seconds": float(opt("--overload-seconds")),
        "connections": int(opt("--connections")),
        "server_extra": harness.parse_server_extra(list(opt("--server-extra"))),
    }


@pytest.fixture(scope="session")
def bench_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def served_implementation(bench_workdir: Path) -> str:
    """The `_speedups` implementation a product server started by the benchmarks reports in /healthz:
    the framing gates time that one, not whatever this process happens to import."""
    import harness

    server = harness.start_product(bench_workdir / "implementation", name="implementation")
    try:
        health = server.healthz() or {}
    finally:
        server.stop()
    return str(health.get("implementation"))


@pytest.fixture(scope="session")
def wrk() -> str:
    """wrk's path; installs it (apt-get, as root) when missing. No wrk fails: a gate must not skip."""
    import harness

    path = harness.ensure_wrk()
    if path is None:
        pytest.fail("wrk is not installed and could not be installed (run as root, or apt-get install wrk)")
    return path
