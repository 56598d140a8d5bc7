"""The Stream connector end to end: real Host, real emulator, real sockets on 127.0.0.1.

Rules for this module: the real clock (these tests wait on sockets, and nothing here depends on a
timer firing), an absolute ``trio.fail_after`` around every test body, no sleeps to "let things
happen" (the emulator's ``wait_*`` helpers wait for the exact condition).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import CARD_CALLBACK_TOPIC, MALFORMED_KINDS, open_emulator
from streamkit import Recorder, acks, app_table, dingtalk_config, inbound_problems, open_host

from host.model import AudioPart, FilePart, ImagePart, RichTextPart, TextPart, VideoPart

LIMIT = 30  # seconds, real clock: generous for a loaded 2-core machine


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


async def wait_for(predicate: Any) -> None:
    """Poll a condition that no emulator event signals (host-side state)."""
    while not predicate():
        await trio.sleep(0.005)


@pytest.mark.anyio
async def test_message_end_to_end_through_the_host(host_logs: Any) -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
            assert running.connector.is_ready() and running.host.is_ready()
            sent = await emu.send_user_message("  build status?", conversation_type="group", conversation_title="Ops")
            ack = await emu.wait_for_ack(sent["messageId"])
            assert ack["verdict"] == "ok" and ack["code"] == 200
            assert json.loads(ack["data"]) == {"response": None}
            replies = await emu.wait_for_bot_message(sent["conversationId"])
            assert [r["text"] for r in replies] == ["echo: build status?"]
            assert replies[0]["via"] == "sessionWebhook"
            (message,) = recorder.messages
            assert message.id == sent["msgId"] and message.connector == "dingtalk" and message.app_id == "default"
            assert message.conversation.type == "group" and message.conversation.title == "Ops"
            assert message.mentions_bot is True
            assert message.sender.platform_ids["staffId"] == "user0001"
            assert message.request_id
            assert running.metric("host_dingtalk_acks_total", app="default", kind="bot", code="200") == 1
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="text", outcome="accepted") == 1
            assert running.metric("host_dingtalk_connection_state", app="default") == 2
            assert running.metric("host_dingtalk_ack_latency_seconds_count", kind="bot") == 1
        assert not inbound_problems(emu)
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_system_ping_is_answered_with_the_same_opaque() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu)) as running:
            (frame,) = await emu.ping()
            ack = await emu.wait_for_ack(frame["messageId"])
            assert ack["verdict"] == "ok"
            assert json.loads(ack["data"])["opaque"] == frame["payload"]["opaque"]
            assert running.metric("host_dingtalk_system_pings_total", app="default") == 1


@pytest.mark.anyio
async def test_event_success_and_later() -> None:
    recorder = Recorder(failing_event_types={"flaky"}, failures_left={"flaky": 1})
    with trio.fail_after(LIMIT):
        async with open_emulator(event_redelivery_delay=0.2) as emu, open_host(
            dingtalk_config(emu), ("recorder", recorder)
        ) as running:
            good = await emu.send_event("chat_update_title", {"title": "New name"})
            ack = await emu.wait_for_ack(good["messageId"])
            assert ack["verdict"] == "ok" and json.loads(ack["data"])["status"] == "SUCCESS"
            flaky = await emu.send_event("flaky", {"n": 1})
            ack = await emu.wait_for_ack(flaky["messageId"])
            assert ack["verdict"] == "later" and json.loads(ack["data"])["status"] == "LATER"
            # DingTalk redelivers a LATER event; this time on_event succeeds.
            frames = await emu.wait_for_deliveries(flaky["eventId"], 2)
            ack = await emu.wait_for_ack(frames[1]["messageId"])
            assert ack["verdict"] == "ok"
            types = [e.type for e in recorder.events]
            assert types == ["chat_update_title", "flaky", "flaky"]
            first = recorder.events[0]
            assert first.id == good["eventId"] and first.payload == {"title": "New name"}
            assert first.raw["headers"]["eventCorpId"] == emu.settings.corp_id
            assert running.metric("host_dingtalk_events_total", app="default", outcome="later") == 1
            assert running.metric("host_dingtalk_events_total", app="default", outcome="success") == 2


@pytest.mark.anyio
async def test_every_msgtype_is_converted() -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
            sent = [
                await emu.send_user_message("plain text"),
                await emu.send_user_message(msgtype="picture"),
                await emu.send_user_message(msgtype="richText", rich_text=[{"text": "look:"}, {"type": "picture"}, {"text": "ok"}]),
                await emu.send_user_message(msgtype="audio", content={"recognition": "明天开会"}),
                await emu.send_user_message(msgtype="video"),
                await emu.send_user_message(msgtype="file", file={"name": "report.pdf", "content": b"%PDF-1.4", "mime": "application/pdf"}),
                await emu.send_user_message(msgtype="unknownMsgType"),
            ]
            for item in sent:
                assert (await emu.wait_for_ack(item["messageId"]))["verdict"] == "ok"
            await wait_for(lambda: len(recorder.messages) == len(sent))
            by_id = {m.id: m for m in recorder.messages}
            text, picture, rich, audio, video, file, unknown = (by_id[s["msgId"]] for s in sent)
            assert text.parts == [TextPart(text="plain text")]
            assert isinstance(picture.parts[0], ImagePart) and picture.parts[0].media.download_code
            (rich_part,) = rich.parts
            assert isinstance(rich_part, RichTextPart)
            assert [type(p) for p in rich_part.parts] == [TextPart, ImagePart, TextPart]
            assert isinstance(audio.parts[0], AudioPart) and audio.parts[0].recognition == "明天开会"
            assert audio.text == "明天开会"
            assert isinstance(video.parts[0], VideoPart) and video.parts[0].media.download_code
            assert isinstance(file.parts[0], FilePart) and file.parts[0].file_name == "report.pdf"
            assert unknown.parts == [] and unknown.raw["msgtype"] == "unknownMsgType"
            for message in by_id.values():
                assert message.context["session_webhook"].startswith(emu.webhook_url)
                assert message.context["session_webhook_expires_ms"] > message.created_at_ms
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="unknownMsgType", outcome="accepted") == 1


@pytest.mark.anyio
async def test_identity_mapping_file(tmp_path: Path) -> None:
    mapping = tmp_path / "users.toml"
    mapping.write_text('[staffId]\nuser0001 = "alice@example.com"\n')
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(
            dingtalk_config(emu, identity={"mapping_file": str(mapping)}), ("recorder", recorder)
        ):
            mapped = await emu.send_user_message("hi")
            stranger = await emu.send_user_message("hi", sender_staff_id="user9999", sender_nick="Stranger")
            await emu.wait_for_ack(mapped["messageId"])
            await emu.wait_for_ack(stranger["messageId"])
            await wait_for(lambda: len(recorder.messages) == 2)
            identities = {m.sender.platform_ids["staffId"]: m.sender.identity for m in recorder.messages}
            assert identities == {"user0001": "alice@example.com", "user9999": None}


@pytest.mark.anyio
async def test_foreign_robot_code_is_refused(host_logs: Any) -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(
            dingtalk_config(emu, robot_code="dingsomeoneelse"), ("recorder", recorder)
        ) as running:
            sent = await emu.send_user_message("not for us")
            ack = await emu.wait_for_ack(sent["messageId"])
            assert ack["code"] == 400
            # The next (legitimate) message still flows: a message without robotCode is accepted.
            ok = await emu.send_user_message("no robot code", robotCode=None)
            assert (await emu.wait_for_ack(ok["messageId"]))["verdict"] == "ok"
            await wait_for(lambda: len(recorder.messages) == 1)
            assert [m.id for m in recorder.messages] == [ok["msgId"]]
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="text", outcome="refused") == 1
    assert any("refused bot message" in m for m in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_bad_frames_are_counted_and_the_next_message_is_processed(host_logs: Any) -> None:
    recorder = Recorder(answer=False)
    stream = {"max_frame_bytes": 200 * 1024, "topics": ["/v1.0/im/bot/messages/get", "/v1.0/graph/api/invoke"]}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream), ("recorder", recorder)) as running:
            (connection,) = emu.connections(with_frames=False)
            expected: list[str] = []
            malformed_ids: set[str] = set()
            for kind in MALFORMED_KINDS:
                malformed_ids.update(f["messageId"] for f in await emu.faults.malformed(kind=kind))
                ok = await emu.send_user_message(f"after {kind}")
                assert (await emu.wait_for_ack(ok["messageId"]))["verdict"] == "ok", kind
                expected.append(ok["msgId"])
            big = await emu.faults.oversized()
            unknown = await emu.send_callback("/v1.0/graph/api/invoke", {"request": {}})
            ok = await emu.send_user_message("after oversized and unknown topic")
            assert (await emu.wait_for_ack(ok["messageId"]))["verdict"] == "ok"
            expected.append(ok["msgId"])
            assert (await emu.wait_for_ack(unknown["messageId"]))["code"] == 404
            assert (await emu.wait_for_ack(big["messageId"]))["code"] == 400
            await wait_for(lambda: len(recorder.messages) == len(expected))
            assert [m.id for m in recorder.messages] == expected
            # Same connection throughout: bad input never takes it down.
            assert [c["connectionId"] for c in emu.connections(with_frames=False)] == [connection["connectionId"]]
            reasons = {
                "not_json": "not_json", "binary": "binary", "not_object": "not_object",
                "data_object": "data_not_json", "missing_message_id": "missing_message_id",
                "unknown_type": "unknown_type", "truncated": "not_json",
            }  # fmt: skip
            for kind, reason in reasons.items():
                assert running.metric("host_dingtalk_bad_frames_total", app="default", reason=reason) >= 1, kind
            assert running.metric("host_dingtalk_bad_frames_total", app="default", reason="oversized") == 1
            assert running.metric("host_dingtalk_bad_frames_total", app="default", reason="unknown_topic") == 1
            # numeric_time is tolerated at the frame level (as the official Python SDK does); that
            # frame's payload has no msgId, which is refused as a bad payload.
            assert running.metric("host_dingtalk_bad_frames_total", app="default", reason="bad_payload") == 1
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="text", outcome="accepted") == len(expected)
        # The only inbound problems allowed: our error ACKs to frames the emulator does not list as
        # sent (malformed-frame fault; see /work/briefs/requests-for-emulator.md #1).
        error_acked = {json.loads(p["raw"])["headers"]["messageId"] for p in inbound_problems(emu)}
        assert all(json.loads(p["raw"])["code"] in (400, 404) for p in inbound_problems(emu))
        assert error_acked <= malformed_ids | {unknown["messageId"]}
    warnings = host_logs.messages("WARNING")
    assert any("bad frame (oversized)" in w and big["messageId"] in w for w in warnings)
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_duplicate_frames_and_redeliveries_are_acked_but_processed_once() -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
            emu.faults.duplicates(1, same_message_id=True)
            same = await emu.send_user_message("pushed twice, same messageId")
            emu.faults.duplicates(1, same_message_id=False)
            renewed = await emu.send_user_message("pushed twice, new messageId")
            for item in (same, renewed):
                frames = await emu.wait_for_deliveries(item["msgId"], 2)
                for frame in frames:
                    await emu.wait_for_ack(frame["messageId"])
            await wait_for(lambda: running.metric("host_dingtalk_dedup_hits_total", app="default", key="msg") == 1)
            assert sorted(m.id for m in recorder.messages) == sorted([same["msgId"], renewed["msgId"]])
            assert running.metric("host_dingtalk_redeliveries_total", app="default") == 1
            all_acks = acks(emu)
            assert all(a["code"] == 200 for a in all_acks)


@pytest.mark.anyio
async def test_two_apps_in_one_host_have_separate_connections_and_dedup_scopes() -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator(client_id="dingsalesapp", client_secret="sales-secret-1") as sales, open_emulator(
            client_id="dingsupportapp", client_secret="support-secret-2"
        ) as support:
            config = {"apps": {"sales": app_table(sales), "support": app_table(support)}, "stream": dingtalk_config(sales)["stream"]}
            async with open_host(config, ("recorder", recorder)) as running:
                assert set(running.connector.streams) == {"sales", "support"}
                # The same msgId on both apps (two robots @-ed in one message) is handled by each.
                a = await sales.send_user_message("to sales", conversation_type="group", msgId="msgSHARED==")
                b = await support.send_user_message("to support", conversation_type="group", msgId="msgSHARED==")
                replies_a = await sales.wait_for_bot_message(a["conversationId"])
                replies_b = await support.wait_for_bot_message(b["conversationId"])
                assert [r["text"] for r in replies_a] == ["echo: to sales"]
                assert [r["text"] for r in replies_b] == ["echo: to support"]
                assert sorted(m.app_id or "" for m in recorder.messages) == ["sales", "support"]
                assert len(sales.connections()) == 1 and len(support.connections()) == 1
                # Killing one app's connection does not touch the other.
                await sales.faults.close(code=1011, reason="bye")
                await sales.wait_for_connection(2)
                assert support.connections(with_frames=False)[0]["state"] == "open"


@pytest.mark.anyio
async def test_graceful_shutdown_finishes_in_flight_work_and_closes_cleanly() -> None:
    recorder = Recorder(event_seconds=0.3)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            async with open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
                event = await emu.send_event("slow_event", {})
                sent = await emu.send_user_message("answer me before you go")
                await emu.wait_for_ack(sent["messageId"])
                await wait_for(lambda: recorder.events)
                running.host.request_shutdown()
            # The event handler finished and its ACK went out before the socket closed.
            ack = await emu.wait_for_ack(event["messageId"])
            assert ack["verdict"] == "ok"
            # The accepted message was still answered while the host drained.
            replies = await emu.wait_for_bot_message(sent["conversationId"])
            assert [r["text"] for r in replies] == ["echo: answer me before you go"]
            (connection,) = emu.connections(with_frames=False)
            closed = await emu.wait_for_connection_closed(connection["connectionId"])
            assert closed["closedBy"] == "client" and closed["closeCode"] == 1000
            assert not running.connector.is_ready()


@pytest.mark.anyio
async def test_secrets_and_tickets_never_reach_the_logs(host_logs: Any) -> None:
    secret = "Sup3r-Secret-Canary-7f1c"
    with trio.fail_after(LIMIT):
        async with open_emulator(client_secret=secret) as emu:
            emu.faults.refuse_registration("auth", count=1)
            stream = {"backoff_base": 0.01, "backoff_cap": 0.02}
            async with open_host(dingtalk_config(emu, stream=stream), ("recorder", Recorder())) as running:
                sent = await emu.send_user_message("hello")
                await emu.wait_for_bot_message(sent["conversationId"])
                assert secret not in repr(running.connector.apps) and secret not in repr(running.connector)
                assert secret not in json.dumps(running.connector.statistics())
                assert secret not in running.host.metrics.render().decode()
            registrations = emu.registrations()
            assert [r["status"] for r in registrations[:2]] == [401, 200]
            tickets = [r["ticket"] for r in registrations if r.get("ticket")]
            session = sent["sessionWebhook"].split("session=")[1]
    text = host_logs.text()
    assert "authFailed" in text and "check client_id / client_secret" in text
    assert secret not in text
    for ticket in tickets:
        assert ticket not in text
    assert session not in text


@pytest.mark.anyio
async def test_card_callback_becomes_an_event_and_is_acked_at_once() -> None:
    recorder = Recorder(event_seconds=0.5)
    payload = {
        "type": "actionCallback",
        "outTrackId": "card_6f1d",
        "corpId": "ding5a1b2c3d4e5f6789",
        "userId": "user0001",
        "content": json.dumps({"cardPrivateData": {"actionIds": ["btn_accept"], "params": {"action": "accept"}}}),
    }
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)):
            sent = await emu.send_callback(CARD_CALLBACK_TOPIC, payload)
            ack = await emu.wait_for_ack(sent["messageId"])
            # ACKed on acceptance (DingTalk allows 2 s), while on_event is still running.
            assert ack["code"] == 200 and json.loads(ack["data"]) == {"response": None}
            await wait_for(lambda: recorder.events)
            (event,) = recorder.events
            assert event.type == "card_callback" and event.id == sent["messageId"]
            assert event.payload["content"]["cardPrivateData"]["params"] == {"action": "accept"}


@pytest.mark.anyio
async def test_a_crashing_resolver_costs_one_message_not_the_connection(host_logs: Any) -> None:
    recorder = Recorder(answer=False)
    identity = {"resolver": "streamkit:ExplodingResolver", "options": {"explode_for": "user0666"}}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, identity=identity), ("recorder", recorder)) as running:
            bad = await emu.send_user_message("boom", sender_staff_id="user0666")
            assert (await emu.wait_for_ack(bad["messageId"]))["code"] == 500
            good = await emu.send_user_message("fine")
            assert (await emu.wait_for_ack(good["messageId"]))["verdict"] == "ok"
            await wait_for(lambda: recorder.messages)
            assert [(m.id, m.sender.identity) for m in recorder.messages] == [(good["msgId"], "site:user0001")]
            assert len(emu.connections()) == 1
            assert running.metric("host_dingtalk_bad_frames_total", app="default", reason="internal_error") == 1
    assert any("resolver bug" in str(r["exception"]) for r in host_logs.errors())
