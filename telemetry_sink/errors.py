"""IngestError: why a request stored nothing (status, error code, detail, retry delay), and the
constructors for the refusals several layers share. Only the HTTP adapter turns these into
responses and formats `Retry-After`."""

from __future__ import annotations

import errno
from typing import Any

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITE_FAILED_RETRY_S = 2.0  # how soon to try again after the log could not be written
BUFFER_FULL_RETRY_S = 1.0


class IngestError(Exception):
    """A request that stores nothing: HTTP-ish status, error code, detail, the record `index` it
    names, `retry_after_s` (seconds a client should wait; None: don't say) and extra headers."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        index: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.index = index
        self.retry_after_s = retry_after_s
        self.headers: list[tuple[bytes, bytes]] = []  # extra response headers (e.g. WWW-Authenticate)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.error}
        if self.index is not None:
            out["index"] = self.index
        out["detail"] = self.detail
        return out


def invalid_record(index: int, detail: str) -> IngestError:
    return IngestError(422, "invalid_record", detail, index=index)


def shutting_down() -> IngestError:
    return IngestError(503, "shutting_down", "the server is shutting down")


def buffer_full() -> IngestError:
    return IngestError(503, "buffer_full", "the write buffer is full; retry later", retry_after_s=BUFFER_FULL_RETRY_S)


def storage_error(err: int | None, what: str) -> IngestError:
    """507 when the disk is full, else 503: the log cannot be written right now."""
    if err in _DISK_FULL:
        return IngestError(507, "insufficient_storage", f"the log disk is full ({what})",
                           retry_after_s=WRITE_FAILED_RETRY_S)
    return IngestError(503, "write_failed", f"the log cannot be written ({what})", retry_after_s=WRITE_FAILED_RETRY_S)
