"""Full-jitter exponential backoff."""

from __future__ import annotations

import random

import pytest
from host_dingtalk_connector.backoff import Backoff


def test_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_full_jitter_spans_zero_to_ceiling() -> None:
    rng = random.Random(7)
    backoff = Backoff(base=1.0, cap=60.0, rng=rng.random)
    for failures in range(12):
        backoff.failures = failures
        ceiling = min(60.0, 2.0**failures)
        samples = []
        for _ in range(200):
            backoff.failures = failures
            samples.append(backoff.next_delay())
        assert all(0 <= s <= ceiling for s in samples)
        # Full jitter: the whole window is used, not just the top of it.
        assert min(samples) < ceiling * 0.1 and max(samples) > ceiling * 0.9


def test_reset_starts_over() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=lambda: 1.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_many_failures_do_not_overflow() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=lambda: 0.5)
    backoff.failures = 10_000
    assert backoff.next_delay() == 30.0


def test_invalid() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=5, cap=1)
