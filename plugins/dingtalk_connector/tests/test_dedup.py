"""DedupCache: TTL, bound, namespaces; and the per-app scope under virtual time."""

from __future__ import annotations

import pytest
import trio
from host_dingtalk_connector.dedup import DedupCache
from hypothesis import given, settings
from hypothesis import strategies as st


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_remembers_until_ttl() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl=600, max_entries=10, clock=clock)
    cache.add("msg", "a")
    clock.now = 599.9
    assert cache.seen("msg", "a")
    clock.now = 600.0
    assert not cache.seen("msg", "a")
    assert len(cache) == 0


def test_namespaces_are_separate() -> None:
    cache = DedupCache(ttl=600, clock=FakeClock())
    cache.add("frame", "x")
    assert cache.seen("frame", "x")
    assert not cache.seen("msg", "x")


def test_bounded_evicts_oldest() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl=600, max_entries=3, clock=clock)
    for key in "abcd":
        cache.add("msg", key)
    assert len(cache) == 3
    assert not cache.seen("msg", "a")
    assert all(cache.seen("msg", k) for k in "bcd")
    assert cache.statistics() == {"entries": 3, "evicted": 1}


def test_re_adding_refreshes_the_ttl() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl=600, clock=clock)
    cache.add("msg", "a")
    clock.now = 500
    cache.add("msg", "a")
    clock.now = 1000
    assert cache.seen("msg", "a")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        DedupCache(ttl=0)
    with pytest.raises(ValueError):
        DedupCache(max_entries=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "seen"]), st.integers(0, 30), st.floats(0, 50)), max_size=200))
def test_matches_a_naive_model(ops: list[tuple[str, int, float]]) -> None:
    """Whatever the schedule, ``seen`` answers exactly like a dict of expiry times would."""
    clock = FakeClock()
    cache = DedupCache(ttl=100, max_entries=1000, clock=clock)
    model: dict[str, float] = {}
    for op, key, step in ops:
        clock.now += step
        if op == "add":
            cache.add("k", str(key))
            model[str(key)] = clock.now + 100
        else:
            assert cache.seen("k", str(key)) == (model.get(str(key), -1) > clock.now)


@pytest.mark.anyio
async def test_default_clock_is_trio_virtual_time() -> None:
    cache = DedupCache(ttl=600)
    cache.add("msg", "a")
    await trio.sleep(599)
    assert cache.seen("msg", "a")
    await trio.sleep(2)
    assert not cache.seen("msg", "a")
