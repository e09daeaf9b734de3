"""The segment writer's work on whole files: creating a segment durably, leaving nothing behind
when that fails, and retention, which deletes a series' oldest sealed segments (with their index)
beyond the size or age budget, never one that is not yet confirmed in object storage."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from . import segment_format
from .segment_format import fsync_dir, write_all
from .segment_index import remove_index

log = logging.getLogger("telemetry_sink.writer")


def create_segment(path: Path, header: bytes = segment_format.FILE_HEADER_BYTES) -> int:
    """Create `path` holding just the file header, durably, and return its fd (O_APPEND).

    On failure (a full disk at roll-over) no fd is left open and no header-only file is left
    behind to make every retry fail with FileExistsError. Should the unlink fail as well, the
    retry finds that header-only file (nothing of ours is in it) and starts it over.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, flags)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > segment_format.FILE_HEADER_SIZE:
            os.close(fd)
            raise FileExistsError(errno.EEXIST, "a segment with this name already holds data", str(path)) from None
        os.ftruncate(fd, 0)
    try:
        write_all(fd, header)
        os.fsync(fd)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return fd


def apply_retention(directory: Path, series: str, active: Path | None, budget_bytes: float, days: int,
                    may_delete: Callable[[Path], bool] | None) -> int:
    """Delete `series`' oldest sealed segments while the series is over `budget_bytes` (0: no size
    budget) or they are older than `days` (0: no age limit); stop at `active`. Returns how many."""
    mine = segment_format.series_segments(directory, series)
    sizes = {p: p.stat().st_size for p in mine}
    total = sum(sizes.values())
    cutoff = time.time() - days * 86400
    deleted = 0
    for path in mine:
        if path == active:
            break
        too_big = budget_bytes > 0 and total > budget_bytes
        too_old = days > 0 and path.stat().st_mtime < cutoff
        if not (too_big or too_old):
            break
        if may_delete is not None and not may_delete(path):
            continue  # not yet confirmed in object storage: kept, even past the budget
        path.unlink()
        remove_index(path)
        total -= sizes[path]
        deleted += 1
        reason = "over retention_bytes" if too_big else "older than retention_days"
        log.info("retention: deleted segment %s (%d bytes, %s)", path.name, sizes[path], reason,
                 extra={"event": "retention_delete", "segment": path.name, "bytes": sizes[path], "reason": reason})
    return deleted
