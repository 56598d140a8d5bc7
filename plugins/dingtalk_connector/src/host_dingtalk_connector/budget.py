"""A fair, adaptive token bucket: the per-app, per-API call budget below DingTalk's QPS limit.

DingTalk allows each app 20 calls per second per API (standard edition; a sliding 1 s window) and
answers the 21st with ``403 Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`` (reference 9.2). A
bucket of ``rate`` tokens per second holding at most ``burst`` lets through at most
``burst + rate`` calls in any one second, so the defaults stay below the limit by construction.

Because other processes may use the same app (a second host, a script), the bucket also adapts
(AIMD): a QpsLimit answer halves the rate (not below ``min_rate``) and pauses the bucket for
``pause`` seconds (DingTalk's advice: wait 1 s); every ``recovery_interval`` seconds without a
rejection the rate grows back by ``recovery_step`` up to the configured rate.

Waiters are served first come, first served; ``acquire(priority=True)`` (a card's final update)
goes ahead of every normal waiter, so finalizing a card is never starved by updates of others.
All times come from ``trio.current_time()`` (virtual under ``MockClock``).
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

import trio

__all__ = ["TokenBucket"]

_EPSILON = 1e-9


class TokenBucket:
    """``await acquire()`` waits for a token; ``on_rejected()`` / ``on_accepted()`` adapt the rate."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        min_rate: float = 1.0,
        pause: float = 1.0,
        recovery_interval: float = 5.0,
        recovery_step: float = 1.0,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.max_rate = rate
        self.rate = rate
        self.burst = burst
        self.min_rate = min(min_rate, rate)
        self.pause = pause
        self.recovery_interval = recovery_interval
        self.recovery_step = recovery_step
        self._tokens = float(burst)
        self._stamp = trio.current_time()
        self._paused_until = 0.0
        self._last_change = self._stamp
        self._tickets = itertools.count()
        self._priority: deque[int] = deque()
        self._normal: deque[int] = deque()
        self._wakeup = trio.Event()
        #: Tokens handed out and rejections seen, for statistics and tests.
        self.granted = 0
        self.rejections = 0

    # -- the rate ------------------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        start = max(self._stamp, self._paused_until)
        if now > start:
            self._tokens = min(float(self.burst), self._tokens + (now - start) * self.rate)
        self._stamp = max(self._stamp, now)

    def _recover(self, now: float) -> None:
        if self.rate < self.max_rate and now - self._last_change >= self.recovery_interval:
            steps = int((now - self._last_change) // self.recovery_interval)
            self.rate = min(self.max_rate, self.rate + steps * self.recovery_step)
            self._last_change = now

    def on_rejected(self) -> None:
        """DingTalk answered QpsLimit: halve the rate, empty the bucket and pause it."""
        now = trio.current_time()
        self._refill(now)
        self.rejections += 1
        self.rate = max(self.min_rate, self.rate / 2)
        self._tokens = min(self._tokens, 0.0)
        self._paused_until = max(self._paused_until, now + self.pause)
        self._last_change = now
        self._notify()

    def on_accepted(self) -> None:
        """A call within the budget succeeded: let the rate recover if it was lowered."""
        self._recover(trio.current_time())

    # -- waiting ---------------------------------------------------------------------------------------

    def _notify(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    def _wait_time(self, now: float) -> float:
        """Seconds until a token is available (0 when one is)."""
        self._refill(now)
        if now < self._paused_until:
            return self._paused_until - now + max(0.0, 1.0 - self._tokens) / self.rate
        # Refills are float sums: 0.9999999999999998 tokens is a whole token.
        if self._tokens >= 1.0 - _EPSILON:
            return 0.0
        # Never a wait shorter than the clock can represent (it would spin without time passing).
        return max((1.0 - self._tokens) / self.rate, 1e-6)

    async def acquire(self, *, priority: bool = False) -> None:
        """Wait for a token (FIFO; ``priority`` waiters first)."""
        ticket = next(self._tickets)
        queue = self._priority if priority else self._normal
        queue.append(ticket)
        if priority:
            self._notify()  # a normal waiter sleeping at the head must yield to us
        try:
            while True:
                head = self._priority[0] if self._priority else self._normal[0]
                if head == ticket:
                    now = trio.current_time()
                    self._recover(now)
                    wait = self._wait_time(now)
                    if wait <= 0:
                        self._tokens -= 1.0
                        self.granted += 1
                        return
                    wakeup = self._wakeup
                    with trio.move_on_after(wait):
                        await wakeup.wait()
                else:
                    await self._wakeup.wait()
        finally:
            queue.remove(ticket)
            self._notify()

    def statistics(self) -> dict[str, Any]:
        now = trio.current_time()
        self._refill(now)
        return {
            "rate": self.rate,
            "max_rate": self.max_rate,
            "tokens": round(self._tokens, 3),
            "paused_for": max(0.0, self._paused_until - now),
            "waiting": len(self._priority) + len(self._normal),
            "granted": self.granted,
            "rejections": self.rejections,
        }
