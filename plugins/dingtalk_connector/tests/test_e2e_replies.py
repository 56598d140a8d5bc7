"""End to end: emulator -> Stream connector -> host -> NLP bridge (echo backend) -> replies and AI
cards -> emulator. Everything real, over 127.0.0.1, on the real clock.

The answering side is the NLP bridge plugin with its built-in echo backend when it is installed
(the shared development environment, ``nox -s integration``); in a fresh environment with only this
plugin, ``StreamingEcho`` below stands in for it (same replies: ``[echo] <text>`` streamed word by
word, "I can only read text messages for now." for messages without text).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from outkit import TEMPLATE, metric, nlp_bridge_plugin, open_bot

from host import Message, hookimpl

LIMIT = 60
NON_TEXT = "I can only read text messages for now."
QPS = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
STREAMING_API = "PUT /v1.0/card/streaming"
SHUTDOWN_NOTE = "interrupted because the bot is restarting"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


@pytest.fixture(autouse=True)
def _no_nlp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NLP_BASE_URL", "NLP_API_KEY", "NLP_MODEL"):
        monkeypatch.delenv(var, raising=False)


class StreamingEcho:
    """The NLP bridge's echo backend, for environments without the NLP bridge plugin."""

    def __init__(self, chunk_delay: float = 0.0, stream: bool = True) -> None:
        self.chunk_delay = chunk_delay
        self.stream = stream

    @hookimpl
    async def on_message(self, message: Message) -> Any:
        if not message.text:
            return NON_TEXT
        answer = "[echo] " + message.text
        if not self.stream:
            return answer

        async def words() -> Any:
            for i, word in enumerate(re.findall(r"\S+\s*|\s+", answer)):
                if i and self.chunk_delay:
                    await trio.sleep(self.chunk_delay)
                yield word

        return words()


def responder(
    *, chunk_delay: float = 0.0, stream: bool = True, concurrency: int = 8
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(plugins, config sections) of the answering side: the NLP bridge's echo, or its stand-in."""
    bridge = nlp_bridge_plugin()
    if bridge is None:
        return [("echo", StreamingEcho(chunk_delay, stream))], {}
    section = {
        "stream": stream,
        "reply_format": "text",
        "backends": {"echo": {"type": "echo", "chunk_delay": chunk_delay}},
        "limits": {"max_concurrency": concurrency, "user_rate_per_minute": 0},
    }
    return [("nlp_bridge", bridge)], {"nlp_bridge": section}


async def settle(host: Any) -> None:
    """Wait until the host handled everything, then a little longer for any late duplicate."""
    await host.wait_idle()
    await trio.sleep(0.3)
    await host.wait_idle()


@pytest.mark.anyio
async def test_every_msgtype_gets_exactly_one_reply(tmp_path: Path) -> None:
    plugins, sections = responder()
    cards = {"template_id": TEMPLATE}
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_bot(
                emu,
                *plugins,
                sections=sections,
                dingtalk={"cards": cards, "media": {"dir": str(tmp_path)}},
            ) as host,
        ):
            sent = {}
            for msgtype in (
                "text",
                "picture",
                "richText",
                "audio",
                "video",
                "file",
                "unknownMsgType",
            ):
                sent[msgtype] = await emu.send_user_message(
                    f"a {msgtype} message", msgtype=msgtype, sender_staff_id=f"user-{msgtype}",
                    rich_text=[{"text": "see the screenshot:"}, {"type": "picture"}] if msgtype == "richText" else None,
                )  # fmt: skip
            sent["group"] = await emu.send_user_message("hello group", conversation_type="group")
            for info in sent.values():
                assert info["delivered"]
                await emu.wait_for_bot_message(info["conversationId"])
            await settle(host)
            replies = {
                kind: emu.bot_messages(info["conversationId"]) for kind, info in sent.items()
            }
            assert {kind: len(r) for kind, r in replies.items()} == {kind: 1 for kind in sent}
            texts = {kind: r[0]["text"] for kind, r in replies.items()}
            assert texts["text"] == "[echo] a text message"
            assert texts["richText"] == "[echo] see the screenshot:"
            assert texts["audio"].startswith("[echo] ")  # DingTalk's speech recognition is the text
            assert texts["group"] == "[echo] hello group"
            for kind in ("picture", "video", "file", "unknownMsgType"):
                assert texts[kind] == NON_TEXT
            # Streamed answers came as AI cards, all finalized; the others as session-webhook messages.
            for kind in ("text", "richText", "audio", "group"):
                assert (
                    replies[kind][0]["via"] == "card" and replies[kind][0]["state"] == "FINISHED"
                ), kind
            for kind in ("picture", "video", "file", "unknownMsgType"):
                assert replies[kind][0]["via"] == "sessionWebhook", kind
            # Every message was ACKed once, and the downloaded media files are gone.
            for info in sent.values():
                assert (await emu.wait_for_ack(info["messageId"]))["code"] == 200
            assert list(tmp_path.iterdir()) == []
            media = [
                f for f in emu.calls("POST /v1.0/robot/messageFiles/download") if f["status"] == 200
            ]
            assert len(media) >= 5  # picture, richText picture, audio, video, file


