"""What `Client` and `AsyncClient` share around their locks: settings, the pipeline, the closed/failed state
and the checks a caller's call meets first."""

from __future__ import annotations

import atexit
import time
from typing import Any

from .errors import ClientClosedError, DeliveryTimeout, SenderFailedError
from .options import ClientOptions
from .pipeline import Pipeline, Stats, log, open_store


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class FrontEnd:
    """The state of one client; the subclasses add the lock, the sender and the public methods."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.options = ClientOptions(url=url, **options)
        self._verify = self.options.ssl_context()  # before the spool is locked: a bad certificate path fails here
        self._pipe = Pipeline(self.options, open_store(self.options))
        self._closed = False
        self._stopping = False
        self._fatal: BaseException | None = None
        atexit.register(self._at_exit)

    @property
    def stats(self) -> Stats:
        """Counters since the client was created."""
        return self._pipe.stats

    def _check_open(self, report: bool = True) -> None:
        """Raise if closed, if the sender failed, or (with `report`) the next refusal not yet raised."""
        if self._closed:
            raise ClientClosedError("client is closed")
        self._check_sender()
        if report:
            self._pipe.raise_error()

    def _check_sender(self) -> None:
        if self._fatal is not None:
            raise SenderFailedError(self._fatal, self._pipe.pending_records()) from self._fatal

    def _mark_closed(self) -> None:
        self._closed = True
        atexit.unregister(self._at_exit)

    def _timeout_error(self) -> DeliveryTimeout:
        spool = self.options.spool_dir
        return DeliveryTimeout(self._pipe.pending_records(), str(spool) if spool else None)

    def _at_exit(self) -> None:
        pending = self._pipe.pending_records()
        if pending:
            log.error("the process exits with %d records handed to a %s that was never closed: %s", pending,
                      type(self).__name__,
                      f"they stay in the spool {self.options.spool_dir}" if self.options.spool_dir else "lost")
