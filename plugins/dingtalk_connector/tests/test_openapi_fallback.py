"""Whole replies: session webhook first, robot OpenAPI when the session expired or is refused.

Messages are real emulator messages (real session webhooks), converted as the connector does.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.errors import OpenApiError, ReplyError
from host_dingtalk_connector.replies import ReplySettings
from outkit import app_for, metric, open_outbound, user_message

from host.metrics import Metrics
from host.model import CardButton, Conversation, Reply

LIMIT = 30
DELIVERIES = "host_dingtalk_deliveries_total"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


@pytest.mark.anyio
async def test_replies_go_through_the_session_webhook_with_mentions_in_groups() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu, open_outbound(emu, metrics=metrics) as outbound:
            message, sent = await user_message(emu, "hi", conversation_type="group")
            mention = Reply.text_("done")
            mention.mention_sender = True
            await outbound.deliver(message, mention)
            await outbound.deliver(
                message, Reply.card("Release", "v1.2 ready", [CardButton("Open", "https://x")])
            )
            await outbound.deliver(message, Reply.markdown("**plain**"))
            replies = emu.bot_messages(sent["conversationId"])
            assert [(r["via"], r["msgtype"]) for r in replies] == [
                ("sessionWebhook", "text"), ("sessionWebhook", "actionCard"), ("sessionWebhook", "markdown"),
            ]  # fmt: skip
            assert replies[0]["text"] == "@user0001 done" and replies[0]["at"]["atUserIds"] == [
                "user0001"
            ]
            assert not replies[2]["at"]
            assert (
                metric(metrics, DELIVERIES, app="default", route="session_webhook", outcome="ok")
                == 3
            )
        async with (
            open_emulator() as emu,
            open_outbound(emu, replies=ReplySettings(mention_sender=True)) as outbound,
        ):
            group, sent_group = await user_message(emu, "hi", conversation_type="group")
            single, sent_single = await user_message(emu, "hi", conversation_type="single")
            await outbound.deliver(group, Reply.markdown("**x**"))
            await outbound.deliver(single, Reply.text_("y"))
            (in_group,) = emu.bot_messages(sent_group["conversationId"])
            (in_single,) = emu.bot_messages(sent_single["conversationId"])
            assert in_group["text"] == "@user0001 **x**" and in_group["at"]["atUserIds"] == [
                "user0001"
            ]
            assert in_single["text"] == "y" and not in_single["at"]  # no @ in a 1:1 chat


@pytest.mark.anyio
async def test_an_expired_or_refused_session_falls_back_to_the_openapi() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu, open_outbound(emu, metrics=metrics) as outbound:
            group, sent_group = await user_message(emu, "long task", conversation_type="group")
            single, sent_single = await user_message(emu, "long task", conversation_type="single")
            # DingTalk's side expired the sessions (the message still thinks they are valid).
            emu.faults.expire_sessions()
            await outbound.deliver(group, Reply.text_("result for the group"))
            await outbound.deliver(single, Reply.markdown("# Result\nfor you"))
            (in_group,) = emu.bot_messages(sent_group["conversationId"])
            (in_single,) = emu.bot_messages(sent_single["conversationId"])
            assert (in_group["via"], in_group["msgtype"], in_group["text"]) == (
                "groupMessages",
                "sampleText",
                "result for the group",
            )
            assert (in_single["via"], in_single["msgtype"], in_single["title"]) == (
                "oToMessages",
                "sampleMarkdown",
                "Result",
            )
            assert (
                metric(
                    metrics, DELIVERIES, app="default", route="session_webhook", outcome="refused"
                )
                == 2
            )
            assert metric(metrics, DELIVERIES, app="default", route="openapi", outcome="ok") == 2
            # Known to be expired from the message itself: no webhook call at all.
            late, sent_late = await user_message(
                emu, "later", conversation_type="group", conversation_id="cidLate"
            )
            late.context["session_webhook_expires_ms"] = 1
            before = len(emu.calls("POST /robot/sendBySession"))
            await outbound.deliver(late, Reply.text_("still answered"))
            assert len(emu.calls("POST /robot/sendBySession")) == before
            assert emu.bot_messages(sent_late["conversationId"])[0]["via"] == "groupMessages"
            assert (
                metric(
                    metrics, DELIVERIES, app="default", route="session_webhook", outcome="expired"
                )
                == 1
            )


@pytest.mark.anyio
async def test_an_unreachable_webhook_is_retried_then_the_openapi_answers() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu, open_outbound(emu, metrics=metrics) as outbound:
            message, sent = await user_message(emu, "hi", conversation_type="group")
            closed = trio.socket.socket()
            await closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
            closed.close()
            message.context["session_webhook"] = (
                f"http://127.0.0.1:{port}/robot/sendBySession?session=abc"
            )
            await outbound.deliver(message, Reply.text_("answer"))
            (reply,) = emu.bot_messages(sent["conversationId"])
            assert reply["via"] == "groupMessages"
            assert (
                metric(metrics, DELIVERIES, app="default", route="session_webhook", outcome="error")
                == 1
            )


@pytest.mark.anyio
async def test_when_every_route_fails_the_error_names_dingtalks_code_and_request_id() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu, open_outbound(emu, metrics=metrics) as outbound:
            message, _ = await user_message(emu, "hi", conversation_type="group")
            emu.faults.expire_sessions()
            message.conversation = Conversation(id="cidDisbanded", type="group")
            with pytest.raises(OpenApiError) as caught:
                await outbound.deliver(message, Reply.text_("x"))
            assert caught.value.code == "invalid.openConversationId"
            assert "DingTalk request id" in str(caught.value)
            assert metric(metrics, DELIVERIES, app="default", route="openapi", outcome="error") == 1
            # An external user (no staffId) in a 1:1 chat cannot be reached through the OpenAPI.
            external, _ = await user_message(
                emu, "hi", conversation_type="single", sender_staff_id="ext1", senderStaffId=None
            )
            emu.faults.expire_sessions()
            with pytest.raises(OpenApiError, match="no staffId"):
                await outbound.deliver(external, Reply.text_("x"))


@pytest.mark.anyio
async def test_proactive_messages_use_the_openapi() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            group = emu.state.default_group.id
            await outbound.send(
                Conversation(id=group, type="group"), Reply.markdown("# Daily report\nall green")
            )
            # A 1:1 chat: by the conversation id of a chat seen before, or by the user's staffId.
            message, sent = await user_message(emu, "subscribe", conversation_type="single")
            outbound.remember(message)
            await outbound.send(
                Conversation(id=sent["conversationId"], type="single"),
                Reply.text_("by conversation"),
            )
            await outbound.send(
                Conversation(id="user0001", type="single"), Reply.text_("by staff id")
            )
            assert [(m["via"], m["title"]) for m in emu.bot_messages(group)] == [
                ("groupMessages", "Daily report")
            ]
            assert [m["text"] for m in emu.bot_messages(sent["conversationId"])] == [
                "by conversation",
                "by staff id",
            ]
            assert {m["via"] for m in emu.bot_messages(sent["conversationId"])} == {"oToMessages"}
            with pytest.raises(ReplyError, match="no DingTalk app named 'other'"):
                await outbound.send(
                    Conversation(id=group, type="group"), Reply.text_("x"), app_id="other"
                )


@pytest.mark.anyio
async def test_several_apps_pick_the_app_of_the_conversation() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            apps = [app_for(emu, "sales"), app_for(emu, "support")]
            async with open_outbound(emu, apps=apps) as outbound:
                message, _ = await user_message(emu, "hi", conversation_type="group", app="support")
                outbound.remember(message)
                group = Conversation(id=message.conversation.id, type="group")
                await outbound.send(group, Reply.text_("from support"))
                assert outbound.clients["support"].tokens.statistics()["requests"] == 1
                assert outbound.clients["sales"].tokens.statistics()["requests"] == 0
                with pytest.raises(ReplyError, match="pass app_id"):
                    await outbound.send(
                        Conversation(id="cidNeverSeen", type="group"), Reply.text_("x")
                    )
                await outbound.send(group, Reply.text_("from sales"), app_id=emu.settings.client_id)


@pytest.mark.anyio
async def test_long_replies_are_split_into_several_messages_in_order() -> None:
    text = "\n\n".join(f"Section {i}. " + "word " * 60 for i in range(10))
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, replies=ReplySettings(message_max_bytes=1000)) as outbound,
        ):
            message, sent = await user_message(emu, "hi", conversation_type="group")
            await outbound.deliver(
                message, Reply.card("Long", text, [CardButton("More", "https://x")])
            )
            replies = emu.bot_messages(sent["conversationId"])
            assert len(replies) >= 3
            assert all(len(r["text"].encode()) <= 1000 for r in replies)
            assert [r["msgtype"] for r in replies] == ["markdown"] * (len(replies) - 1) + [
                "actionCard"
            ]
            assert "".join(r["text"] for r in replies) == text
