"""Fault injection against real servers on 127.0.0.1: every fault ends in an answer or an apology.

Faults: slow first byte, stall mid-stream, 429 with Retry-After, 500, 502/503, malformed SSE, a
stream ending without [DONE], a connection cut mid-stream, invalid JSON, connection refused, a
backend slower than the host's own timeout. No exception ever reaches the host (no ERROR log).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
from conftest import bridge_config, openai_backend, sample, socket_backend
from fakellm import (
    Answer,
    InvalidJson,
    Malformed,
    Stall,
    Status,
    open_cutting_server,
    open_fake_llm,
)
from host_nlp_bridge import bridge_for, plugin
from host_nlp_bridge.config import MessagesConfig

from host.testing import open_test_host

PLUGIN = ("nlp_bridge", plugin)
TEXTS = MessagesConfig()


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_backend()


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
async def test_slow_first_byte_times_out_and_the_retry_answers(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url, read_timeout=5)})) as th:
            llm.then(Answer(first_byte_delay=600))
            result = await th.send("are you there?")
            assert result.texts == ["You said: are you there?"]
            assert len(llm.chat_requests()) == 2
            assert sample(th, "nlp_retries_total", backend="main", reason="timeout") == 1
            assert sample(th, "nlp_calls_total", backend="main", outcome="success") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_slow_first_byte_on_every_attempt_ends_in_a_timeout_apology(host_logs: Any) -> None:
    with trio.fail_after(600):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, read_timeout=5, max_attempts=3)
            async with open_test_host(PLUGIN, config=bridge_config({"main": backend})) as th:
                llm.default = Answer(first_byte_delay=600)
                result = await th.send("hello?")
                assert result.texts == [TEXTS.timeout]
                assert len(llm.chat_requests()) == 3
                assert sample(th, "nlp_calls_total", backend="main", outcome="timeout") == 1
                assert sample(th, "nlp_answers_total", outcome="apology") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_stall_mid_stream_ends_with_the_partial_answer_and_a_note(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url, read_timeout=5)})) as th:
            llm.then(Stall(["The answer", " is"]))
            result = await th.send("tell me")
            [delivery] = result.deliveries
            assert delivery.chunks == ["The answer", " is", TEXTS.incomplete]
            assert delivery.state == "finished"
            assert len(llm.chat_requests()) == 1  # text already shown: never retried
            assert sample(th, "nlp_calls_total", backend="main", outcome="incomplete") == 1
            assert sample(th, "nlp_answers_total", outcome="incomplete") == 1
            # An incomplete answer is not remembered.
            await th.send("and?")
            assert [m["role"] for m in llm.chat_requests()[1].messages] == ["system", "user"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_429_retry_after_is_honoured(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Status(429, "slow down", {"Retry-After": "7"}))
            result = await th.send("busy?")
            assert result.texts == ["You said: busy?"]
            first, second = llm.chat_requests()
            assert second.at - first.at >= 7  # virtual time: waited as told, not the 1 s backoff
            assert sample(th, "nlp_retries_total", backend="main", reason="rate_limited") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_429_with_a_retry_after_too_long_fails_over_at_once(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backends = {
                "main": openai_backend(llm.base_url, retry_after_max=30),
                "inhouse": {"type": "http_json", "url": f"{llm.url}/inhouse", "answer_path": "data.answer"},
            }
            async with open_test_host(PLUGIN, config=bridge_config(backends, fallback=["inhouse"])) as th:
                llm.then(Status(429, headers={"Retry-After": "3600"}))
                start = trio.current_time()
                result = await th.send("quick")
                assert result.texts == ["in-house: quick"]
                assert trio.current_time() - start < 3600
                assert [r.path for r in llm.requests] == ["/v1/chat/completions", "/inhouse"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_500_is_not_retried_and_the_user_gets_an_apology(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Status(500, "internal error"))
            result = await th.send("break")
            assert result.texts == [TEXTS.failure]
            assert len(llm.chat_requests()) == 1
            assert sample(th, "nlp_calls_total", backend="main", outcome="error") == 1
    assert not host_logs.errors()
    assert any("HTTP 500: internal error" in m for m in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_502_and_503_are_retried_with_backoff(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Status(502), Status(503))
            result = await th.send("third time lucky")
            assert result.texts == ["You said: third time lucky"]
            at = [r.at for r in llm.chat_requests()]
            assert len(at) == 3
            # Equal jitter: retry n waits between half and all of 1 s * 2**(n-1).
            assert 0.5 <= at[1] - at[0] <= 1.0
            assert 1.0 <= at[2] - at[1] <= 2.0
            assert sample(th, "nlp_retries_total", backend="main", reason="unavailable") == 2
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_4xx_is_neither_retried_nor_counted_against_the_backend(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, breaker_failures=1)
            async with open_test_host(PLUGIN, config=bridge_config({"main": backend})) as th:
                llm.then(Status(400, "context too long"))
                assert (await th.send("x" * 50)).texts == [TEXTS.failure]
                # One failure would have opened the breaker; a 400 did not.
                assert (await th.send("short")).texts == ["You said: short"]
                assert len(llm.chat_requests()) == 2
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_malformed_sse_before_any_text_is_an_apology(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Malformed(b"data: {this is not json\n\n"))
            result = await th.send("hi")
            assert result.deliveries[0].chunks == [TEXTS.failure]
            assert len(llm.chat_requests()) == 1  # a malformed answer is not retried
    assert not host_logs.errors()
    assert any("malformed SSE data" in m for m in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_malformed_sse_mid_stream_keeps_what_was_received(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Malformed(b'data: {"choices": "wrong shape"}\n\n', before=["Half", " an answer"]))
            result = await th.send("hi")
            assert result.deliveries[0].chunks == ["Half", " an answer", TEXTS.incomplete]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_stream_ending_without_done_is_incomplete(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.then(Answer(text="cut short", done=False))
            result = await th.send("hi")
            assert result.texts == ["cut short" + TEXTS.incomplete]
    assert not host_logs.errors()


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-body-cut", "connection-close-without-done"])
@pytest.mark.anyio
async def test_connection_cut_mid_stream_keeps_what_was_received(chunked: bool, host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_cutting_server(["Partial", " words"], chunked=chunked) as server:
            backend = openai_backend(f"{server.url}/v1")
            async with open_test_host(PLUGIN, config=bridge_config({"main": backend})) as th:
                result = await th.send("hi")
                [delivery] = result.deliveries
                assert delivery.chunks == ["Partial", " words", TEXTS.incomplete]
                assert delivery.state == "finished"
                assert server.connections == 1
                assert sample(th, "nlp_calls_total", backend="main", outcome="incomplete") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_invalid_json_answer_is_an_apology(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            config = bridge_config({"main": openai_backend(llm.base_url)}, stream=False)
            async with open_test_host(PLUGIN, config=config) as th:
                llm.then(InvalidJson())
                result = await th.send("json please")
                assert result.texts == [TEXTS.failure]
                assert len(llm.chat_requests()) == 1
    assert not host_logs.errors()
    assert any("invalid JSON response" in m for m in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_http_json_invalid_json_and_missing_answer_path_are_apologies(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backends = {"kb": {"type": "http_json", "url": f"{llm.url}/inhouse", "answer_path": "data.answer"}}
            async with open_test_host(PLUGIN, config=bridge_config(backends)) as th:
                llm.then(InvalidJson(b"<html>oops</html>"))
                assert (await th.send("one")).texts == [TEXTS.failure]
                llm.then(Answer(text="ok"))
                assert (await th.send("two")).texts == ["ok"]
            backends["kb"]["answer_path"] = "data.missing.0"
            async with open_test_host(PLUGIN, config=bridge_config(backends)) as th:
                assert (await th.send("three")).texts == [TEXTS.failure]
    assert not host_logs.errors()
    assert any("answer_path 'data.missing.0': nothing at 'data.missing'" in m for m in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_unreachable_backend_fails_over_to_the_next(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backends = {
                "primary": openai_backend(f"http://127.0.0.1:{closed_port()}/v1", max_attempts=2),
                "secondary": openai_backend(llm.base_url),
            }
            async with open_test_host(PLUGIN, config=bridge_config(backends, fallback=["secondary"])) as th:
                result = await th.send("anyone?")
                assert result.texts == ["You said: anyone?"]
                assert sample(th, "nlp_retries_total", backend="primary", reason="unavailable") == 1
                assert sample(th, "nlp_calls_total", backend="primary", outcome="error") == 1
                assert sample(th, "nlp_calls_total", backend="secondary", outcome="success") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_answer_arrives_before_the_host_timeout_cuts_it(host_logs: Any) -> None:
    """Non-streaming answers live inside the host's on_message timeout: the bridge apologises first."""
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, read_timeout=60, total_timeout=120)
            config = bridge_config({"main": backend}, host={"timeouts": {"on_message": 10}}, stream=False)
            async with open_test_host(PLUGIN, config=config) as th:
                llm.default = Answer(first_byte_delay=3600)
                result = await th.send("slow one")
                assert result.texts == [TEXTS.timeout]  # ours, not the host's generic apology
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_stream_cut_by_the_host_stream_timeout_is_finalized(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, read_timeout=600, total_timeout=600)
            config = bridge_config({"main": backend}, host={"stream_timeout": 20}, answer_timeout=600)
            async with open_test_host(PLUGIN, config=config) as th:
                llm.then(Stall(["Thinking"]))
                result = await th.send("long one")
                [delivery] = result.deliveries
                # The bridge keeps within stream_timeout (minus a margin) and says the answer is incomplete.
                assert delivery.chunks == ["Thinking", TEXTS.incomplete]
                assert delivery.state == "finished"
                assert th.host.statistics()["pending"] == 0
                assert (await th.send("next")).texts == ["You said: next"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_shutdown_mid_stream_finalizes_the_reply_and_frees_everything(host_logs: Any) -> None:
    with trio.fail_after(300):
        async with open_fake_llm() as llm:
            config = bridge_config({"main": openai_backend(llm.base_url, read_timeout=600)}, host={"shutdown_timeout": 2})
            async with open_test_host(PLUGIN, config=config) as th:
                bridge = bridge_for(th.host)
                assert bridge is not None
                llm.then(Stall(["Working on", " it"]))
                message = th.loopback.make_message("long task")
                assert th.loopback.try_send_message(message)
                while not th.loopback.deliveries or len(th.loopback.deliveries[0].chunks) < 2:
                    await trio.sleep(0.5)
            [delivery] = th.loopback.replies_to(message.id)
            assert delivery.state == "failed"  # finalized by the host as interrupted, not left open
            assert delivery.text.startswith("Working on it")
            stats = bridge.statistics()
            assert (stats["waiting"], stats["in_flight"], stats["flights"], stats["conversations_busy"]) == (0, 0, 0, 0)
            assert stats["breakers"]["main"] == "closed"
    assert not [r for r in host_logs.errors() if "nlp_bridge" in r["message"]]
