"""AI card streaming against the emulator's card APIs (create, stream, finalize, QPS limit).

Each test drives ``Outbound.open_stream`` the way the host does (append chunks, then finish or fail
exactly once) and checks what the emulator recorded: the card's state, every streaming call, and
the messages of the conversation. Real clock, small intervals.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from host_dingtalk_connector.cards import AICardStream, CardSettings, CollectedStream
from host_dingtalk_connector.emulator import open_emulator
from outkit import TEMPLATE, calls, metric, open_outbound, user_message

from host.metrics import Metrics

LIMIT = 60
STREAMING_API = "PUT /v1.0/card/streaming"
QPS = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def card_settings(**overrides: Any) -> CardSettings:
    values: dict[str, Any] = {"template_id": TEMPLATE, "min_interval": 0.05}
    values.update(overrides)
    return CardSettings(**values)


async def stream_text(stream: Any, chunks: list[str], pause: float = 0.01) -> None:
    for chunk in chunks:
        await stream.append(chunk)
        await trio.sleep(pause)


@pytest.mark.anyio
async def test_a_group_answer_streams_coalesced_into_a_card_and_is_finalized() -> None:
    chunks = [f"word{i} " for i in range(60)]
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings(min_interval=0.1)) as outbound,
        ):
            message, sent = await user_message(emu, "question", conversation_type="group")
            stream = await outbound.open_stream(message)
            assert isinstance(stream, AICardStream)
            assert emu.card(stream.out_track_id)["state"] == "PROCESSING"  # visible at once
            await stream_text(stream, chunks)
            await stream.finish()
            await stream.finish()  # ending twice does nothing more
            card = emu.card(stream.out_track_id)
            full = "".join(chunks)
            assert card["state"] == "FINISHED" and card["text"] == full
            streams = card["streams"]
            assert all(s["isFull"] and s["key"] == "msgContent" for s in streams)
            assert [s["isFinalize"] for s in streams] == [False] * (len(streams) - 1) + [True]
            # Coalesced: 60 chunks over ~0.6 s give a handful of updates, each a prefix of the answer.
            assert 2 <= len(streams) <= 12
            assert all(full.startswith(s["content"]) for s in streams)
            assert len({s["guid"] for s in streams}) == len(streams)
            (space,) = card["spaces"]
            assert (
                space["spaceType"] == "IM_GROUP"
                and space["conversationId"] == sent["conversationId"]
            )
            assert space["deliverModel"]["robotCode"] == emu.settings.effective_robot_code
            # The card is the conversation's only bot message: no duplicate answer.
            assert [m["via"] for m in emu.bot_messages(sent["conversationId"])] == ["card"]


@pytest.mark.anyio
async def test_a_1to1_answer_goes_to_the_users_robot_chat_and_mentions_in_groups_when_configured() -> (
    None
):
    from host_dingtalk_connector.replies import ReplySettings

    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(
                emu, cards=card_settings(), replies=ReplySettings(mention_sender=True)
            ) as outbound,
        ):
            message, sent = await user_message(emu, "hi", conversation_type="single")
            stream = await outbound.open_stream(message)
            await stream.append("hello")
            await stream.finish()
            card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
            assert card["spaces"][0]["spaceType"] == "IM_ROBOT" and card["state"] == "FINISHED"
            assert card["spaces"][0]["conversationId"] == sent["conversationId"]
            assert card["userIdType"] == 1
            group_message, _ = await user_message(
                emu, "hi", conversation_type="group", sender_nick="Li Lei"
            )
            group_stream = await outbound.open_stream(group_message)
            await group_stream.finish()
            group_card = emu.card(group_stream.out_track_id)  # type: ignore[attr-defined]
            assert group_card["spaces"][0]["deliverModel"]["atUserIds"] == {"user0001": "Li Lei"}
            assert group_card["text"] == "(The answer was empty.)"


@pytest.mark.anyio
async def test_fail_marks_the_card_failed_with_the_text_so_far_and_the_note() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings(), metrics=metrics) as outbound,
        ):
            message, _ = await user_message(emu, "q", conversation_type="group")
            stream = await outbound.open_stream(message)
            await stream_text(stream, ["partial ", "answer"])
            await stream.fail("\n\n(interrupted)")
            await stream.finish()  # the host never does this, but a second end must be harmless
            card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
            assert card["state"] == "FAILED"
            assert card["text"] == "partial answer\n\n(interrupted)"
            assert card["streams"][-1]["isError"] is True
            assert (
                metric(metrics, "host_dingtalk_card_updates_total", app="default", outcome="failed")
                == 1
            )
            assert (
                metric(
                    metrics, "host_dingtalk_card_updates_total", app="default", outcome="created"
                )
                == 1
            )


@pytest.mark.anyio
async def test_without_a_template_or_when_the_card_is_not_delivered_one_markdown_message_is_sent() -> (
    None
):
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu:
            async with open_outbound(emu, metrics=metrics) as outbound:  # no template configured
                message, sent = await user_message(emu, "q", conversation_type="group")
                stream = await outbound.open_stream(message)
                assert isinstance(stream, CollectedStream)
                await stream_text(stream, ["one ", "two"])
                await stream.finish()
                (reply,) = emu.bot_messages(sent["conversationId"])
                assert (reply["via"], reply["msgtype"], reply["text"]) == (
                    "sessionWebhook",
                    "markdown",
                    "one two",
                )
            async with open_outbound(emu, cards=card_settings(), metrics=metrics) as outbound:
                emu.faults.card_delivery_failures(1)  # HTTP 200 with deliverResults[].success false
                message, sent = await user_message(
                    emu, "q", conversation_type="group", conversation_id="cidOther"
                )
                stream = await outbound.open_stream(message)
                assert isinstance(stream, CollectedStream)
                await stream.append("still answered")
                await stream.fail("\n(note)")
                texts = [
                    m["text"]
                    for m in emu.bot_messages(sent["conversationId"])
                    if m["via"] != "card"
                ]
                assert texts == ["still answered\n(note)"]
                assert (
                    metric(
                        metrics,
                        "host_dingtalk_card_updates_total",
                        app="default",
                        outcome="create_failed",
                    )
                    == 1
                )


@pytest.mark.anyio
async def test_a_long_answer_ends_the_card_and_continues_in_messages() -> None:
    paragraphs = [f"Paragraph {i}: " + "lorem ipsum dolor sit amet " * 4 for i in range(12)]
    full = "\n\n".join(paragraphs)
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings(max_bytes=400)) as outbound,
        ):
            message, sent = await user_message(emu, "q", conversation_type="group")
            stream = await outbound.open_stream(message)
            await stream_text(stream, [p + "\n\n" for p in paragraphs[:-1]] + [paragraphs[-1]])
            await stream.finish()
            card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
            assert card["state"] == "FINISHED"
            assert all(len(s["content"].encode()) <= 400 for s in card["streams"])
            assert card["text"].endswith("*(continued below)*")
            rest = [
                m["text"] for m in emu.bot_messages(sent["conversationId"]) if m["via"] != "card"
            ]
            assert rest, "the rest of the answer must follow as a message"
            shown = card["text"].removesuffix("\n\n*(continued below)*")
            # Nothing lost: what the card shows plus the messages is the whole answer.
            assert (shown + "\n" + "\n".join(rest)).split() == full.split()


@pytest.mark.anyio
async def test_content_too_large_halves_the_card_budget_and_nothing_is_lost() -> None:
    text = "x" * 40 + " " + "y" * 500
    with trio.fail_after(LIMIT):
        async with (
            open_emulator(streaming_max_content_bytes=250) as emu,
            open_outbound(emu, cards=card_settings(max_bytes=1000)) as outbound,
        ):
            message, sent = await user_message(emu, "q", conversation_type="group")
            stream = await outbound.open_stream(message)
            await stream.append(text)
            await stream.finish()
            card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
            assert card["state"] == "FINISHED"
            assert "200092" in [c["code"] for c in calls(emu, STREAMING_API)]
            rest = [
                m["text"] for m in emu.bot_messages(sent["conversationId"]) if m["via"] != "card"
            ]
            shown = card["text"].removesuffix("\n\n*(continued below)*")
            assert (shown + "".join(rest)).replace(" ", "").replace("\n", "") == text.replace(
                " ", ""
            )


@pytest.mark.anyio
async def test_qps_rejections_are_absorbed_counted_and_the_card_still_finishes() -> None:
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings(), metrics=metrics) as outbound,
        ):
            message, _ = await user_message(emu, "q", conversation_type="group")
            stream = await outbound.open_stream(message)
            await stream.append("first ")
            await trio.sleep(0.1)
            emu.faults.qps_errors(3, api=STREAMING_API)
            await stream_text(stream, ["second ", "third"], pause=0.1)
            await stream.finish()
            card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
            assert card["state"] == "FINISHED" and card["text"] == "first second third"
            assert [c["code"] for c in calls(emu, STREAMING_API)].count(QPS) == 3
            assert metric(metrics, "host_dingtalk_card_qps_rejections_total", app="default") == 3
            assert outbound.cards.bucket(outbound.clients["default"]).rate < 8.0  # slowed down


@pytest.mark.anyio
async def test_twenty_cards_at_once_share_the_budget_without_a_qps_storm() -> None:
    chunks = [f"token{i} " for i in range(30)]
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings(min_interval=0.05), metrics=metrics) as outbound,
        ):
            streams: list[Any] = []

            async def converse(i: int) -> None:
                message, _ = await user_message(
                    emu, f"q{i}", conversation_type="group", conversation_id=f"cidConv{i:02d}"
                )
                stream = await outbound.open_stream(message)
                streams.append(stream)
                await stream_text(stream, chunks, pause=0.02)
                await stream.finish()

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(converse, i)
            cards = [emu.card(s.out_track_id) for s in streams]
            assert [c["state"] for c in cards] == ["FINISHED"] * 20
            assert {c["text"] for c in cards} == {"".join(chunks)}
            streaming = calls(emu, STREAMING_API)
            assert [c["code"] for c in streaming].count(QPS) == 0
            assert metric(metrics, "host_dingtalk_card_qps_rejections_total", app="default") == 0
            # The budget held: never more than rate + burst (8 + 4) streaming calls in one second.
            times = sorted(c["at"] / 1000 for c in streaming)
            assert max(sum(1 for t in times if start <= t < start + 1) for start in times) <= 12


@pytest.mark.anyio
async def test_a_card_that_stops_accepting_updates_still_delivers_the_whole_answer() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu, cards=card_settings()) as outbound:
            message, sent = await user_message(emu, "q", conversation_type="group")
            stream = await outbound.open_stream(message)
            await stream.append("before ")
            await trio.sleep(0.2)
            # Someone else ends the card (flowStatus 3 = finished): DingTalk refuses further streaming.
            token = emu.issue_access_token()
            async with httpx.AsyncClient(base_url=emu.base_url) as http:
                r = await http.put(
                    "/v1.0/card/instances",
                    headers={"x-acs-dingtalk-access-token": token},
                    json={
                        "outTrackId": stream.out_track_id,  # type: ignore[attr-defined]
                        "cardData": {"cardParamMap": {"flowStatus": "3"}},
                        "cardUpdateOptions": {"updateCardDataByKey": True},
                    },
                )
                assert r.status_code == 200, r.text
            await stream_text(stream, ["after ", "the end"], pause=0.1)
            await stream.finish()
            texts = [
                m["text"] for m in emu.bot_messages(sent["conversationId"]) if m["via"] != "card"
            ]
            assert texts == ["before after the end"]


@pytest.mark.anyio
async def test_stopping_the_card_service_ends_every_open_card() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            async with open_outbound(emu, cards=card_settings()) as outbound:
                streams = []
                for i in range(3):
                    message, _ = await user_message(
                        emu, f"q{i}", conversation_type="group", conversation_id=f"cidStop{i}"
                    )
                    stream = await outbound.open_stream(message)
                    await stream.append(f"half an answer {i}")
                    streams.append(stream)
                await trio.sleep(0.2)
            # open_outbound cancelled the service, then closed: every card ended, marked failed.
            for i, stream in enumerate(streams):
                card = emu.card(stream.out_track_id)  # type: ignore[attr-defined]
                assert card["state"] == "FAILED"
                assert (
                    card["text"].startswith(f"half an answer {i}") and "restarting" in card["text"]
                )
