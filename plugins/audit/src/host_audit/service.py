"""The audit log as the plugin runs it inside the host's event loop.

* ``open``/``close`` run the blocking work (scanning, fsync) in a worker thread
  (``trio.to_thread.run_sync``);
* ``append``/``append_nowait`` write on the event loop (one ``write()``, microseconds); when a
  checkpoint or a new segment was written, or in ``fsync = "strict"`` mode, the fsync runs in a
  worker thread (``append`` awaits it, ``append_nowait`` returns it to be awaited);
* a ticker thread owned by the service writes ``time`` checkpoints while the log is idle (so the
  tail gets anchored within ``checkpoint_every_seconds`` even if nothing else is appended) and runs
  retention every ``retention_check_seconds``. It is started by ``open`` and joined by ``close``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Awaitable, Callable

import trio

from host.logs import logger
from host.model import AuditEntry, now_ms
from host_audit.errors import LogClosedError
from host_audit.log import AuditLog
from host_audit.settings import LogSettings

__all__ = ["AuditService"]


class AuditService:
    """Owns one ``AuditLog`` and its ticker thread for the lifetime of a host."""

    def __init__(self, settings: LogSettings, *, clock: Callable[[], int] = now_ms) -> None:
        self.settings = settings
        self.log: AuditLog | None = None
        self._clock = clock
        self._ticker: _Ticker | None = None

    async def open(self) -> AuditLog:
        """Open the log and apply retention (blocking work in a worker thread), start the ticker."""
        log = await trio.to_thread.run_sync(functools.partial(AuditLog.open, self.settings, clock=self._clock))
        try:
            await trio.to_thread.run_sync(log.expire)
        except Exception as exc:  # retention failing must not stop auditing
            logger.opt(exception=exc).error("audit: retention failed at startup: {!r}", exc)
        self.log = log
        self._ticker = _Ticker(log, self.settings)
        self._ticker.start()
        return log

    def append_nowait(self, entry: AuditEntry) -> Awaitable[None] | None:
        """Append ``entry`` now; returns the fsync still to await (in a worker thread), if any.

        The fsync is due in ``strict`` mode, and after a checkpoint or a new segment otherwise.
        Returning it instead of being a coroutine lets the common case (nothing to await) skip
        the cost of a coroutine and a cancel scope in the host's dispatcher. Raises ``AuditError``.
        """
        log = self.log
        if log is None or log.closed:
            raise LogClosedError("the audit log is not open (did its startup fail? see the error logged then)")
        log.append(entry)
        if self.settings.fsync == "strict" or log.sync_wanted:
            return trio.to_thread.run_sync(log.sync)
        return None

    async def append(self, entry: AuditEntry) -> None:
        """Append ``entry`` and wait for any fsync it needs. Raises ``AuditError`` subclasses."""
        pending = self.append_nowait(entry)
        if pending is not None:
            await pending

    async def close(self) -> None:
        """Stop the ticker, write the final checkpoint, fsync and close. Idempotent."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.stop()
            await trio.to_thread.run_sync(ticker.join)
        if self.log is not None:
            await trio.to_thread.run_sync(self.log.close)


class _Ticker(threading.Thread):
    """Periodic checkpoints and retention, off the event loop. Never raises; logs failures."""

    def __init__(self, log: AuditLog, settings: LogSettings) -> None:
        super().__init__(name="host-audit-ticker", daemon=True)  # never keeps a dying process alive
        self._log = log
        self._stopping = threading.Event()
        # Wake often enough that a due checkpoint is at most a quarter interval late.
        self._interval = min(max(settings.checkpoint_every_seconds / 4, 0.05), 5.0)
        self._retention_every = settings.retention_check_seconds
        self._retention = settings.retention_days > 0

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        next_retention = time.monotonic() + self._retention_every
        while not self._stopping.wait(self._interval):
            try:
                if self._log.checkpoint_if_due():
                    self._log.sync()
                if self._retention and time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self._retention_every
                    self._log.expire()
            except Exception as exc:
                logger.opt(exception=exc).error("audit: periodic checkpoint or retention failed: {!r}", exc)
