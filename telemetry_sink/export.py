"""`telemetry-sink export`: decrypted records as Parquet, CSV or NDJSON for DuckDB, pandas, Polars or
a spreadsheet, through the same segment walk and filters as `read` (reader.RecordWalker).

Reads local segments or `s3://` ones, like read. Where it goes: `--out FILE` (one file), `--out DIR/`
(an existing directory, or a path ending in `/`: one file per source segment that has records, named
after the segment, and after its instance for an object), or stdout (csv and
ndjson only). Files are written under a temporary name and renamed when complete, so a file with
the final name is always whole. Records are converted and written ROW_GROUP at a time (one
Parquet row group each), so memory stays bounded whatever the size of the input. Parquet and CSV
need pyarrow (the `export` extra); the column rule is in telemetry_sink/columns.py.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from . import segment_format
from .progress import Progress
from .reader import RecordWalker
from .segment_source import SegmentRef, total_size

FORMATS = ("parquet", "csv", "ndjson")
ROW_GROUP = 65_536
SAMPLE = 10_000  # records the columns are chosen from (columns.py has the rule)
# Records parsed at once: pyarrow's JSON reader holds several times its input while it works, so
# a row group is converted in slices (65,536 at once: 180 MiB peak RSS; 16,384: 146 MiB).
SLICE = 16_384
PARTIAL = ".partial"
DESCRIPTION = ("Decrypt segments (default: every segment in the configured directory) into Parquet, CSV or "
               "NDJSON, with the same filters as read. Parquet and CSV have typed columns: node_id, ts (a UTC "
               "timestamp), each field of stable type (nested objects flattened with dots), the rest as JSON in "
               "'extra' (see docs/analyse.md). Needs pyarrow for parquet and csv: pip install "
               "'telemetry-sink[export]'.")


class ExportError(Exception):
    """A user-facing export problem, one line (missing pyarrow, an output that exists, ...)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """export's own options (the record options are read's, added by cli.py)."""
    p.add_argument("--format", choices=FORMATS, default="parquet", help="output format (default: parquet)")
    p.add_argument("--out", metavar="FILE|DIR/", help="a file, or a directory (existing, or ending in /) for one "
                   "file per segment; default: stdout (csv and ndjson only)")
    p.add_argument("--force", action="store_true", help="replace output files that exist")
    p.add_argument("--row-group-size", type=int, default=ROW_GROUP, metavar="N", help=argparse.SUPPRESS)


def _arrow() -> Any:
    # pyarrow loads numpy, whose OpenBLAS starts a pool of threads that spin while idle: 3% of an
    # export's CPU time, for nothing (export does no linear algebra). Unless the user asked otherwise.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        import pyarrow

        from . import columns
    except ImportError:
        return None
    del pyarrow
    return columns


@dataclass
class _Output:
    """One output (a file, or stdout when `path` is None) being written; `close()` makes it final."""

    fmt: str
    path: Path | None
    plan: Any  # the export's columns.ColumnPlan (None for ndjson)
    records: int = 0
    _stream: IO[bytes] | None = None
    _writer: Any = None

    def __post_init__(self) -> None:
        if self.path is None:
            self._stream = sys.stdout.buffer
        else:
            self._stream = open(self._partial, "wb")  # noqa: SIM115  (closed in close/abort)

    @property
    def _partial(self) -> Path:
        assert self.path is not None
        return self.path.with_name(f".{self.path.name}{PARTIAL}")

    def write(self, lines: list[bytes]) -> None:
        assert self._stream is not None
        self.records += len(lines)
        if self.fmt == "ndjson":
            self._stream.write(b"\n".join(lines) + b"\n")
            return
        import pyarrow as pa

        table = pa.concat_tables([self.plan.table(lines[i : i + SLICE]) for i in range(0, len(lines), SLICE)])
        if self._writer is None:
            self._writer = _open_writer(self.fmt, self._stream, table.schema)
        self._writer.write_table(table)

    def close(self) -> None:
        assert self._stream is not None
        if self._writer is None and self.fmt != "ndjson":  # no records: still a valid, empty table
            table = self.plan.table([])
            self._writer = _open_writer(self.fmt, self._stream, table.schema)
            self._writer.write_table(table)
        if self._writer is not None:
            self._writer.close()
        self._stream.flush()
        if self.path is not None:
            os.fsync(self._stream.fileno())
            self._stream.close()
            os.replace(self._partial, self.path)

    def abort(self) -> None:
        if self.path is not None and self._stream is not None:
            self._stream.close()
            self._partial.unlink(missing_ok=True)


def _open_writer(fmt: str, stream: IO[bytes], schema: Any) -> Any:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        # ts is nearly unique and nearly increasing: a dictionary of it is as big as the column and
        # costs a hash per row, while delta encoding stores each step in a few bits (a 150-byte
        # sensor record: 14.6 -> 6.6 bytes in the file, the writer 22% faster). Every Parquet
        # reader of note (pyarrow, DuckDB, Polars, Spark) reads DELTA_BINARY_PACKED.
        return pq.ParquetWriter(stream, schema, use_dictionary=[n for n in schema.names if n != "ts"],
                                column_encoding={"ts": "DELTA_BINARY_PACKED"})
    import pyarrow.csv as pa_csv

    return pa_csv.CSVWriter(stream, schema)


