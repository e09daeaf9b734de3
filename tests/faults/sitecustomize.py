"""Fault injection inside a real server process, for faults a test cannot produce on demand.

A test puts this directory on the server's PYTHONPATH; Python imports it at start-up. Nothing
happens unless the variables below are set, and then only while their trigger files exist:

  TS_FAULT_HOLD_FSYNC=PATH  while PATH exists, os.fsync blocks (a stalled disk); PATH.entered
                            is created when an fsync starts waiting.
  TS_FAULT_TEAR_WRITE=PATH  while PATH exists, the next write of a batch to a segment writes only
                            its first half, creates PATH.torn, and the process SIGKILLs itself.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

_hold = os.environ.get("TS_FAULT_HOLD_FSYNC")
_tear = os.environ.get("TS_FAULT_TEAR_WRITE")
_real_fsync = os.fsync
_real_write = os.write


def _held_fsync(fd: Any) -> None:
    if _hold and os.path.exists(_hold):
        open(_hold + ".entered", "w").close()
        for _ in range(60_000):  # at most ten minutes
            if not os.path.exists(_hold):
                break
            time.sleep(0.01)
    _real_fsync(fd)


def _tearing_write(fd: int, data: Any) -> int:
    if _tear and len(data) > 16 and os.path.exists(_tear):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith(".tslog"):
            _real_write(fd, bytes(data[: len(data) // 2]))
            open(_tear + ".torn", "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return _real_write(fd, data)


if _hold:
    os.fsync = _held_fsync
if _tear:
    os.write = _tearing_write
