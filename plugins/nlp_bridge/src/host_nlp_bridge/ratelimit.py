"""The per-user rate limit: a token bucket per user, refilled continuously.

Each user may send ``burst`` messages at once, then ``per_minute`` messages per minute. A message
over the limit is answered at once with the ``rate_limited`` text (saying how long to wait) and never
reaches a backend. Buckets of users who have not written for a while are full again, so they are
simply dropped; at most ``max_users`` buckets are kept (least recently used dropped first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["UserRateLimiter"]


class UserRateLimiter:
    """Token buckets by user key. ``per_minute = 0`` disables the limit."""

    def __init__(
        self, *, per_minute: float, burst: int, clock: Callable[[], float], max_users: int = 100_000
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_users = max_users
        self._clock = clock
        # user -> (tokens left, time of the last update)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, user: str) -> float:
        """Take one message from ``user``'s bucket: 0.0 if allowed, else seconds until it would be."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(user, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        if tokens < self.burst:  # a full bucket is the same as no bucket
            self._buckets[user] = (tokens, now)
            if len(self._buckets) > self.max_users:
                self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
