"""Shared fixtures: both `_speedups` implementations, keys, configs and real server subprocesses."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from telemetry_sink import speedups


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
