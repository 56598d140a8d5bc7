"""Unit tests: the circuit breaker's state machine, the retry policy and Retry-After parsing."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from host_nlp_bridge.breaker import CircuitBreaker
from host_nlp_bridge.errors import (
    BackendHTTPError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
    BadResponse,
)
from host_nlp_bridge.retry import RetryPolicy, parse_retry_after


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_breaker(clock: FakeClock, changes: list[tuple[str, str]] | None = None) -> CircuitBreaker:
    def on_change(_breaker: CircuitBreaker, old: str, new: str) -> None:
        if changes is not None:
            changes.append((old, new))

    return CircuitBreaker("b", failure_threshold=3, reset_timeout=10, clock=clock, on_change=on_change)


def test_breaker_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.retry_in() == 10


def test_breaker_half_open_lets_one_probe_through_then_closes_on_success() -> None:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    breaker = make_breaker(clock, changes)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open"
    assert not breaker.allow()  # a second caller while the probe is out
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_breaker_failed_probe_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 5
    assert not breaker.allow()
    assert breaker.retry_in() == 5


def test_breaker_released_probe_can_be_taken_again() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(3):
        breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.release()  # the probe was cancelled: it told us nothing
    assert breaker.state == "half_open"
    assert breaker.allow()


def test_backoff_is_exponential_with_equal_jitter_and_capped() -> None:
    policy = RetryPolicy(max_attempts=10, initial=0.5, maximum=8.0)
    rng = random.Random(7)
    for retry, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (9, 8.0)]:
        for _ in range(50):
            delay = policy.backoff(retry, rng)
            assert base / 2 <= delay <= base
    spread = {round(policy.backoff(3, rng), 6) for _ in range(20)}
    assert len(spread) > 10  # jittered, not fixed


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (BackendTimeout("b", "reading timed out"), True),
        (BackendUnavailable("b", "HTTP 503"), True),
        (BackendRateLimited("b", "HTTP 429"), True),
        (BackendHTTPError("b", 500, "boom"), False),
        (BackendHTTPError("b", 401, "bad key"), False),
        (BadResponse("b", "invalid JSON"), False),
    ],
)
def test_only_transient_errors_are_retried(error: Exception, retried: bool) -> None:
    policy = RetryPolicy(max_attempts=3)
    delay = policy.delay_after(1, error, random.Random(1))  # type: ignore[arg-type]
    assert (delay is not None) is retried


def test_retries_stop_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    error = BackendTimeout("b", "x")
    rng = random.Random(1)
    assert policy.delay_after(2, error, rng) is not None
    assert policy.delay_after(3, error, rng) is None


def test_retry_after_replaces_backoff_unless_too_long() -> None:
    policy = RetryPolicy(max_attempts=5, retry_after_max=30)
    rng = random.Random(1)
    assert policy.delay_after(1, BackendRateLimited("b", "429", retry_after=12), rng) == 12
    assert policy.delay_after(1, BackendUnavailable("b", "503", retry_after=0), rng) == 0
    assert policy.delay_after(1, BackendRateLimited("b", "429", retry_after=31), rng) is None


def test_4xx_does_not_count_against_the_backend_but_5xx_does() -> None:
    assert not BackendHTTPError("b", 400, "").counts_against_backend
    assert BackendHTTPError("b", 500, "").counts_against_backend
    assert BackendTimeout("b", "").counts_against_backend


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0
    for bad in (None, "", "soon", "nan", "inf", "Wed, 99 Foo 2025"):
        assert parse_retry_after(bad, now=now) is None
