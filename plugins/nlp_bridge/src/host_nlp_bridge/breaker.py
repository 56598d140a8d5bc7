"""A circuit breaker per backend: stop calling a backend that keeps failing, probe it later.

States::

    closed ──(breaker_failures consecutive failed attempts)──▶ open
    open ──(breaker_reset seconds later, on the next call)──▶ half_open: one probe call goes through
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open (timer restarts)

While open, and while the half-open probe is out, calls are refused at once (the bridge fails over
to the next backend or apologises) instead of waiting on a sick backend. Failures that say nothing
about the backend's health (a 400 for a bad request, a cancelled call) are not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Consecutive-failure circuit breaker. ``clock`` returns seconds (trio's clock in the bridge)."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        reset_timeout: float,
        clock: Callable[[], float],
        on_change: Callable[[CircuitBreaker, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._on_change = on_change
        self.state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._probe_out = False

    def allow(self) -> bool:
        """May a call go through now? In half-open state this hands out the single probe."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self.opened_at < self.reset_timeout:
                return False
            self._set("half_open")
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def record_success(self) -> None:
        self.failures = 0
        self._probe_out = False
        if self.state != "closed":
            self._set("closed")

    def record_failure(self) -> None:
        self._probe_out = False
        self.failures += 1
        if self.state == "half_open" or (self.state == "closed" and self.failures >= self.failure_threshold):
            self.opened_at = self._clock()
            self._set("open")

    def release(self) -> None:
        """The call ended without telling anything (cancelled, or a client-side error)."""
        self._probe_out = False

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.opened_at + self.reset_timeout - self._clock())

    def _set(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        if self._on_change is not None and old != state:
            self._on_change(self, old, state)
