"""The emulator clock: trio's clock (virtual under ``MockClock``) plus a fault-controlled offset.

Every expiry (tickets, sessions, tokens, download URLs, QPS windows) is judged on ``now()``, so a
test on ``trio.testing.MockClock`` expires them by sleeping, and ``advance()`` (the clock fault)
expires them at once. Epoch milliseconds (``createAt``, frame ``time``) move with the same clock so
that ``sessionWebhookExpiredTime`` and the real expiry always agree.
"""

from __future__ import annotations

import time

import trio

__all__ = ["EmulatorClock"]


class EmulatorClock:
    def __init__(self) -> None:
        self._trio_start = trio.current_time()
        self._epoch_start = time.time()
        self.offset = 0.0

    def now(self) -> float:
        """Seconds on the emulator's monotonic clock."""
        return trio.current_time() + self.offset

    def epoch(self) -> float:
        """Seconds since the Unix epoch as the emulator sees it."""
        return self._epoch_start + (self.now() - self._trio_start)

    def epoch_ms(self) -> int:
        return int(self.epoch() * 1000)

    def advance(self, seconds: float) -> None:
        """Move the emulator clock forward (timers already sleeping are not affected)."""
        if seconds < 0:
            raise ValueError("the emulator clock only moves forward")
        self.offset += seconds
