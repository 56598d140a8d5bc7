"""The connector's outbound surface (deliver, open_stream, send) inside a real host, against the
emulator's real sendBySession and robot OpenAPIs."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.errors import OpenApiError, ReplyError
from host_dingtalk_connector.replies import webhook_body
from streamkit import Recorder, dingtalk_config, open_host

from host.model import CardButton, Conversation, Reply

LIMIT = 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def test_webhook_bodies() -> None:
    assert webhook_body(Reply.text_("hi")) == {"msgtype": "text", "text": {"content": "hi"}}
    body = webhook_body(Reply.markdown("# Build 42\n**passed**"))
    assert body == {
        "msgtype": "markdown",
        "markdown": {"title": "Build 42", "text": "# Build 42\n**passed**"},
    }
    one = webhook_body(
        Reply.card("Release", "v1.2 ready", [CardButton("Open", "https://example.com")])
    )
    assert one["actionCard"] == {
        "title": "Release",
        "text": "v1.2 ready",
        "singleTitle": "Open",
        "singleURL": "https://example.com",
    }
    two = webhook_body(
        Reply.card(
            "Approve?", "...", [CardButton("Yes", "https://y"), CardButton("No", "https://n")]
        )
    )
    assert two["actionCard"]["btns"] == [
        {"title": "Yes", "actionURL": "https://y"},
        {"title": "No", "actionURL": "https://n"},
    ]
    assert webhook_body(Reply.card("T", "no buttons"))["msgtype"] == "markdown"
    mention = webhook_body(Reply.text_("done"), mention="manager1234")
    assert mention == {
        "msgtype": "text",
        "text": {"content": "@manager1234 done"},
        "at": {"atUserIds": ["manager1234"]},
    }


@pytest.mark.anyio
@pytest.mark.parametrize("webhook_client", ["lean", "httpx"])
async def test_replies_streams_mentions_and_proactive_sends(webhook_client: str) -> None:
    recorder = Recorder(answer=False)
    config_extra = {"replies": {"webhook_client": webhook_client}}
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_host(dingtalk_config(emu, **config_extra), ("recorder", recorder)) as running,
        ):
            connector = running.connector
            assert (connector.outbound.webhook_http is None) == (webhook_client == "httpx")
            sent = await emu.send_user_message("hi", conversation_type="group")
            await emu.wait_for_ack(sent["messageId"])
            while not recorder.messages:
                await trio.sleep(0.005)
            (message,) = recorder.messages
            conversation = sent["conversationId"]

            mention = Reply.text_("done")
            mention.mention_sender = True
            await connector.deliver(message, mention)
            stream = await connector.open_stream(
                message
            )  # no card template: one message at the end
            for chunk in ("Hello", ", ", "world"):
                await stream.append(chunk)
            await stream.finish()
            await stream.finish()  # ending twice sends nothing more
            failed = await connector.open_stream(message)
            await failed.append("partial")
            await failed.fail("\n(interrupted)")
            await connector.send(
                Conversation(id=conversation, type="group"), Reply.text_("proactive")
            )

            replies = await emu.wait_for_bot_message(conversation, 4)
            assert [r["text"] for r in replies] == [
                "@user0001 done",
                "Hello, world",
                "partial\n(interrupted)",
                "proactive",
            ]
            assert replies[0]["at"]["atUserIds"] == ["user0001"]
            assert [r["msgtype"] for r in replies] == ["text", "markdown", "markdown", "sampleText"]
            assert [r["via"] for r in replies] == ["sessionWebhook"] * 3 + [
                "groupMessages"
            ]  # proactive: OpenAPI

            with pytest.raises(OpenApiError, match=r"invalid\.openConversationId"):
                await connector.send(Conversation(id="cidUNKNOWN", type="group"), Reply.text_("x"))
            with pytest.raises(ReplyError, match="no DingTalk app named 'other'"):
                await connector.send(
                    Conversation(id=conversation, type="group"), Reply.text_("x"), app_id="other"
                )

            # The session expired at DingTalk's side: the reply still arrives, through the OpenAPI.
            emu.faults.expire_sessions()
            await connector.deliver(message, Reply.text_("late answer"))
            late = (await emu.wait_for_bot_message(conversation, 5))[-1]
            assert (late["via"], late["text"]) == ("groupMessages", "late answer")
            # Without any session webhook, the OpenAPI answers too.
            message.context.pop("session_webhook")
            await connector.deliver(message, Reply.text_("no webhook"))
            assert (await emu.wait_for_bot_message(conversation, 6))[-1]["via"] == "groupMessages"
