"""End to end against a real server: circuit breaker, result cache, coalescing of requests in flight."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import bridge_config, openai_backend, sample, socket_backend
from fakellm import Answer, Status, open_fake_llm, words
from host_nlp_bridge import bridge_for, plugin
from host_nlp_bridge.config import MessagesConfig

from host.testing import open_test_host

PLUGIN = ("nlp_bridge", plugin)
TEXTS = MessagesConfig()


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_backend()


@pytest.mark.anyio
async def test_circuit_opens_after_failures_then_probes_half_open(host_logs: Any) -> None:
    with trio.fail_after(600):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, max_attempts=1, breaker_failures=3, breaker_reset=30)
            async with open_test_host(PLUGIN, config=bridge_config({"main": backend})) as th:
                bridge = bridge_for(th.host)
                assert bridge is not None
                llm.then(Status(500), Status(500), Status(500))
                for i in range(3):
                    assert (await th.send(f"fail {i}", conversation_id=f"c{i}")).texts == [TEXTS.failure]
                assert bridge.backends["main"].breaker.state == "open"
                assert sample(th, "nlp_circuit_state", backend="main") == 2
                assert sample(th, "nlp_circuit_opened_total", backend="main") == 1

                # Open: refused at once, nothing sent.
                assert (await th.send("refused")).texts == [TEXTS.unavailable]
                assert len(llm.chat_requests()) == 3
                assert sample(th, "nlp_calls_total", backend="main", outcome="rejected") == 1

                # After breaker_reset one probe goes through; it fails: open again, timer restarted.
                await trio.sleep(31)
                llm.then(Status(500))
                assert (await th.send("probe 1")).texts == [TEXTS.failure]
                assert len(llm.chat_requests()) == 4
                assert (await th.send("still open")).texts == [TEXTS.unavailable]
                assert len(llm.chat_requests()) == 4

                # Next probe succeeds: closed, traffic flows.
                await trio.sleep(31)
                assert (await th.send("probe 2")).texts == ["You said: probe 2"]
                assert bridge.backends["main"].breaker.state == "closed"
                assert sample(th, "nlp_circuit_state", backend="main") == 0
                assert (await th.send("flowing")).texts == ["You said: flowing"]
    assert not host_logs.errors()
    warnings = host_logs.messages("WARNING")
    assert sum("circuit of backend main opened" in m for m in warnings) == 2


@pytest.mark.anyio
async def test_half_open_admits_a_single_probe(host_logs: Any) -> None:
    with trio.fail_after(600):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, max_attempts=1, breaker_failures=1, breaker_reset=10)
            config = bridge_config({"main": backend}, limits={"max_concurrency": 8})
            async with open_test_host(PLUGIN, config=config) as th:
                llm.then(Status(503))
                assert (await th.send("open it")).texts == [TEXTS.failure]
                await trio.sleep(11)
                # Three messages at once while half-open: one probe (slow, succeeds), two refused.
                llm.then(Answer(first_byte_delay=5))
                messages = [th.loopback.make_message(f"m{i}", conversation_id=f"c{i}", sender_id=f"u{i}") for i in range(3)]
                for message in messages:
                    assert th.loopback.try_send_message(message)
                await th.host.wait_idle()
                texts = sorted(th.loopback.replies_to(m.id)[0].text for m in messages)
                assert texts.count(TEXTS.unavailable) == 2
                assert len(llm.chat_requests()) == 2
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_breaker_open_on_primary_fails_over_without_calling_it(host_logs: Any) -> None:
    with trio.fail_after(600):
        async with open_fake_llm() as llm:
            backends = {
                "primary": openai_backend(llm.base_url, max_attempts=1, breaker_failures=1),
                "backup": {"type": "echo"},
            }
            async with open_test_host(PLUGIN, config=bridge_config(backends, fallback=["backup"])) as th:
                llm.then(Status(500))
                assert (await th.send("first")).texts == ["[echo] first"]
                assert (await th.send("second")).texts == ["[echo] second"]
                assert len(llm.chat_requests()) == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_stateless_route_answers_repeated_questions_from_the_cache() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            routes = [{"command": "/ask", "backend": "main", "stateless": True}]
            config = bridge_config({"main": openai_backend(llm.base_url, cache_ttl=60)}, routes=routes)
            async with open_test_host(PLUGIN, config=config) as th:
                first = await th.send("/ask What is  DingTalk?", conversation_id="a")
                again = await th.send("/ask what is dingtalk?", conversation_id="b")  # different case: a new question
                same = await th.send("/ask   What is DingTalk? ", conversation_id="c")  # same after normalising
                assert first.texts == ["You said: What is  DingTalk?"]
                assert same.texts == first.texts
                assert not same.deliveries[0].streamed  # a cache hit needs no stream
                assert len(llm.chat_requests()) == 2
                assert again.texts == ["You said: what is dingtalk?"]
                assert sample(th, "nlp_cache_hits_total") == 1
                assert sample(th, "nlp_cache_misses_total") == 2
                assert sample(th, "nlp_answers_total", outcome="cached") == 1
                # Expired after cache_ttl: asked again.
                await trio.sleep(61)
                await th.send("/ask What is DingTalk?", conversation_id="d")
                assert len(llm.chat_requests()) == 3


@pytest.mark.anyio
async def test_cache_is_off_by_default_for_conversations_with_memory() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            await th.send("hello", conversation_id="a")
            await th.send("hello", conversation_id="b")
            assert len(llm.chat_requests()) == 2
            assert sample(th, "nlp_cache_hits_total") == 0


@pytest.mark.anyio
async def test_cache_on_caches_conversations_with_memory_by_their_whole_context() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            config = bridge_config({"main": openai_backend(llm.base_url, cache="on")})
            async with open_test_host(PLUGIN, config=config) as th:
                await th.send("hello", conversation_id="a")
                await th.send("hello", conversation_id="b")  # same (empty) history: cached
                await th.send("hello", conversation_id="a")  # history differs now: not cached
                assert len(llm.chat_requests()) == 2
                assert sample(th, "nlp_cache_hits_total") == 1


@pytest.mark.anyio
async def test_failures_are_never_cached() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            routes = [{"command": "/ask", "backend": "main", "stateless": True}]
            config = bridge_config({"main": openai_backend(llm.base_url, max_attempts=1)}, routes=routes)
            async with open_test_host(PLUGIN, config=config) as th:
                llm.then(Status(500))
                assert (await th.send("/ask q")).texts == [TEXTS.failure]
                assert (await th.send("/ask q")).texts == ["You said: q"]
                assert len(llm.chat_requests()) == 2


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole-reply"])
@pytest.mark.anyio
async def test_identical_requests_in_flight_share_one_backend_call(stream: bool, host_logs: Any) -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            config = bridge_config({"main": openai_backend(llm.base_url)}, stream=stream)
            async with open_test_host(PLUGIN, config=config) as th:
                llm.default = Answer(first_byte_delay=3, chunk_delay=0.5)
                messages = [th.loopback.make_message("good morning", conversation_id=f"c{i}", sender_id=f"u{i}") for i in range(4)]
                for message in messages:
                    assert th.loopback.try_send_message(message)
                await th.host.wait_idle()
                assert len(llm.chat_requests()) == 1
                for message in messages:
                    [delivery] = th.loopback.replies_to(message.id)
                    assert delivery.text == "You said: good morning"
                    if stream:
                        assert delivery.chunks == words("You said: good morning")
                assert sample(th, "nlp_coalesced_total") == 3
                # Followers remember the answer in their own conversations.
                await th.send("and now?", conversation_id="c2", sender_id="u2")
                assert [m["role"] for m in llm.chat_requests()[1].messages] == ["system", "user", "assistant", "user"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_followers_of_a_broken_stream_get_the_incomplete_note(host_logs: Any) -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Answer(text="half of it", first_byte_delay=2, done=False))
            messages = [th.loopback.make_message("same", conversation_id=f"c{i}", sender_id=f"u{i}") for i in range(2)]
            for message in messages:
                assert th.loopback.try_send_message(message)
            await th.host.wait_idle()
            for message in messages:
                assert th.loopback.replies_to(message.id)[0].text == "half of it" + TEXTS.incomplete
            assert len(llm.chat_requests()) == 1
    assert not host_logs.errors()
