"""Progress of long offline work (verify, rotate-key, export, send) on stderr: records done, MB/s and
the time left, drawn with rich when stderr is a terminal and silent otherwise (pipes, logs, CI).

rich rather than tqdm: `top` draws its live table with rich already, so one library serves both.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO, Any


class Progress:
    """`with Progress("verify", total_bytes) as p: p.advance(records, nbytes)`; a no-op off a terminal."""

    def __init__(self, what: str, total_bytes: int | None, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._what = what
        self._total = total_bytes
        self._records = 0
        self._bar: Any = None
        self._task: Any = None

    @property
    def enabled(self) -> bool:
        return self._stream.isatty()

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TextColumn("{task.fields[records]:,} records"), TimeRemainingColumn(),
                        console=Console(file=self._stream), transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task(self._what, total=self._total, records=0)
        return self

    def advance(self, records: int, nbytes: int) -> None:
        """`records` more records (and `nbytes` more input bytes) are done."""
        self._records += records
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes, records=self._records)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)
            self._bar = None
