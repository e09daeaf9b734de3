"""docs/analyse.md, run as written: its `sh` commands (telemetry-sink as a real subprocess), its DuckDB
`sql` and its `python` blocks, in order, on two days of real segments; the day's averages checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from test_cli import write_segment

from telemetry_sink.crypto import CryptoService, write_key_file
from telemetry_sink.testing import clean_env

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

DOC = Path(__file__).resolve().parent.parent / "docs" / "analyse.md"
DAY = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
NODES = ["barn-1", "greenhouse-1", "greenhouse-2"]


def blocks(kind: str | None = None) -> list[tuple[str, str]]:
    """(info string, body) of each fenced block of the doc, in order."""
    found = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.M | re.S)
    return [(k, body) for k, body in found if kind is None or k == kind]


def make_log(base: Path) -> list[dict[str, Any]]:
    """A record a minute per node from 23:00 the day before to 01:00 the day after (the doc's day is
    2026-12-01); a mixed-type `firmware_note` now and then, so it lands in `extra`."""
    records: list[dict[str, Any]] = []
    for minute in range(-60, 24 * 60 + 60):
        for n, node in enumerate(NODES):
            i = len(records)
            record: dict[str, Any] = {"node_id": node, "ts": DAY + 60 * minute + n, "temp_c": 15 + n + (i % 7) / 2,
                                      "co2_ppm": 400 + i % 300}
            if i % 500 == 0:
                record["firmware_note"] = "rebooted" if i % 1000 else 3
            records.append(record)
    key = base / "sink.key"
    write_key_file(key)
    crypto = CryptoService.from_key_file(key)
    batches = [records[i : i + 500] for i in range(0, len(records), 500)]
    write_segment(base / "data", crypto, batches[: len(batches) // 2], 0)
    write_segment(base / "data", crypto, batches[len(batches) // 2 :], sum(map(len, batches[: len(batches) // 2])))
    write_config(base / "config.ini", {"writer": {"directory": "data"}, "crypto": {"key_file": "sink.key"}})
    return records


def test_the_doc_has_what_it_promises() -> None:
    kinds = [k for k, _ in blocks()]
    assert kinds.count("sh") >= 3 and kinds.count("sql") >= 3 and kinds.count("python") >= 2
    assert "GROUP BY" in blocks("sql")[0][1]


def test_doc_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    records = make_log(tmp_path)
    monkeypatch.chdir(tmp_path)  # the doc works in the directory holding config.ini
    results = []
    for kind, body in blocks():
        if kind == "sh":
            for line in body.splitlines():
                argv = shlex.split(line, comments=True)
                if not argv:
                    continue
                assert argv[0] == "telemetry-sink", line
                proc = subprocess.run([sys.executable, "-m", "telemetry_sink", *argv[1:]], capture_output=True,
                                      env=clean_env({"PYTHONPATH": os.pathsep.join(sys.path)}), timeout=120)
                assert proc.returncode == 0, (line, proc.stderr.decode())
                assert proc.stderr.decode().startswith("exported "), proc.stderr
        elif kind == "sql":
            results.append(duckdb.sql(body).fetchall())
        elif kind == "python":
            exec(compile(body, str(DOC), "exec"), {})  # the doc's own code, as a reader runs it
    day = [r for r in records if DAY <= r["ts"] < DAY + 86400]
    per_node: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in day:
        per_node[r["node_id"]].append(r)
    expected = [(node, sum(r["temp_c"] for r in rs) / len(rs), max(r["co2_ppm"] for r in rs), len(rs))
                for node, rs in sorted(per_node.items())]
    got = results[0]
    assert [(n, c, k) for n, _, c, k in got] == [(n, c, k) for n, _, c, k in expected]
    assert all(abs(a[1] - b[1]) < 1e-9 for a, b in zip(got, expected, strict=True))
    assert len(results[1]) == 24 * len(NODES)  # hourly, from the directory export
    notes = {note for _, note in results[2]}
    assert notes == {"rebooted", "3"}
    out = capsys.readouterr().out
    assert "greenhouse-2" in out  # the pandas and duckdb prints ran
    assert (tmp_path / "day.csv").read_text().startswith('"node_id","ts","temp_c","co2_ppm","extra"')
    assert len((tmp_path / "greenhouses.ndjson").read_text().splitlines()) == 2 * 24 * 60
