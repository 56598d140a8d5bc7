"""Reconnect delays: exponential backoff with full jitter.

``delay(n) = uniform(0, min(cap, base * 2**n))`` for the n-th consecutive failure (n from 0), the
"full jitter" of the AWS architecture blog and discord.py: a fleet restarted together spreads its
reconnects over the whole window instead of stampeding the gateway in lockstep. The failure count
is reset only once a connection has stayed healthy for a while (``Backoff.reset`` is called by the
connection engine), so a connection that opens and immediately drops keeps backing off.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Full-jitter exponential backoff. ``rng`` returns a float in [0, 1) (injectable for tests)."""

    def __init__(self, *, base: float = 1.0, cap: float = 60.0, rng: Callable[[], float] = random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._rng = rng
        self.failures = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() on the exponent first keeps 2**n from growing without bound after many failures.
        exponent = min(self.failures, 62)
        return min(self.cap, self.base * (2.0**exponent))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = self._rng() * self.ceiling()
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Forget past failures (after a connection stayed healthy)."""
        self.failures = 0
