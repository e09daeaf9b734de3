"""`telemetry-sink export`, run as a real subprocess on real segments: Parquet, CSV, NDJSON, files,
directories and stdout, read's filters, bounded row groups, and one-line errors."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli
from s3_support import RO, SeaweedS3
from test_cli import write_segment
from test_ship_server import bucket

from telemetry_sink import segment_format
from telemetry_sink.crypto import CryptoService, generate_key
from telemetry_sink.objstore import object_key
from telemetry_sink.shipper import first_created_ms

pq = pytest.importorskip("pyarrow.parquet")

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Data:
    """Two segments of one series, three nodes, one record a minute from T0; and a key file."""

    def __init__(self, base: Path) -> None:
        self.key_file = base / "sink.key"
        key = generate_key()
        self.key_file.write_bytes(key + b"\n")
        self.key_file.chmod(0o600)
        crypto = CryptoService([key.decode()], "test")
        self.records: list[dict[str, Any]] = [
            {"node_id": f"greenhouse-{i % 3}", "ts": T0 + 60 * i, "temp_c": 20 + i / 10, "rh": i,
             "env": {"hpa": 1000 + i, "ok": i % 2 == 0}, "tags": ["a"] * (i % 2)}
            for i in range(50)
        ] + [{"node_id": "barn-1", "ts": T0 + 3000, "temp_c": "n/a"}]
        self.data = base / "data"
        r = self.records
        write_segment(self.data, crypto, [r[0:10], r[10:20], r[20:30]], 0)
        write_segment(self.data, crypto, [r[30:45], r[45:]], 30)

    def export(self, *args: str) -> Any:
        return run_cli("export", "--key-file", str(self.key_file), *args, str(self.data))


@pytest.fixture
def data(tmp_path: Path) -> Data:
    return Data(tmp_path)


def test_parquet_has_typed_columns_and_extra(data: Data, tmp_path: Path) -> None:
    out = tmp_path / "day.parquet"
    proc = data.export("--out", str(out), "--row-group-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert f"exported 51 records to {out}" in proc.stderr.decode()
    parquet = pq.ParquetFile(out)
    assert parquet.metadata.num_row_groups == 4  # written 16 records at a time: memory stays bounded
    chunks = parquet.metadata.row_group(0)
    # ts delta-encoded (nearly increasing, nearly unique: no dictionary), the rest dictionary-encoded.
    assert "DELTA_BINARY_PACKED" in chunks.column(1).encodings and not chunks.column(1).has_dictionary_page
    assert chunks.column(0).has_dictionary_page
    table = parquet.read()
    # temp_c is a number in 50 records and "n/a" in one: not stable, so it is JSON in extra.
    assert table.schema.names == ["node_id", "ts", "rh", "env.hpa", "env.ok", "extra"]
    assert [str(t) for t in table.schema.types] == ["string", "timestamp[us, tz=UTC]", "int64", "int64", "bool",
                                                    "string"]
    rows = table.to_pylist()
    assert [r["node_id"] for r in rows] == [r["node_id"] for r in data.records]
    assert [r["ts"].timestamp() for r in rows] == [r["ts"] for r in data.records]
    assert rows[3]["env.hpa"] == 1003 and rows[3]["env.ok"] is False
    assert orjson.loads(rows[3]["extra"]) == {"temp_c": 20.3, "tags": ["a"]}
    assert orjson.loads(rows[4]["extra"]) == {"temp_c": 20.4, "tags": []}
    assert orjson.loads(rows[-1]["extra"]) == {"temp_c": "n/a"}
    assert rows[-1]["rh"] is None and rows[-1]["env.hpa"] is None


def test_filters_are_reads(data: Data, tmp_path: Path) -> None:
    """--node globs and --since/--until (ISO 8601, Unix) select what read selects."""
    filters = ["--node", "greenhouse-[02]", "--node", "barn-*", "--since", "2026-01-01T00:10:00Z",
               "--until", str(T0 + 3001)]
    read = run_cli("read", "--key-file", str(data.key_file), *filters, str(data.data))
    assert read.returncode == 0, read.stderr
    wanted = [orjson.loads(line) for line in read.stdout.splitlines()]
    assert {r["node_id"] for r in wanted} == {"greenhouse-0", "greenhouse-2", "barn-1"}
    assert all(T0 + 600 <= r["ts"] < T0 + 3001 for r in wanted)
    out = tmp_path / "f.parquet"
    assert data.export(*filters, "--out", str(out)).returncode == 0
    assert [(r["node_id"], r["ts"].timestamp()) for r in pq.read_table(out).to_pylist()] == [
        (r["node_id"], r["ts"]) for r in wanted]
    ndjson = data.export(*filters, "--format", "ndjson")
    assert ndjson.stdout == read.stdout


def test_relative_times(data: Data) -> None:
    """The data is from 2026-01-01: more than an hour ago, so --since 1h keeps nothing, --until 1h all."""
    assert data.export("--format", "ndjson", "--since", "1h").stdout == b""
    assert len(data.export("--format", "ndjson", "--until", "1h").stdout.splitlines()) == 51


def test_csv_to_stdout(data: Data) -> None:
    proc = data.export("--format", "csv", "--node", "greenhouse-1")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout.decode())))
    assert [r["rh"] for r in rows] == [str(i) for i in range(1, 50, 3)]
    assert rows[0]["ts"] == "2026-01-01 00:01:00.000000Z"
    assert rows[0]["env.hpa"] == "1001"


def test_directory_gets_one_file_per_segment(data: Data, tmp_path: Path) -> None:
    out = tmp_path / "export"
    proc = data.export("--out", f"{out}/")
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"w0-{0:020d}.parquet", f"w0-{30:020d}.parquet"]
    assert [pq.read_metadata(out / f).num_rows for f in files] == [30, 21]
    # One schema for all files of an export, so `SELECT ... FROM 'export/*.parquet'` reads them as one.
    assert pq.read_schema(out / files[0]) == pq.read_schema(out / files[1])
    assert data.export("--out", str(out), "--node", "nobody").returncode == 2  # files exist: refused
    assert data.export("--out", str(out), "--node", "nobody", "--force").returncode == 0


def test_nothing_matched_is_still_a_valid_file(data: Data, tmp_path: Path) -> None:
    out = tmp_path / "empty.parquet"
    assert data.export("--out", str(out), "--node", "nobody").returncode == 0
    assert pq.read_table(out).num_rows == 0


def _one_error_line(proc: Any) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return str(lines[0])


def test_errors_are_one_line(data: Data, tmp_path: Path) -> None:
    assert "needs --out" in _one_error_line(data.export())
    out = tmp_path / "x.parquet"
    out.write_bytes(b"keep me")
    assert "--force" in _one_error_line(data.export("--out", str(out)))
    assert out.read_bytes() == b"keep me"
    assert "is not a time" in data.export("--since", "yesterday-ish").stderr.decode()


def test_without_pyarrow_says_how_to_get_it(data: Data, tmp_path: Path) -> None:
    # A pyarrow that cannot be imported, ahead of the real one on the path (as on a machine without it).
    fake = tmp_path / "no-pyarrow" / "pyarrow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    proc = run_cli("export", "--key-file", str(data.key_file), "--out", str(tmp_path / "x.parquet"),
                   str(data.data), env={"PYTHONPATH": str(fake.parent)})
    assert "pip install 'telemetry-sink[export]'" in _one_error_line(proc)
    ndjson = run_cli("export", "--key-file", str(data.key_file), "--format", "ndjson", str(data.data),
                     env={"PYTHONPATH": str(fake.parent)})
    assert ndjson.returncode == 0 and len(ndjson.stdout.splitlines()) == 51  # ndjson needs no pyarrow


def test_records_under_another_key_are_counted_once(data: Data, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(generate_key() + b"\n")
    other.chmod(0o600)
    proc = run_cli("export", "--key-file", str(other), "--format", "ndjson", str(data.data))
    assert proc.returncode == 1 and proc.stdout == b""
    assert "0 of 51 records decrypted" in proc.stderr.decode()


def test_from_object_storage_one_file_per_object(data: Data, s3_server: SeaweedS3, tmp_path: Path) -> None:
    """Two instances' copies of the same segments in a bucket: each object gets its own file, named
    after its instance too (the series names are the same), and the rows are the local export's."""
    store = bucket(s3_server, "export")
    for instance in ("sink-a", "sink-b"):
        for path in segment_format.list_segments(data.data):
            series, seq = segment_format.parse_segment_name(path)
            store.upload_create_only(object_key(instance, series, seq, first_created_ms(path)), path)
    out = tmp_path / "remote"
    proc = run_cli("export", "--key-file", str(data.key_file), "--out", f"{out}/", s3_server.url("export"),
                   env=s3_server.env(RO))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{i}-w0-{s:020d}.parquet" for i in ("sink-a", "sink-b") for s in (0, 30)]
    local = tmp_path / "local.parquet"
    assert data.export("--out", str(local)).returncode == 0
    for instance in ("sink-a", "sink-b"):
        remote = [pq.read_table(out / f).to_pylist() for f in files if f.startswith(instance)]
        assert remote[0] + remote[1] == pq.read_table(local).to_pylist()
