"""Unit tests: result cache, coalescing flights, conversation memory, per-user rate limit."""

from __future__ import annotations

import pytest
import trio
from host_nlp_bridge.cache import ResultCache, cache_key, normalise
from host_nlp_bridge.coalesce import Coalescer
from host_nlp_bridge.memory import ConversationMemory, estimate_tokens
from host_nlp_bridge.model import ChatMessage
from host_nlp_bridge.ratelimit import UserRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def msgs(*texts: str) -> list[ChatMessage]:
    return [ChatMessage("user", t) for t in texts]


def test_cache_key_normalises_whitespace_and_unicode_but_nothing_else() -> None:
    assert normalise("  Ｈｅｌｌｏ\t\n world  ") == "Hello world"
    base = cache_key("main", "m", {}, msgs("What is  X?"))
    assert cache_key("main", "m", {}, msgs(" What is X? ")) == base
    assert cache_key("main", "m", {}, msgs("what is x?")) != base
    assert cache_key("other", "m", {}, msgs("What is X?")) != base
    assert cache_key("main", "m2", {}, msgs("What is X?")) != base
    assert cache_key("main", "m", {"temperature": 1}, msgs("What is X?")) != base
    assert cache_key("main", "m", {}, [ChatMessage("system", "What is X?")]) != base


def test_cache_expires_entries_after_their_ttl() -> None:
    clock = FakeClock()
    cache = ResultCache(max_entries=10, max_chars=1000, clock=clock)
    cache.put("k", "answer", ttl=5)
    clock.now = 4.9
    assert cache.get("k") == "answer"
    clock.now = 5.0
    assert cache.get("k") is None
    assert len(cache) == 0 and cache.chars == 0


def test_cache_evicts_least_recently_used_by_count_and_by_size() -> None:
    clock = FakeClock()
    cache = ResultCache(max_entries=2, max_chars=10, clock=clock)
    cache.put("a", "1", 60)
    cache.put("b", "2", 60)
    assert cache.get("a") == "1"  # a is now the most recent
    cache.put("c", "3", 60)
    assert cache.get("b") is None and cache.get("a") == "1" and cache.get("c") == "3"
    cache.put("d", "x" * 9, 60)  # 9 chars + "3"... over 10 chars: evict until it fits
    assert cache.chars <= 10
    assert cache.get("d") == "x" * 9
    cache.put("huge", "y" * 11, 60)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and cache.get("d") == "x" * 9


@pytest.mark.anyio
async def test_flight_followers_replay_then_follow_live() -> None:
    coalescer = Coalescer()
    flight = coalescer.lead("k")
    flight.publish("Hel")
    received: list[list[str]] = [[], []]

    async def follow(i: int) -> None:
        joined = coalescer.join("k")
        assert joined is flight
        async for chunk in joined.follow():
            received[i].append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, 0)
        await trio.sleep(1)
        flight.publish("lo")
        nursery.start_soon(follow, 1)
        await trio.sleep(1)
        flight.finish("incomplete", " (cut)")
        coalescer.end(flight)
    assert received == [["Hel", "lo", " (cut)"], ["Hel", "lo", " (cut)"]]
    assert flight.followers == 2
    assert coalescer.join("k") is None and len(coalescer) == 0


def test_memory_keeps_max_turns_and_fits_history_in_max_tokens() -> None:
    clock = FakeClock()
    memory = ConversationMemory(max_turns=3, max_tokens=8, idle_ttl=60, max_conversations=10, clock=clock)
    thread = memory.thread("c", "r")
    for i in range(5):
        thread.remember(f"q{i}", f"a{i}")  # 1 + 1 estimated tokens per turn
    assert [m.content for m in thread.history(100)] == ["q2", "a2", "q3", "a3", "q4", "a4"]
    assert [m.role for m in thread.history(100)][:2] == ["user", "assistant"]
    thread.remember("a long question " * 4, "x")  # 17 + 1 tokens: alone it is over budget
    assert thread.history(8) == []  # the newest turn does not fit: nothing older is sent either
    assert len(thread.history(100)) == 6


def test_memory_forgets_idle_conversations_and_the_least_recently_used() -> None:
    clock = FakeClock()
    memory = ConversationMemory(max_turns=5, max_tokens=100, idle_ttl=60, max_conversations=2, clock=clock)
    memory.thread("a", "r").remember("q", "a")
    clock.now = 59
    assert len(memory.thread("a", "r").history(100)) == 2
    clock.now = 118
    assert len(memory.thread("a", "r").history(100)) == 2  # used at 59: still fresh
    clock.now = 180
    assert memory.thread("a", "r").history(100) == []  # idle for 60 s+: forgotten
    memory.thread("b", "r").remember("q", "a")
    memory.thread("c", "r").remember("q", "a")
    assert len(memory) == 2  # "a" (least recently used) went
    assert memory.forget("b") and not memory.forget("b")
    assert memory.thread("c", "r").history(100) != []


def test_memory_keeps_routes_apart_and_reset_forgets_all_routes() -> None:
    clock = FakeClock()
    memory = ConversationMemory(max_turns=5, max_tokens=100, idle_ttl=60, max_conversations=10, clock=clock)
    memory.thread("c", "default").remember("q", "a")
    assert memory.thread("c", "route0").history(100) == []
    memory.forget("c")
    assert memory.thread("c", "default").history(100) == []


def test_token_estimate_counts_cjk_characters_one_each() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("你好 world") == 2 + 2


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = UserRateLimiter(per_minute=6, burst=2, clock=clock)
    assert limiter.acquire("u") == 0
    assert limiter.acquire("u") == 0
    assert limiter.acquire("u") == pytest.approx(10)
    assert limiter.acquire("other") == 0
    clock.now = 5
    assert limiter.acquire("u") == pytest.approx(5)
    clock.now = 10
    assert limiter.acquire("u") == 0
    clock.now = 1000
    assert limiter.acquire("u") == 0
    assert limiter.acquire("u") == 0
    assert limiter.acquire("u") > 0  # refills only up to the burst


def test_rate_limiter_drops_full_buckets_and_is_bounded() -> None:
    clock = FakeClock()
    limiter = UserRateLimiter(per_minute=60, burst=1, clock=clock, max_users=3)
    for i in range(10):
        limiter.acquire(f"u{i}")
    assert len(limiter) == 3
    disabled = UserRateLimiter(per_minute=0, burst=1, clock=clock)
    assert all(disabled.acquire("u") == 0 for _ in range(100))
    assert len(disabled) == 0