@pytest.mark.anyio
async def test_an_expired_session_falls_back_to_the_openapi() -> None:
    """The answer takes long; meanwhile DingTalk expired the session webhook."""
    plugins, sections = responder(stream=False)
    gate = trio.Event()

    class Slow:
        @hookimpl(tryfirst=True)
        async def on_message(self, message: Message) -> None:
            await gate.wait()  # the "long task"

    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_bot(emu, ("slow", Slow()), *plugins, sections=sections) as host,
        ):
            group = await emu.send_user_message("long task", conversation_type="group")
            single = await emu.send_user_message("long task too", conversation_type="single")
            await emu.wait_for_ack(group["messageId"])
            await emu.wait_for_ack(single["messageId"])
            assert emu.faults.expire_sessions() == 2
            gate.set()
            await emu.wait_for_bot_message(group["conversationId"])
            await emu.wait_for_bot_message(single["conversationId"])
            await settle(host)
            (in_group,) = emu.bot_messages(group["conversationId"])
            (in_single,) = emu.bot_messages(single["conversationId"])
            assert (in_group["via"], in_group["text"]) == ("groupMessages", "[echo] long task")
            assert (in_single["via"], in_single["text"]) == ("oToMessages", "[echo] long task too")
            refused = emu.calls("POST /robot/sendBySession")
            assert [c["code"] for c in refused] == [str(emu.settings.session_expired_errcode)] * 2
            deliveries = "host_dingtalk_deliveries_total"
            assert (
                metric(host.metrics, deliveries, app="default", route="openapi", outcome="ok") == 2
            )
            assert (
                metric(
                    host.metrics,
                    deliveries,
                    app="default",
                    route="session_webhook",
                    outcome="refused",
                )
                == 2
            )


@pytest.mark.anyio
async def test_twenty_conversations_stream_cards_at_once_without_a_qps_storm() -> None:
    question = " ".join(f"w{i}" for i in range(50))
    plugins, sections = responder(chunk_delay=0.04, concurrency=32)
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_bot(
                emu,
                *plugins,
                sections=sections,
                dingtalk={"cards": {"template_id": TEMPLATE}},
                host={"concurrency": 32},
            ) as host,
        ):
            sent = []
            for i in range(20):
                sent.append(await emu.send_user_message(question, conversation_type="group", conversation_id=f"cidBusy{i:02d}",
                                                        sender_staff_id=f"user{i:02d}"))  # fmt: skip
            finals = [await emu.wait_for_card(conversation_id=s["conversationId"]) for s in sent]
            await settle(host)
            assert [c["state"] for c in finals] == ["FINISHED"] * 20
            assert {c["text"] for c in finals} == {"[echo] " + question}
            assert all(len(emu.bot_messages(s["conversationId"])) == 1 for s in sent)
            # They really streamed (several updates each), yet DingTalk never (or barely) said QpsLimit.
            streaming = emu.calls(STREAMING_API)
            rejected = sum(1 for c in streaming if c["code"] == QPS)
            assert rejected <= 3
            assert (
                metric(host.metrics, "host_dingtalk_card_qps_rejections_total", app="default")
                == rejected
            )
            accepted = [c for c in streaming if c["status"] == 200]
            intermediate = [c for c in accepted if not c["request"]["isFinalize"]]
            assert len(accepted) - len(intermediate) == 20 and len(intermediate) >= 10
            # Within the budget: never more than updates_per_second + burst (8 + 4) calls in a second.
            times = sorted(c["at"] / 1000 for c in streaming)
            assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= 12


@pytest.mark.anyio
async def test_shutdown_in_mid_stream_finalizes_every_card() -> None:
    question = " ".join(f"word{i}" for i in range(200))
    plugins, sections = responder(chunk_delay=0.05)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            async with open_bot(
                emu, *plugins, sections=sections, dingtalk={"cards": {"template_id": TEMPLATE}},
                host={"shutdown_timeout": 0.5},
            ):  # fmt: skip
                sent = [
                    await emu.send_user_message(question, conversation_type="group", conversation_id=f"cidStop{i}",
                                                sender_staff_id=f"user{i}")
                    for i in range(3)
                ]  # fmt: skip
                for s in sent:
                    await emu.wait_for_card(conversation_id=s["conversationId"], state="INPUTING")
                # Leaving the block shuts the host down while the three answers are mid-stream.
            cards = [emu.bot_messages(s["conversationId"])[0]["card"] for s in sent]
            assert [c["state"] for c in cards] == ["FAILED"] * 3  # none left "generating"
            for card in cards:
                assert SHUTDOWN_NOTE in card["text"] and card["text"].startswith("[echo] word0")
                assert card["streams"][-1]["isError"] is True


@pytest.mark.anyio
async def test_a_plugin_failing_or_timing_out_mid_stream_leaves_a_failed_card_not_a_stuck_one() -> (
    None
):
    class Breaks:
        @hookimpl
        async def on_message(self, message: Message) -> Any:
            async def chunks() -> Any:
                yield "first part, "
                await trio.sleep(0.2)
                if message.text == "break":
                    raise RuntimeError("the model connection dropped")
                await trio.sleep(30)  # never ends in time
                yield "never shown"

            return chunks()

    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_bot(
                emu,
                ("breaks", Breaks()),
                dingtalk={"cards": {"template_id": TEMPLATE}},
                host={"stream_timeout": 1.0},
            ) as host,
        ):
            broken = await emu.send_user_message(
                "break", conversation_type="group", conversation_id="cidBreak"
            )
            slow = await emu.send_user_message(
                "slow", conversation_type="group", conversation_id="cidSlow"
            )
            broken_card = await emu.wait_for_card(conversation_id=broken["conversationId"])
            slow_card = await emu.wait_for_card(conversation_id=slow["conversationId"])
            await settle(host)
            assert broken_card["state"] == "FAILED" and broken_card["text"].startswith(
                "first part, "
            )
            assert "incomplete" in broken_card["text"]
            assert slow_card["state"] == "FAILED" and "took too long" in slow_card["text"]
            assert all(len(emu.bot_messages(s["conversationId"])) == 1 for s in (broken, slow))
