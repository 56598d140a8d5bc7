"""Emulator: registration, tickets, frame shapes, routing, ACK judging, redelivery, SYSTEM frames.

Rules for this module: real sockets on 127.0.0.1, the emulator and a bare protocol-level client
(``emulator_support``) in the same trio run on a MockClock that jumps only after 50 ms of real
idleness; every test under an absolute ``fail_after``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import httpx
import pytest
import trio
from emulator_support import (
    ALL_SUBSCRIPTIONS,
    StreamClient,
    data_of,
    open_ws,
    rejected_handshake,
    socket_clock,
    stream_client,
)
from host_dingtalk_connector.emulator import BOT_TOPIC, EmulatorError, open_emulator
from trio_websocket import ConnectionClosed

pytestmark = pytest.mark.anyio

#: Budget for tests that sleep in virtual time (a hang still fails fast: the clock jumps).
VIRTUAL_BUDGET = 7200
MESSAGE_ID = re.compile(r"^[0-9a-f]{8}_[0-9a-f]{3}_[0-9a-f]{11}_[0-9a-f]{5}$")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


async def test_registration_returns_a_loopback_endpoint_and_a_uuid_ticket() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            client = StreamClient(emu, http)
            subs = [*ALL_SUBSCRIPTIONS, {"type": "SYSTEM", "topic": "ping"},
                    {"type": "SYSTEM", "topic": "disconnect"}]
            r = await client.register(subs, extras=None)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("application/json")
            body = r.json()
            assert set(body) == {"endpoint", "ticket"}
            assert body["endpoint"] == emu.gateway_url
            assert body["endpoint"].startswith("ws://127.0.0.1:")
            uuid.UUID(body["ticket"])
            (reg,) = emu.registrations()
            assert reg["outcome"] == "ok" and reg["ua"] == "emulator-tests/1.0"
            assert reg["localIp"] == "192.0.2.7" and reg["subscriptions"] == subs
            assert "python-httpx" in reg["userAgent"]


async def test_registration_with_wrong_credentials_answers_401_auth_failed() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            r = await StreamClient(emu, http).register(clientSecret="wrong-secret-value")
            assert r.status_code == 401
            body = r.json()
            assert set(body) == {"requestid", "code", "message"}
            assert body["code"] == "authFailed" and body["message"] == "鉴权失败"
            assert emu.registrations()[0]["outcome"] == "authFailed"
            assert "wrong-secret-value" not in json.dumps(emu.registrations())


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "InvalidParameter"),
    (b'{"clientId": "x"}', "MissingParameter"),
    (b'{"clientId": "dingemulatorapp01", "clientSecret": "emulator-secret-0123456789", "subscriptions": []}',
     "InvalidParameter"),
    (b'{"clientId": "dingemulatorapp01", "clientSecret": "emulator-secret-0123456789", '
     b'"subscriptions": [{"type": "EVENT", "topic": "chat_update_title"}]}', "InvalidParameter"),
    (b'{"clientId": "dingemulatorapp01", "clientSecret": "emulator-secret-0123456789", '
     b'"subscriptions": [{"type": "PUSH", "topic": "*"}]}', "InvalidParameter"),
])
async def test_registration_validates_the_body(body: bytes, code: str) -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            r = await http.post("/v1.0/gateway/connections/open", content=body,
                                headers={"content-type": "application/json"})
            assert r.status_code == 400
            assert r.json()["code"] == code
            assert r.json()["message"]


async def test_tickets_are_single_use_and_expire_after_90_seconds() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            client = StreamClient(emu, http)
            first = (await client.register()).json()
            url = f"{first['endpoint']}?ticket={first['ticket']}"
            async with open_ws(url):
                await emu.wait_for_connection(1)
            reused = await rejected_handshake(url)
            assert reused.status_code == 401 and reused.json()["code"] == "ticket.used"
            unknown = await rejected_handshake(f"{emu.gateway_url}?ticket={uuid.uuid4()}")
            assert unknown.json()["code"] == "ticket.unknown"
            late = (await client.register()).json()
            await trio.sleep(91)
            expired = await rejected_handshake(f"{late['endpoint']}?ticket={late['ticket']}")
            assert expired.status_code == 401 and expired.json()["code"] == "ticket.expired"
            assert set(expired.json()) == {"requestid", "code", "message"}
            in_time = (await client.register()).json()
            await trio.sleep(89)
            async with open_ws(f"{in_time['endpoint']}?ticket={in_time['ticket']}"):
                await emu.wait_for_connection(2)
            assert [h["reason"] for h in emu.rejected_handshakes()] == ["used", "unknown", "expired"]
            assert len(emu.connections()) == 2


async def test_bot_message_frames_are_shaped_like_dingtalk() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, stream_client(emu) as client:
            conn = await emu.wait_for_connection()
            sent = await emu.send_user_message("hello", sender_staff_id="manager1234", sender_nick="Li Lei")
            frame = await client.receive()
            assert set(frame) == {"specVersion", "type", "headers", "data"}
            assert frame["specVersion"] == "1.0" and frame["type"] == "CALLBACK"
            headers = frame["headers"]
            assert set(headers) == {"appId", "connectionId", "contentType", "messageId", "time", "topic"}
            assert all(isinstance(v, str) for v in headers.values())
            assert headers["topic"] == BOT_TOPIC and headers["contentType"] == "application/json"
            assert headers["connectionId"] == conn["connectionId"]
            assert MESSAGE_ID.match(headers["messageId"]) and headers["messageId"] == sent["messageId"]
            assert headers["time"].isdigit() and len(headers["time"]) == 13
            assert isinstance(frame["data"], str)
            msg = data_of(frame)
            assert msg["msgId"] == sent["msgId"] and msg["conversationId"] == sent["conversationId"]
            assert msg["conversationType"] == "1" and "isInAtList" not in msg
            assert msg["text"] == {"content": "hello"} and msg["msgtype"] == "text"
            assert msg["senderStaffId"] == "manager1234" and msg["senderNick"] == "Li Lei"
            assert msg["senderId"].startswith("$:LWCP_v1:$") and msg["chatbotUserId"].startswith("$:LWCP_v1:$")
            assert isinstance(msg["createAt"], int) and isinstance(msg["isAdmin"], bool)
            assert msg["sessionWebhookExpiredTime"] == msg["createAt"] + 5_400_000
            assert msg["sessionWebhook"].startswith(f"{emu.webhook_url}/robot/sendBySession?session=")
            assert msg["robotCode"] == emu.settings.client_id and msg["msgId"].startswith("msg")

            group = await emu.send_user_message("build status?", conversation_type="group",
                                                conversation_title="Release team")
            gmsg = data_of(await client.receive())
            assert gmsg["conversationType"] == "2" and gmsg["conversationTitle"] == "Release team"
            assert gmsg["isInAtList"] is True and gmsg["text"]["content"] == " build status?"
            assert gmsg["atUsers"] == [{"dingtalkId": gmsg["chatbotUserId"]}]
            assert group["conversationId"] == emu.state.default_group.id


async def test_event_frames_carry_the_event_headers() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            sent = await emu.send_event("chat_update_title", {"title": "New name", "chatId": "chat1"})
            frame = await client.receive()
            assert frame["type"] == "EVENT"
            headers = frame["headers"]
            assert headers["topic"] == "*" and headers["eventType"] == "chat_update_title"
            assert headers["eventId"] == sent["eventId"] and headers["eventCorpId"] == emu.settings.corp_id
            assert headers["eventBornTime"].isdigit()
            assert headers["eventUnifiedAppId"] == emu.settings.unified_app_id
            assert all(isinstance(v, str) for v in headers.values())
            assert data_of(frame) == {"title": "New name", "chatId": "chat1"}


async def test_every_msgtype_is_delivered_with_downloadable_files() -> None:
    with trio.fail_after(30):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            token = await client.token()
            headers = {"x-acs-dingtalk-access-token": token}
            codes = {}
            for msgtype in ("picture", "richText", "audio", "video", "file", "unknownMsgType"):
                await emu.send_user_message("voice note" if msgtype == "audio" else "", msgtype=msgtype)
                msg = data_of(await client.receive())
                assert msg["msgtype"] == msgtype and "text" not in msg
                content = msg["content"]
                if msgtype == "richText":
                    pics = [s for s in content["richText"] if s.get("type") == "picture"]
                    codes[msgtype] = pics[0]["downloadCode"]
                elif msgtype == "unknownMsgType":
                    assert content["unknownMsgType"]
                else:
                    codes[msgtype] = content["downloadCode"]
                if msgtype == "audio":
                    assert content["recognition"] == "voice note" and isinstance(content["duration"], int)
                if msgtype == "file":
                    assert content["fileName"] and content["spaceId"] and content["fileId"]
            magic = {"picture": b"\x89PNG", "richText": b"\x89PNG", "audio": b"RIFF", "video": b"\x00\x00\x00",
                     "file": b"Quarterly"}
            for msgtype, code in codes.items():
                r = await client.http.post("/v1.0/robot/messageFiles/download", headers=headers,
                                           json={"downloadCode": code, "robotCode": emu.settings.client_id})
                assert r.status_code == 200, r.text
                url = r.json()["downloadUrl"]
                assert ".file?" in url
                got = await client.http.get(url)
                assert got.status_code == 200 and got.content.startswith(magic[msgtype])
            supplied = await emu.send_user_message(msgtype="file", file={
                "name": "plan.pdf", "content": b"%PDF-1.4 test", "mime": "application/pdf"})
            msg = data_of(await client.receive())
            assert msg["content"]["fileName"] == "plan.pdf" and supplied["delivered"]
            with pytest.raises(EmulatorError, match="group"):
                await emu.send_user_message(msgtype="audio", conversation_type="group")


async def test_group_messages_without_a_mention_are_not_pushed() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, stream_client(emu):
            await emu.wait_for_connection()
            sent = await emu.send_user_message("just chatting", conversation_type="group", at_bot=False)
            assert sent["delivered"] is False and sent["messageId"] is None
            assert "@" in sent["note"]
            assert emu.timeline(sent["conversationId"])[-1]["delivered"] is False


async def test_only_subscribed_topics_are_pushed() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu, stream_client(emu, [{"type": "EVENT", "topic": "*"}]) as events, \
                stream_client(emu, [{"type": "CALLBACK", "topic": BOT_TOPIC}]) as bots:
            await emu.wait_for_connection(2)
            ev_conn, bot_conn = (c["connectionId"] for c in emu.connections())
            msg = await emu.send_user_message("hi")
            ev = await emu.send_event("user_add_org", {"userid": "u1"})
            cb = await emu.send_callback("/v1.0/graph/api/invoke", {"x": 1})
            assert msg["connectionId"] == bot_conn and ev["connectionId"] == ev_conn
            assert cb["delivered"] is False
            assert (await bots.receive())["type"] == "CALLBACK"
            assert (await events.receive())["type"] == "EVENT"


@pytest.mark.parametrize("policy", ["round_robin", "newest", "random"])
async def test_push_policy_picks_one_connection_per_push(policy: str) -> None:
    with trio.fail_after(30):
        async with open_emulator(push_policy=policy, random_seed=7) as emu, \
                stream_client(emu), stream_client(emu), stream_client(emu):
            await emu.wait_for_connection(3)
            ids = [c["connectionId"] for c in emu.connections()]
            targets = [(await emu.send_user_message(f"m{i}"))["connectionId"] for i in range(30)]
            if policy == "round_robin":
                assert targets == [ids[i % 3] for i in range(30)]
            elif policy == "newest":
                assert set(targets) == {ids[2]}
            else:
                assert set(targets) == set(ids)
            assert sum(c["framesSent"] for c in emu.connections(with_frames=False)) == 30


async def test_acks_are_recorded_with_latency_and_judged() -> None:
    with trio.fail_after(30):
        async with open_emulator(event_redelivery_delay=None) as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            await emu.send_user_message("hi")
            msg_frame = await client.receive()
            await trio.sleep(0.25)
            await client.ack(msg_frame, data={"response": "OK"}, message="")
            ack = await emu.wait_for_ack(msg_frame["headers"]["messageId"])
            assert ack["verdict"] == "ok" and ack["code"] == 200 and ack["problems"] == []
            assert ack["latency"] >= 0.25 and ack["parsed"] == {"response": "OK"}

            verdicts = {}
            for name, kwargs in [("echo", {"data": {"title": "x"}}),
                                 ("success", {"data": {"status": "SUCCESS", "message": "success"}}),
                                 ("later", {"data": {"status": "LATER", "message": "later"}}),
                                 ("go_later", {"code": 500, "data": {"status": "LATER"}})]:
                await emu.send_event("chat_update_title", {"title": "x"})
                frame = await client.receive()
                await client.ack(frame, **kwargs)
                verdicts[name] = (await emu.wait_for_ack(frame["headers"]["messageId"]))["verdict"]
            assert verdicts == {"echo": "ok", "success": "ok", "later": "later", "go_later": "error"}

            (ping,) = await emu.ping()
            frame = await client.receive()
            assert frame["type"] == "SYSTEM" and frame["headers"]["topic"] == "ping"
            assert data_of(frame) == {"opaque": ping["payload"]["opaque"]}
            await client.ack(frame, data={"opaque": "not-the-same"})
            assert (await emu.wait_for_ack(ping["messageId"]))["verdict"] == "bad_opaque"
            (ping2,) = await emu.ping()
            frame = await client.receive()
            await client.ack(frame, data=data_of(frame))
            assert (await emu.wait_for_ack(ping2["messageId"]))["verdict"] == "ok"

            # A second ACK, an ACK for an unknown messageId, garbage and a non-string data field.
            await client.ack(frame, data=data_of(frame))
            assert client.ws is not None
            await client.ws.send_message(json.dumps({"code": 200, "headers": {"messageId": "nope"},
                                                     "message": "OK", "data": "{}"}))
            await client.ws.send_message("{garbage")
            await emu.send_user_message("again")
            frame = await client.receive()
            await client.ws.send_message(json.dumps({"code": 200, "headers": {
                "contentType": "application/json", "messageId": frame["headers"]["messageId"]},
                "message": "OK", "data": {"response": None}}))
            ack = await emu.wait_for_ack(frame["headers"]["messageId"])
            assert ack["verdict"] == "ok" and any("not a string" in p for p in ack["problems"])
            conn = await emu.wait_until(lambda: c if len((c := emu.connections()[0])["inboundProblems"]) >= 2
                                        else None)
            problems = [p["problem"] for p in conn["inboundProblems"]]
            assert any("never sent" in p for p in problems) and any("not JSON" in p for p in problems)
            assert emu.frame(ping2["messageId"])["extraAcks"][0]["verdict"] == "duplicate"


async def test_events_are_redelivered_until_acked_or_the_limit() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(event_redelivery_delay=3.0, event_max_redeliveries=3) as emu, \
                stream_client(emu) as client:
            await emu.wait_for_connection()
            start = trio.current_time()
            sent = await emu.send_event("flaky", {"n": 1})
            frames = [await client.receive() for _ in range(4)]
            assert trio.current_time() - start >= 9.0
            assert {f["headers"]["eventId"] for f in frames} == {sent["eventId"]}
            assert len({f["headers"]["messageId"] for f in frames}) == 4
            await trio.sleep(60)
            assert len(emu.deliveries(sent["eventId"])) == 4  # the limit holds

            later = await emu.send_event("later", {"n": 2})
            first = await client.receive()
            await client.ack(first, data={"status": "LATER"})
            second = await client.receive()
            assert second["headers"]["eventId"] == later["eventId"]
            await client.ack(second, data=data_of(second))
            await emu.wait_for_ack(second["headers"]["messageId"])
            await trio.sleep(30)
            attempts = [d["attempt"] for d in emu.deliveries(later["eventId"])]
            assert attempts == [0, 1]


async def test_bot_message_redelivery_is_off_by_default_and_optional() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            sent = await emu.send_user_message("no ack")
            await client.receive()
            await trio.sleep(120)
            assert len(emu.deliveries(sent["msgId"])) == 1
        async with open_emulator(bot_redelivery_delay=60.0) as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            sent = await emu.send_user_message("late ack")
            first = await client.receive()
            second = await client.receive()
            assert data_of(first)["msgId"] == data_of(second)["msgId"] == sent["msgId"]
            assert first["headers"]["messageId"] != second["headers"]["messageId"]
            assert emu.timeline(sent["conversationId"])[0]["messageIds"] == [
                first["headers"]["messageId"], second["headers"]["messageId"]]
            acked = await emu.send_user_message("acked in time")
            frame = await client.receive()
            await client.ack(frame)
            await trio.sleep(120)
            assert len(emu.deliveries(acked["msgId"])) == 1


async def test_disconnect_stops_pushes_and_closes_tcp_after_the_grace_period() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as old:
            old_conn = await emu.wait_for_connection()
            (frame_record,) = await emu.disconnect(reason="connection is expired")
            frame = await old.receive()
            assert frame["type"] == "SYSTEM" and frame["headers"]["topic"] == "disconnect"
            assert data_of(frame) == {"reason": "connection is expired"}
            assert frame_record["expectAck"] is False
            assert (await emu.send_user_message("lost?"))["delivered"] is False
            async with stream_client(emu) as new:
                new_conn = await emu.wait_for_connection(2)
                sent = await emu.send_user_message("to the new one")
                assert sent["connectionId"] == new_conn["connectionId"]
                assert data_of(await new.receive())["msgId"] == sent["msgId"]
                start = trio.current_time()
                with pytest.raises(ConnectionClosed):
                    await old.receive()
                assert trio.current_time() - start >= 9.5
                closed = await emu.wait_for_connection_closed(old_conn["connectionId"])
                assert closed["closedBy"] == "server" and closed["tcp"] == "close_tcp"


async def test_server_pings_and_a_missed_ping_closes_the_connection() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(server_ping_interval=30.0, server_ping_timeout=5.0) as emu, \
                stream_client(emu) as client:
            conn = await emu.wait_for_connection()
            frame = await client.receive()
            assert frame["headers"]["topic"] == "ping" and "opaque" in data_of(frame)
            await client.ack(frame, data=data_of(frame))
            second = await client.receive()
            assert second["headers"]["topic"] == "ping"
            with pytest.raises(ConnectionClosed):  # not answered: the server gives up
                await client.receive()
            closed = await emu.wait_for_connection_closed(conn["connectionId"])
            verdicts = [f["ack"] and f["ack"]["verdict"] for f in emu.connection(conn["connectionId"])["frames"]]
            assert verdicts == ["ok", None] and closed["closedBy"] == "server"


async def test_max_connection_lifetime_sends_disconnect() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(max_connection_lifetime=3600.0) as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            frame = await client.receive()
            assert frame["headers"]["topic"] == "disconnect"
            assert data_of(frame) == {"reason": "persistent connection is timeout"}
            assert emu.connections()[0]["state"] == "disconnecting"


async def test_client_close_code_and_reason_are_recorded() -> None:
    with trio.fail_after(20):
        async with open_emulator() as emu:
            async with stream_client(emu) as client:
                conn = await emu.wait_for_connection()
                assert client.ws is not None
                await client.ws.aclose(code=4001, reason="bye now")
            closed = await emu.wait_for_connection_closed(conn["connectionId"])
            assert (closed["closedBy"], closed["closeCode"], closed["closeReason"]) == ("client", 4001, "bye now")
