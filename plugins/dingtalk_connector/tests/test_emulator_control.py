"""Emulator: the HTTP control API under /_emulator/ (what the demo and other languages use).

Same rules as test_emulator_gateway.py (real sockets, MockClock jumping after 50 ms of real idleness).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import trio
from emulator_support import data_of, socket_clock, stream_client
from host_dingtalk_connector.emulator import open_emulator

pytestmark = pytest.mark.anyio
VIRTUAL_BUDGET = 3600


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


async def test_messages_conversations_and_inspection_endpoints() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client, \
                httpx.AsyncClient(base_url=f"{emu.base_url}/_emulator") as ctl:
            await emu.wait_for_connection()
            info = (await ctl.get("")).json()
            assert info["clientId"] == emu.settings.client_id and info["openConnections"] == 1
            assert info["gatewayUrl"] == emu.gateway_url

            r = await ctl.post("/messages", json={"text": "hello from http", "conversation_type": "group",
                                                  "sender_nick": "Han Meimei", "sender_staff_id": "hmm01",
                                                  "fields": {"senderPlatform": "Win"}})
            assert r.status_code == 200, r.text
            sent = r.json()
            assert {"msgId", "conversationId", "messageId", "delivered"} <= set(sent)
            frame = await client.receive()
            msg = data_of(frame)
            assert msg["msgId"] == sent["msgId"] and msg["senderNick"] == "Han Meimei"
            assert msg["senderPlatform"] == "Win"
            await client.ack(frame)
            await client.http.post(msg["sessionWebhook"], json={"msgtype": "markdown",
                                                                "markdown": {"title": "T", "text": "**hi**"}})
            cid = sent["conversationId"]
            messages = (await ctl.get(f"/conversations/{cid}/messages")).json()
            assert [(m["msgtype"], m["text"]) for m in messages] == [("markdown", "**hi**")]
            timeline = (await ctl.get(f"/conversations/{cid}/timeline")).json()
            assert [m["from"] for m in timeline] == ["user", "bot"]
            summary = (await ctl.get(f"/conversations/{cid}")).json()
            assert summary["kind"] == "group" and "hmm01" in summary["members"]
            assert any(c["conversationId"] == cid for c in (await ctl.get("/conversations")).json())
            assert (await ctl.get("/conversations/cidNOPE/messages")).status_code == 404

            conns = (await ctl.get("/connections")).json()
            assert conns[0]["acks"][0]["verdict"] == "ok" and conns[0]["frames"][0]["messageId"] == frame[
                "headers"]["messageId"]
            assert "frames" not in (await ctl.get("/connections", params={"frames": "0"})).json()[0]
            conn_id = conns[0]["connectionId"]
            assert (await ctl.get(f"/connections/{conn_id}")).json()["framesSent"] == 1
            assert (await ctl.get("/connections/nope")).status_code == 404
            assert (await ctl.get(f"/frames/{sent['messageId']}")).json()["ack"]["code"] == 200
            assert len((await ctl.get(f"/deliveries/{sent['msgId']}")).json()) == 1
            assert (await ctl.get("/registrations")).json()[0]["outcome"] == "ok"
            assert (await ctl.get("/handshakes")).json() == []
            calls = (await ctl.get("/calls", params={"api": "POST /robot/sendBySession"})).json()
            assert len(calls) == 1 and calls[0]["status"] == 200

            ev = (await ctl.post("/events", json={"eventType": "chat_update_title", "data": {"title": "x"}})).json()
            assert ev["delivered"] and (await client.receive())["headers"]["eventId"] == ev["eventId"]
            assert (await ctl.get("/events")).json()[0]["eventType"] == "chat_update_title"
            cb = (await ctl.post("/callbacks", json={"topic": "/v1.0/im/bot/messages/get", "data": {"x": 1}})).json()
            assert cb["delivered"] and data_of(await client.receive()) == {"x": 1}
            pings = (await ctl.post("/ping")).json()
            assert (await client.receive())["headers"]["messageId"] == pings[0]["messageId"]
            pings = (await ctl.post(f"/connections/{conn_id}/ping")).json()
            assert len(pings) == 1 and (await client.receive())["headers"]["topic"] == "ping"

            stored = (await ctl.post("/files", json={"name": "a.txt", "content": base64.b64encode(b"abc").decode(),
                                                     "mime": "text/plain"})).json()
            assert stored["size"] == 3 and stored["downloadCode"]
            assert any(f["id"] == stored["id"] for f in (await ctl.get("/files")).json())

            ui = (await ctl.get("/ui", params={"conversationId": cid})).json()
            assert ui["online"] == 1 and [m["from"] for m in ui["timeline"]] == ["user", "bot"]
            page = await client.http.get("/")
            assert page.status_code == 200 and 'id="send"' in page.text and "<script>" in page.text

            # Ids are base64-like: "/", "+" and "=" must survive in paths.
            odd = (await ctl.post("/messages", json={"text": "odd", "conversation_type": "group",
                                                     "conversation_id": "cidA/B+C=="})).json()
            assert odd["conversationId"] == "cidA/B+C=="
            assert (await ctl.get("/conversations/cidA/B+C==/timeline")).json()[0]["text"] == "odd"
            assert (await ctl.get("/conversations/cidA/B+C==")).json()["conversationId"] == "cidA/B+C=="
            assert len((await ctl.get(f"/deliveries/{odd['msgId']}")).json()) == 1
            await client.receive()
            missing = await ctl.get("/nothing/here")
            assert missing.status_code == 404 and "no control endpoint" in missing.json()["error"]

            disc = (await ctl.post(f"/connections/{conn_id}/disconnect", json={"reason": "bye"})).json()
            assert disc[0]["payload"] == {"reason": "bye"}
            assert data_of(await client.receive()) == {"reason": "bye"}


@pytest.mark.parametrize(("body", "fragment"), [
    ({}, "'text' is required"),
    ({"text": 1}, "'text' must be str"),
    ({"text": "x", "colour": "red"}, "unknown fields colour"),
    ({"text": "x", "conversation_type": "channel"}, "conversation_type"),
    ({"text": "x", "msgtype": "sticker"}, "msgtype must be one of"),
    ({"text": "x", "at_bot": "yes"}, "'at_bot' must be bool"),
])
async def test_bad_message_requests_get_clear_errors(body: dict[str, Any], fragment: str) -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=f"{emu.base_url}/_emulator") as ctl:
            r = await ctl.post("/messages", json=body)
            assert r.status_code == 400 and fragment in r.json()["error"], r.text
            bad = await ctl.post("/messages", content=b"{oops", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]


async def test_settings_can_be_read_and_tuned_at_run_time() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=f"{emu.base_url}/_emulator") as ctl:
            settings = (await ctl.get("/settings")).json()
            assert "client_secret" not in settings and settings["ticket_ttl"] == 90.0
            assert emu.settings.client_secret not in json.dumps(settings)
            r = await ctl.patch("/settings", json={"push_policy": "newest", "bot_redelivery_delay": 30})
            assert r.status_code == 200 and emu.settings.push_policy == "newest"
            assert emu.settings.bot_redelivery_delay == 30
            for body, fragment in [({"client_secret": "x"}, "cannot change"), ({"nope": 1}, "unknown settings"),
                                   ({"push_policy": "sideways"}, "push_policy"), ({"ticket_ttl": -1}, "ticket_ttl")]:
                r = await ctl.patch("/settings", json=body)
                assert r.status_code == 400 and fragment in r.json()["error"], r.text
            assert emu.settings.push_policy == "newest"


async def test_every_fault_is_reachable_over_http() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=f"{emu.base_url}/_emulator") as ctl:
            r = await ctl.post("/faults/registration", json={"mode": "error", "status": 503, "count": 2})
            assert r.json()["registration"] == {"mode": "error", "status": 503, "remaining": 2}
            async with httpx.AsyncClient(base_url=emu.base_url) as http:
                opened = await http.post("/v1.0/gateway/connections/open", json={"clientId": "a", "clientSecret": "b"})
            assert opened.status_code == 503
            assert (await ctl.delete("/faults/registration")).json()["registration"] is None
            assert (await ctl.post("/faults/registration", json={"mode": "sideways"})).status_code == 400
            await ctl.post("/faults/duplicates", json={"count": 3, "sameMessageId": False})
            await ctl.post("/faults/qps", json={"count": 2, "api": "PUT /v1.0/card/streaming"})
            await ctl.post("/faults/card-delivery", json={"count": 1, "errorMsg": "nope"})
            await ctl.post("/faults/downloads", json={"count": 4})
            faults = (await ctl.get("/faults")).json()
            assert faults["duplicates"] == {"remaining": 3, "sameMessageId": False}
            assert faults["qps"] == {"remaining": 2, "api": "PUT /v1.0/card/streaming"}
            assert faults["cardDelivery"] == {"remaining": 1, "errorMsg": "nope"}
            assert faults["downloads"] == {"remaining": 4}
            cleared = (await ctl.delete("/faults")).json()
            assert cleared["duplicates"]["remaining"] == 0 and cleared["qps"]["remaining"] == 0
            await emu.send_user_message("x")
            assert (await ctl.post("/faults/expire-sessions", json={})).json() == {"expired": 1}
            emu.issue_access_token()
            assert (await ctl.post("/faults/expire-tokens")).json() == {"expired": 1}
            assert (await ctl.post("/faults/expire-tickets")).json() == {"expired": 0}
            assert (await ctl.post("/faults/clock", json={"advance": 30})).json() == {"offset": 30.0}
            assert (await ctl.post("/faults/clock", json={})).status_code == 400
            # Connection faults need a connection; without one they say so.
            for path in ("zombie", "drop", "close", "malformed"):
                r = await ctl.post(f"/faults/{path}", json={})
                assert r.status_code == 409 and "no open Stream connection" in r.json()["error"]
            async with stream_client(emu) as client:
                await emu.wait_for_connection()
                malformed = (await ctl.post("/faults/malformed", json={"kind": "binary"})).json()
                assert malformed[0]["payload"] == {"malformed": "binary"}
                assert client.ws is not None and isinstance(await client.ws.get_message(), bytes)
                big = (await ctl.post("/faults/oversized", json={"size": 300000, "text": "big"})).json()
                assert big["delivered"] and len(await client.ws.get_message()) > 300000
                zombie = (await ctl.post("/faults/zombie", json={})).json()
                assert len(zombie["connections"]) == 1
                closed = (await ctl.post("/faults/close", json={"code": 1001, "reason": "bye"})).json()
                assert closed["connections"] == zombie["connections"]
            async with stream_client(emu):
                await emu.wait_for_connection(2)
                dropped = (await ctl.post("/faults/drop", json={})).json()
                assert len(dropped["connections"]) == 1
