"""End to end: host + loopback connector + bridge + a real OpenAI-compatible server on 127.0.0.1.

Happy paths, memory, configuration from the environment, and secrets. Fault injection is in
``test_faults.py``; caching, coalescing and breakers in ``test_resilience.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import API_KEY, bridge_config, openai_backend, sample, socket_backend
from fakellm import Answer, open_fake_llm, words
from host_nlp_bridge import bridge_for, plugin

from host.testing import open_test_host

PLUGIN = ("nlp_bridge", plugin)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_backend()


@pytest.mark.anyio
async def test_streams_tokens_as_they_arrive(host_logs: Any) -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            llm.default = Answer(chunk_delay=0.5)
            result = await th.send("hello bridge")

            [delivery] = result.deliveries
            assert delivery.streamed and delivery.state == "finished"
            assert delivery.chunks == words("You said: hello bridge")
            assert delivery.text == "You said: hello bridge"
            [request] = llm.chat_requests()
            assert request.body["model"] == "fake-model"
            assert request.body["stream"] is True
            assert request.body["stream_options"] == {"include_usage": True}
            assert request.headers["authorization"] == f"Bearer {API_KEY}"
            assert [m["role"] for m in request.messages] == ["system", "user"]
            assert request.messages[-1]["content"] == "hello bridge"
            assert sample(th, "nlp_calls_total", backend="main", outcome="success") == 1
            assert sample(th, "nlp_tokens_total", backend="main", kind="prompt") == 11
            assert sample(th, "nlp_tokens_total", backend="main", kind="completion") == 7
            assert sample(th, "nlp_time_to_first_token_seconds_count", backend="main") == 1
            assert sample(th, "nlp_answers_total", outcome="answered") == 1
    assert not host_logs.errors()
    assert API_KEY not in host_logs.text()


@pytest.mark.anyio
async def test_non_streaming_mode_answers_with_one_markdown_reply() -> None:
    with trio.fail_after(120):
        config = bridge_config({"main": openai_backend("")}, stream=False)
        async with open_fake_llm() as llm:
            config["nlp_bridge"]["backends"]["main"]["base_url"] = llm.base_url
            async with open_test_host(PLUGIN, config=config) as th:
                result = await th.send("plain please")
                [delivery] = result.deliveries
                assert not delivery.streamed
                assert delivery.reply.kind == "markdown"
                assert delivery.text == "You said: plain please"
                assert llm.chat_requests()[0].body["stream"] is False
                assert "stream_options" not in llm.chat_requests()[0].body


@pytest.mark.anyio
async def test_memory_carries_previous_turns_and_reset_clears_it() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            await th.send("my name is Ada")
            await th.send("what is my name?")
            second = llm.chat_requests()[1].messages
            assert [(m["role"], m["content"]) for m in second[1:]] == [
                ("user", "my name is Ada"),
                ("assistant", "You said: my name is Ada"),
                ("user", "what is my name?"),
            ]
            reset = await th.send("/reset")
            assert reset.texts == ["Done: I've forgotten our conversation. Let's start over."]
            await th.send("who am I?")
            assert [m["role"] for m in llm.chat_requests()[2].messages] == ["system", "user"]
            assert len(llm.chat_requests()) == 3  # /reset never reached the backend


@pytest.mark.anyio
async def test_group_and_one_to_one_memories_are_kept_apart() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            await th.send("secret in the group", conversation_id="c1", group=True, sender_name="Ann")
            await th.send("hello in private", conversation_id="c1", group=False)
            await th.send("and again in the group", conversation_id="c1", group=True, sender_name="Bob")
            private, group_again = llm.chat_requests()[1], llm.chat_requests()[2]
            assert [m["role"] for m in private.messages] == ["system", "user"]
            # Shared group memory names who said what.
            assert [m["content"] for m in group_again.messages[1:]] == [
                "Ann: secret in the group",
                "You said: Ann: secret in the group",
                "Bob: and again in the group",
            ]


@pytest.mark.anyio
async def test_environment_variables_alone_configure_the_backend(monkeypatch: pytest.MonkeyPatch, host_logs: Any) -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            monkeypatch.setenv("NLP_BASE_URL", llm.base_url)
            monkeypatch.setenv("NLP_API_KEY", API_KEY)
            llm.models = ["served-model", "other"]
            async with open_test_host(PLUGIN) as th:
                result = await th.send("hi env")
                assert result.texts == ["You said: hi env"]
                # No NLP_MODEL: the first model the server lists is used.
                assert [r.path for r in llm.requests] == ["/v1/models", "/v1/chat/completions"]
                assert llm.chat_requests()[0].body["model"] == "served-model"
                assert llm.chat_requests()[0].headers["authorization"] == f"Bearer {API_KEY}"
                await th.send("again")
                assert [r.path for r in llm.requests].count("/v1/models") == 1
    startup = [m for m in host_logs.messages("INFO") if m.startswith("nlp_bridge: backends")]
    assert len(startup) == 1 and "from NLP_BASE_URL, NLP_API_KEY" in startup[0]
    assert "echo" not in startup[0]
    assert API_KEY not in host_logs.text()


@pytest.mark.anyio
async def test_nlp_model_variable_picks_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            monkeypatch.setenv("NLP_BASE_URL", llm.base_url + "/")
            monkeypatch.setenv("NLP_MODEL", "qwen2.5-7b")
            async with open_test_host(PLUGIN) as th:
                await th.send("which model?")
                assert [r.path for r in llm.requests] == ["/v1/chat/completions"]
                assert llm.chat_requests()[0].body["model"] == "qwen2.5-7b"
                assert "authorization" not in llm.chat_requests()[0].headers


@pytest.mark.anyio
async def test_extra_params_and_backend_system_prompt_are_sent() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            backend = openai_backend(llm.base_url, params={"temperature": 0.1, "max_tokens": 64}, system_prompt="Be brief.")
            async with open_test_host(PLUGIN, config=bridge_config({"main": backend})) as th:
                await th.send("params?")
                body = llm.chat_requests()[0].body
                assert body["temperature"] == 0.1 and body["max_tokens"] == 64
                assert body["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.anyio
async def test_http_json_backend_behind_a_command_route() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            backends = {
                "main": openai_backend(llm.base_url),
                "kb": {
                    "type": "http_json",
                    "url": f"{llm.url}/inhouse",
                    "body": {"query": "${text}", "history": "${history}", "meta": {"who": "${user_name} (${user_id})"}},
                    "answer_path": "data.answer",
                    "secret_headers": {"X-Token": API_KEY},
                },
            }
            routes = [{"command": "/kb", "backend": "kb", "stateless": True}]
            async with open_test_host(PLUGIN, config=bridge_config(backends, routes=routes)) as th:
                result = await th.send("/KB  where is the VPN guide?", sender_name="Ann", sender_id="u-ann")
                assert result.texts == ["in-house: where is the VPN guide?"]
                assert not result.deliveries[0].streamed  # http_json cannot stream
                [request] = [r for r in llm.requests if r.path == "/inhouse"]
                assert request.body == {
                    "query": "where is the VPN guide?",
                    "history": [],
                    "meta": {"who": "Ann (loopback:u-ann)"},
                }
                assert request.headers["x-token"] == API_KEY
                plain = await th.send("not a command")
                assert plain.texts == ["You said: not a command"]
                usage = await th.send("/kb")
                assert usage.texts == ["Please write your message after /kb."]


@pytest.mark.anyio
async def test_conversation_route_sends_one_conversation_elsewhere() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm:
            backends = {"main": openai_backend(llm.base_url), "slowpoke": {"type": "echo"}}
            routes = [{"conversations": ["vip-room"], "backend": "slowpoke"}]
            async with open_test_host(PLUGIN, config=bridge_config(backends, routes=routes)) as th:
                vip = await th.send("hello", conversation_id="vip-room")
                other = await th.send("hello", conversation_id="lobby")
                assert vip.texts == ["[echo] hello"]
                assert other.texts == ["You said: hello"]
                assert len(llm.chat_requests()) == 1


@pytest.mark.anyio
async def test_bridge_statistics_after_traffic() -> None:
    with trio.fail_after(120):
        async with open_fake_llm() as llm, open_test_host(PLUGIN, config=bridge_config({"main": openai_backend(llm.base_url)})) as th:
            await th.send("one")
            bridge = bridge_for(th.host)
            assert bridge is not None
            stats = bridge.statistics()
            assert stats["waiting"] == 0 and stats["in_flight"] == 0 and stats["flights"] == 0
            assert stats["conversations_busy"] == 0
            assert stats["memory_conversations"] == 1
            assert stats["breakers"] == {"main": "closed", "echo": "closed"}
            assert sample(th, "nlp_queue_depth") == 0
            assert sample(th, "nlp_queue_wait_seconds_count") == 1
