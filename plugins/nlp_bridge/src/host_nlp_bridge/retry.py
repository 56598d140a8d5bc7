"""When to retry a failed backend call, and how long to wait first.

Only ``TransientBackendError`` is retried: timeouts, connection errors, HTTP 429 and 502/503/504.
The delay before retry ``n`` (1-based) is exponential, ``initial * 2**(n-1)`` capped at ``maximum``,
with "equal jitter" (a random point in the upper half) so that clients that failed together do not
retry together. A ``Retry-After`` from the server replaces the computed delay; one longer than
``retry_after_max`` is not waited for (the bridge fails over instead). The caller also refuses any
delay that would overrun the answer's overall deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from host_nlp_bridge.errors import BackendError, TransientBackendError

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff parameters of one backend."""

    max_attempts: int = 3
    initial: float = 0.5
    maximum: float = 8.0
    retry_after_max: float = 30.0
    multiplier: float = 2.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The jittered delay before retry number ``retry`` (1 for the first retry)."""
        base = min(self.maximum, self.initial * self.multiplier ** (retry - 1))
        return base / 2 + rng.uniform(0, base / 2)

    def delay_after(self, attempt: int, error: BackendError, rng: random.Random) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when ``error`` ends the retries.

        ``attempt`` is the number of the attempt that just failed (1 for the first).
        """
        if not isinstance(error, TransientBackendError) or attempt >= self.max_attempts:
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.retry_after_max else None
        return self.backoff(attempt, rng)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date. ``None`` if unusable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf are not delays
        return None
    return max(0.0, seconds)