@dataclass
class _Targets:
    """Where each segment's records go: one file, one file per segment, or stdout."""

    fmt: str
    out: str | None
    force: bool
    per_segment: bool = field(init=False)

    def __post_init__(self) -> None:
        self.per_segment = self.out is not None and (self.out.endswith(("/", os.sep)) or Path(self.out).is_dir())
        if self.out is None and self.fmt == "parquet":
            raise ExportError("--format parquet needs --out FILE or --out DIR/ (Parquet cannot go to a terminal "
                              "or a pipe)")
        if self.per_segment:
            Path(self.out or ".").mkdir(parents=True, exist_ok=True)

    def path_for(self, segment: SegmentRef | None) -> Path | None:
        if self.out is None:
            return None
        if not self.per_segment:
            return Path(self.out)
        assert segment is not None
        # The segment's name; for an object, after its instance (instances share series names).
        instance = segment.series.rpartition("/")[0].replace("/", "-")
        name = segment.label.rpartition("/")[2].removesuffix(segment_format.SEGMENT_SUFFIX)
        return Path(self.out) / f"{instance + '-' if instance else ''}{name}.{self.fmt}"

    def check(self, segments: list[SegmentRef]) -> None:
        """Refuse, before writing anything, outputs that exist (unless --force) or would collide."""
        paths = [self.path_for(s) for s in segments] if self.per_segment else [self.path_for(None)]
        named = [p for p in paths if p is not None]
        if len(set(named)) != len(named):
            raise ExportError("two segments have the same name; export them to separate directories")
        for p in named:
            if p.exists() and not self.force:
                raise ExportError(f"{p} exists; pass --force to replace it")


def export(walker: RecordWalker, segments: list[SegmentRef], fmt: str, out: str | None, *, force: bool = False,
           row_group: int = ROW_GROUP, progress: Progress | None = None) -> list[tuple[Path | None, int]]:
    """Export the walk's records; return (output path or None for stdout, records) for each output."""
    columns = _arrow() if fmt != "ndjson" else None
    if fmt != "ndjson" and columns is None:
        raise ExportError(f"--format {fmt} needs pyarrow: pip install 'telemetry-sink[export]' (or use "
                          f"--format ndjson)")
    targets = _Targets(fmt, out, force)
    targets.check(segments)
    walk = walker.walk(segments, final=True)
    # The columns are fixed once, from the export's first SAMPLE records (across segments, before
    # anything is written), so every row group and every file of the export share one schema.
    head: list[tuple[SegmentRef, list[bytes]]] = []
    plan = None
    if columns is not None:
        taken = 0
        for item in walk:
            head.append(item)
            taken += len(item[1])
            if taken >= SAMPLE:
                break
        first = [line for _, lines in head for line in lines][:SAMPLE]
        plan = columns.ColumnPlan.from_sample([r for r in map(_loads, first) if type(r) is dict])

    done: list[tuple[Path | None, int]] = []
    output: _Output | None = None
    pending: list[bytes] = []
    current: SegmentRef | None = None

    def finish(output: _Output) -> None:
        _flush(output, pending, row_group)
        output.close()
        done.append((output.path, output.records))

    try:
        for segment, lines in itertools.chain(head, walk):
            if segment != current:
                if progress is not None and current is not None:
                    progress.advance(0, current.size_now())
                if targets.per_segment and output is not None:
                    finish(output)
                    output = None
                current = segment
            if output is None:
                output = _Output(fmt, targets.path_for(segment), plan)
            pending += lines
            if progress is not None:
                progress.advance(len(lines), 0)
            if len(pending) >= row_group:
                _flush(output, pending, row_group, whole_only=True)
        if progress is not None and current is not None:
            progress.advance(0, current.size_now())
        if output is None and not targets.per_segment:
            output = _Output(fmt, targets.path_for(None), plan)  # nothing matched: an empty file says so
        if output is not None:
            finish(output)
            output = None
    finally:
        if output is not None:
            output.abort()
    return done


def _flush(output: _Output, pending: list[bytes], size: int, whole_only: bool = False) -> None:
    """Write `pending` a row group at a time (only whole row groups if `whole_only`), emptying it."""
    while len(pending) >= size or (pending and not whole_only):
        output.write(pending[:size])
        del pending[:size]


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def main(args: argparse.Namespace, walker: RecordWalker, segments: list[SegmentRef],
         warn: Callable[[str], None]) -> int:
    """Run export for the parsed arguments; one summary line on stderr; exit 1 if records did not decrypt."""
    # The walk allocates many small containers that never form cycles; the cyclic collector spent
    # about 8% of an export's CPU time (perf) finding none, so it is off while the export runs.
    gc.collect()
    gc.disable()
    try:
        with Progress("export", total_size(segments)) as progress:
            done = export(walker, segments, args.format, args.out, force=args.force,
                          row_group=args.row_group_size, progress=progress)
    finally:
        gc.enable()
    total = sum(n for _, n in done)
    where = "stdout" if args.out is None else (str(done[0][0]) if len(done) == 1 else f"{len(done)} files in "
                                               f"{args.out}")
    print(f"exported {total:,} records to {where}", file=sys.stderr)
    summary = walker.summary()
    if summary is not None:
        warn(summary)
        return 1
    return 0
