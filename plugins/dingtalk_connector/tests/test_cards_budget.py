"""The card/API call budget (``budget.TokenBucket``), on trio's virtual clock (no sockets here).

Checked against DingTalk's rule: at most 20 calls in any sliding 1 s window per app and API.
"""

from __future__ import annotations

import bisect

import pytest
import trio
import trio.lowlevel
from host_dingtalk_connector.budget import TokenBucket
from hypothesis import given, settings
from hypothesis import strategies as st


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most calls in any half-open window of ``window`` seconds (DingTalk's sliding window)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + window) - i)
    return best


async def grant_times(
    bucket: TokenBucket, callers: int, *, priority: set[int] | None = None
) -> list[tuple[int, float]]:
    granted: list[tuple[int, float]] = []

    async def call(i: int) -> None:
        await bucket.acquire(priority=i in (priority or set()))
        granted.append((i, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for i in range(callers):
            nursery.start_soon(call, i)
            await trio.lowlevel.checkpoint()  # start them in order: FIFO is then observable
    return granted


@pytest.mark.anyio
async def test_rate_and_burst_bound_every_one_second_window() -> None:
    with trio.fail_after(600):
        bucket = TokenBucket(8.0, 4.0)
        granted = await grant_times(bucket, 100)
        times = [t for _, t in granted]
        assert max_in_window(times) <= 8 + 4
        # Sustained: 100 calls take about (100 - burst) / rate seconds, not much more.
        assert (100 - 4) / 8 - 0.01 <= max(times) - min(times) <= (100 - 4) / 8 + 0.5


@pytest.mark.anyio
async def test_waiters_are_served_in_order_and_priority_goes_first() -> None:
    with trio.fail_after(600):
        bucket = TokenBucket(2.0, 1.0)
        granted = await grant_times(bucket, 10, priority={7})
        order = [i for i, _ in granted]
        # 0 takes the only token at once; 7 (a card's final update) overtakes everyone else waiting.
        assert order[:2] == [0, 7]
        assert order[2:] == [1, 2, 3, 4, 5, 6, 8, 9]


@pytest.mark.anyio
async def test_a_qps_rejection_halves_the_rate_pauses_and_then_recovers() -> None:
    with trio.fail_after(600):
        bucket = TokenBucket(
            10.0, 2.0, min_rate=1.0, pause=1.0, recovery_interval=5.0, recovery_step=1.0
        )
        await bucket.acquire()
        bucket.on_rejected()
        assert bucket.rate == 5.0
        start = trio.current_time()
        await bucket.acquire()
        assert trio.current_time() - start >= 1.0  # paused for DingTalk's "wait 1 s"
        bucket.on_rejected()
        bucket.on_rejected()
        bucket.on_rejected()
        assert bucket.rate == 1.0  # never below min_rate
        await trio.sleep(10.0)
        bucket.on_accepted()
        assert bucket.rate == 3.0  # two recovery intervals, one step each
        await trio.sleep(100.0)
        bucket.on_accepted()
        assert bucket.rate == 10.0  # back to, and not above, the configured rate
        assert bucket.rejections == 4


@pytest.mark.anyio
async def test_a_cancelled_waiter_does_not_block_the_queue() -> None:
    with trio.fail_after(600):
        bucket = TokenBucket(1.0, 1.0)
        await bucket.acquire()
        with trio.move_on_after(0.1):
            await bucket.acquire()  # gives up while at the head of the queue
        start = trio.current_time()
        await bucket.acquire()
        assert trio.current_time() - start <= 1.0


@settings(max_examples=30, deadline=None)
@given(
    rate=st.floats(min_value=1.0, max_value=15.0),
    burst=st.integers(min_value=1, max_value=5),
    arrivals=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=60),
)
def test_never_more_than_rate_plus_burst_in_any_second(
    rate: float, burst: int, arrivals: list[float]
) -> None:
    """Whatever the arrival pattern, the bucket never lets more than rate + burst calls into a 1 s window."""

    async def main() -> list[float]:
        bucket = TokenBucket(rate, float(burst))
        times: list[float] = []

        async def call(at: float) -> None:
            await trio.sleep(at)
            await bucket.acquire()
            times.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for at in arrivals:
                nursery.start_soon(call, at)
        return times

    times = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(times) == len(arrivals)
    assert max_in_window(times) <= int(rate + burst) + 1e-9
