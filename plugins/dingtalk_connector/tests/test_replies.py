"""Outbound replies through session webhooks, against the emulator's real sendBySession endpoint."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.errors import ReplyError
from host_dingtalk_connector.replies import reply_body
from streamkit import Recorder, dingtalk_config, open_host

from host.model import CardButton, Conversation, Reply

LIMIT = 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def test_reply_bodies() -> None:
    assert reply_body(Reply.text_("hi")) == {"msgtype": "text", "text": {"content": "hi"}}
    body = reply_body(Reply.markdown("# Build 42\n**passed**"))
    assert body == {"msgtype": "markdown", "markdown": {"title": "Build 42", "text": "# Build 42\n**passed**"}}
    one = reply_body(Reply.card("Release", "v1.2 ready", [CardButton("Open", "https://example.com")]))
    assert one["actionCard"] == {
        "title": "Release",
        "text": "v1.2 ready",
        "singleTitle": "Open",
        "singleURL": "https://example.com",
    }
    two = reply_body(Reply.card("Approve?", "...", [CardButton("Yes", "https://y"), CardButton("No", "https://n")]))
    assert two["actionCard"]["btns"] == [{"title": "Yes", "actionURL": "https://y"}, {"title": "No", "actionURL": "https://n"}]
    assert reply_body(Reply.card("T", "no buttons"))["msgtype"] == "markdown"


@pytest.mark.anyio
async def test_replies_streams_mentions_and_proactive_sends() -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
            connector = running.connector
            sent = await emu.send_user_message("hi", conversation_type="group")
            await emu.wait_for_ack(sent["messageId"])
            while not recorder.messages:
                await trio.sleep(0.005)
            (message,) = recorder.messages
            conversation = sent["conversationId"]

            mention = Reply.text_("done")
            mention.mention_sender = True
            await connector.deliver(message, mention)
            stream = await connector.open_stream(message)
            for chunk in ("Hello", ", ", "world"):
                await stream.append(chunk)
            await stream.finish()
            await stream.finish()  # ending twice sends nothing more
            failed = await connector.open_stream(message)
            await failed.append("partial")
            await failed.fail("\n(interrupted)")
            await connector.send(Conversation(id=conversation, type="group"), Reply.text_("proactive"))

            replies = await emu.wait_for_bot_message(conversation, 4)
            assert [r["text"] for r in replies] == ["@user0001 done", "Hello, world", "partial\n(interrupted)", "proactive"]
            assert replies[0]["at"]["atUserIds"] == ["user0001"]
            assert [r["msgtype"] for r in replies] == ["text", "markdown", "markdown", "text"]

            with pytest.raises(ReplyError, match="no recent session"):
                await connector.send(Conversation(id="cidUNKNOWN", type="group"), Reply.text_("x"))
            with pytest.raises(ReplyError, match="no recent session"):
                await connector.send(Conversation(id=conversation, type="group"), Reply.text_("x"), app_id="other")

            # DingTalk refusing an expired session is a ReplyError naming the errcode, not a crash.
            emu.faults.expire_sessions()
            message.context["session_webhook_expires_ms"] = None
            with pytest.raises(ReplyError, match="errcode"):
                await connector.deliver(message, Reply.text_("too late"))
            # Known to be expired locally: refused without a call.
            message.context["session_webhook_expires_ms"] = 1
            with pytest.raises(ReplyError, match="expired"):
                await connector.deliver(message, Reply.text_("too late"))
            message.context.pop("session_webhook")
            with pytest.raises(ReplyError, match="no session webhook"):
                await connector.deliver(message, Reply.text_("nowhere"))
            with pytest.raises(ReplyError, match="no session webhook"):
                await connector.open_stream(message)
