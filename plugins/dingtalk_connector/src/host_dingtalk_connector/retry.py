"""Retry policy of outbound calls (OpenAPIs, token, session webhook, file downloads).

Only errors classified as *transient* are retried: network errors and timeouts, HTTP 5xx and 429,
DingTalk's ``system.busy``/``system.error``, and 403 ``QpsLimit*`` (for which DingTalk's own advice
is "sleep 1 s": the delay is then at least ``qps_delay``). Delays are full-jitter exponential
(``backoff.Backoff``) and the whole series is bounded by ``deadline`` seconds, so a reply is never
held back for minutes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from host_dingtalk_connector.backoff import Backoff

__all__ = ["RetrySettings", "Retrying"]


class RetrySettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.retry]``: retries of transient failures of outbound calls."""

    #: Attempts per call, the first included (1 = no retry).
    attempts: int = 4
    #: First delay ceiling in seconds; doubles per retry (full jitter).
    base_delay: float = 0.5
    #: Largest delay between two attempts.
    max_delay: float = 8.0
    #: Smallest delay after a 403 QpsLimit answer (DingTalk advises waiting 1 s).
    qps_delay: float = 1.0
    #: All attempts of one call together stop after this many seconds.
    deadline: float = 30.0
    #: Timeout of one HTTP request (connect, read, write), seconds.
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts: must be at least 1")
        for name in ("base_delay", "max_delay", "deadline", "timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.qps_delay < 0:
            raise ValueError("qps_delay: must be >= 0")
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay: must be >= base_delay")


@dataclass
class Retrying:
    """The state of one call's retries: ``next_delay(kind)`` or ``None`` when it must give up.

    ``now`` is a clock in seconds (``trio.current_time`` in the connector, so tests run on virtual
    time).
    """

    settings: RetrySettings
    now: Callable[[], float]
    rng: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        self.attempt = 1
        self.started = self.now()
        self._backoff = Backoff(
            base=self.settings.base_delay, cap=self.settings.max_delay, rng=self.rng
        )

    def next_delay(self, *, qps: bool = False) -> float | None:
        """Delay before the next attempt, or ``None`` if attempts or the deadline are used up."""
        if self.attempt >= self.settings.attempts:
            return None
        delay = self._backoff.next_delay()
        if qps:
            delay = max(delay, self.settings.qps_delay)
        if self.now() + delay - self.started > self.settings.deadline:
            return None
        self.attempt += 1
        return delay
