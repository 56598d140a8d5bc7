"""The default setup (nothing configured: the echo backend), commands, and plugin-level behaviour."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from host_nlp_bridge import bridge_for, plugin
from host_nlp_bridge.config import MessagesConfig

from host import ImagePart, Media, TextPart
from host.errors import ConfigError
from host.testing import open_test_host

PLUGIN = ("nlp_bridge", plugin)
TEXTS = MessagesConfig()


@pytest.mark.anyio
async def test_echo_answers_when_nothing_is_configured_and_says_so(host_logs: Any) -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN) as th:
            result = await th.send("hello   there")
            [delivery] = result.deliveries
            assert delivery.text == "[echo] hello   there"
            # Streamed word by word: the same path an LLM answer takes.
            assert delivery.streamed and delivery.state == "finished"
            assert delivery.chunks == ["[echo] ", "hello   ", "there"]
    startup = [r for r in host_logs.records if r["level"] == "INFO" and r["message"].startswith("nlp_bridge")]
    assert len(startup) == 1
    assert "built-in echo backend answers" in startup[0]["message"]
    assert "NLP_BASE_URL" in startup[0]["message"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_echo_without_streaming_sends_one_reply() -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN, config={"nlp_bridge": {"stream": False, "reply_format": "text"}}) as th:
            result = await th.send("one piece")
            [delivery] = result.deliveries
            assert not delivery.streamed
            assert delivery.reply.kind == "text"
            assert delivery.text == "[echo] one piece"


@pytest.mark.anyio
async def test_reset_forgets_the_conversation() -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN) as th:
            bridge = bridge_for(th.host)
            assert bridge is not None
            await th.send("remember me", conversation_id="a")
            await th.send("and me", conversation_id="b")
            thread = bridge.memory.thread("loopback:single:a", "default")
            assert [m.content for m in thread.history(1000)] == ["remember me", "[echo] remember me"]
            result = await th.send("/RESET", conversation_id="a")
            assert result.texts == [TEXTS.reset]
            assert bridge.memory.thread("loopback:single:a", "default").history(1000) == []
            assert len(bridge.memory.thread("loopback:single:b", "default").history(1000)) == 2


@pytest.mark.anyio
async def test_message_without_text_gets_a_polite_reply() -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN) as th:
            message = th.loopback.make_message("")
            message.parts = [ImagePart(media=Media(download_code="abc"))]
            result = await th.send_message(message)
            assert result.texts == [TEXTS.non_text]


@pytest.mark.anyio
async def test_message_without_text_can_be_left_to_other_plugins() -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN, config={"nlp_bridge": {"messages": {"non_text": ""}}}) as th:
            message = th.loopback.make_message("")
            message.parts = [TextPart(text="   ")]
            result = await th.send_message(message)
            assert result.texts == []


@pytest.mark.anyio
async def test_group_replies_mention_the_sender_when_configured() -> None:
    with trio.fail_after(60):
        config = {"nlp_bridge": {"stream": False, "mention_sender": True}}
        async with open_test_host(PLUGIN, config=config) as th:
            group = await th.send("in a group", group=True)
            single = await th.send("one to one")
            assert group.deliveries[0].reply.mention_sender
            assert not single.deliveries[0].reply.mention_sender


@pytest.mark.anyio
async def test_custom_messages_are_used() -> None:
    with trio.fail_after(60):
        config = {"nlp_bridge": {"messages": {"reset": "好的，我们重新开始。"}}}
        async with open_test_host(PLUGIN, config=config) as th:
            assert (await th.send("/reset")).texts == ["好的，我们重新开始。"]


@pytest.mark.anyio
async def test_invalid_section_stops_the_host_with_a_clear_error() -> None:
    config = {"nlp_bridge": {"backends": {"main": {"type": "openai", "base_url": "localhost:8000"}}}}
    with pytest.raises(ConfigError, match=r"\[nlp_bridge\] backends\[\.\.\.\]: base_url: an openai backend needs"):
        async with open_test_host(PLUGIN, config=config):
            pass
    config = {"nlp_bridge": {"fallback": ["nope"]}}
    with pytest.raises(ConfigError, match=r"fallback\[0\]: no backend named 'nope' \(configured: echo\)"):
        async with open_test_host(PLUGIN, config=config):
            pass
    config = {"nlp_bridge": {"limits": {"queue_size": "many"}}}
    with pytest.raises(ConfigError, match=r"\[nlp_bridge\] limits.queue_size: Expected `int`, got `str`"):
        async with open_test_host(PLUGIN, config=config):
            pass


@pytest.mark.anyio
async def test_invalid_nlp_base_url_fails_the_plugin_loudly(monkeypatch: pytest.MonkeyPatch, host_logs: Any) -> None:
    monkeypatch.setenv("NLP_BASE_URL", "127.0.0.1:8000/v1")
    with trio.fail_after(60):
        async with open_test_host(PLUGIN) as th:
            record = th.host.plugins.records["nlp_bridge"]
            assert record.state == "failed"
            assert "NLP_BASE_URL: an openai backend needs an http:// or https:// URL" in (record.error or "")


@pytest.mark.anyio
async def test_secrets_stay_hidden_in_config_display(host_logs: Any) -> None:
    key = "sk-hidden-9a8b7c6d5e"
    config = {
        "nlp_bridge": {
            "backends": {"main": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": key, "model": "m"}}
        }
    }
    with trio.fail_after(60):
        async with open_test_host(PLUGIN, config=config) as th:
            shown = th.host.config.redacted()["nlp_bridge"]["backends"]["main"]
            assert shown["api_key"] == "**********"
            bridge = bridge_for(th.host)
            assert bridge is not None
            assert key not in repr(bridge.settings)
            assert key not in " ".join(bridge.describe())
    assert key not in host_logs.text()


@pytest.mark.anyio
async def test_on_shutdown_releases_the_bridge() -> None:
    with trio.fail_after(60):
        async with open_test_host(PLUGIN) as th:
            host = th.host
            assert bridge_for(host) is not None
    assert bridge_for(host) is None


@pytest.mark.anyio
async def test_a_bug_in_a_backend_is_logged_and_fails_over(host_logs: Any) -> None:
    config = {"nlp_bridge": {"backends": {"buggy": {"type": "echo"}}, "fallback": ["echo"]}}
    with trio.fail_after(60):
        async with open_test_host(PLUGIN, config=config) as th:
            bridge = bridge_for(th.host)
            assert bridge is not None

            async def broken(request: Any) -> Any:
                raise ZeroDivisionError("a bug")
                yield ""  # pragma: no cover - makes this an async generator

            bridge.backends["buggy"].backend.generate = broken  # type: ignore[method-assign]
            result = await th.send("still answered?")
            assert result.texts == ["[echo] still answered?"]
    [error] = host_logs.errors()
    assert "backend buggy raised unexpectedly" in error["message"]
    assert isinstance(error["exception"], ZeroDivisionError)
