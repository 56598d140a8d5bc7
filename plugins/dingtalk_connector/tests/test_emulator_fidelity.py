"""Fidelity: the official ``dingtalk-stream`` 0.24.x client (PyPI), pointed at the emulator with
``DINGTALK_OPENAPI_ENDPOINT``, registers, receives messages, events, pings and card clicks, answers
with reply_text, reply_markdown and an AI card, survives a ``disconnect`` - and the emulator records
all of it the way DingTalk would see it.

The official client is asyncio + blocking ``requests``: it runs in a subprocess (see
``emulator_official_bot.py``); this module uses trio's real clock and bounds everything with fail_after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dingtalk_stream.version
import pytest
import trio
from host_dingtalk_connector.emulator import BOT_TOPIC, CARD_CALLBACK_TOPIC, open_emulator

pytestmark = pytest.mark.anyio
BOT_SCRIPT = Path(__file__).with_name("emulator_official_bot.py")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def test_the_official_client_is_the_expected_version() -> None:
    assert dingtalk_stream.version.VERSION_STRING.startswith("0.24.")


async def test_official_client_against_the_emulator(tmp_path: Path) -> None:
    log = tmp_path / "official-client.log"
    with trio.fail_after(90):
        async with open_emulator(event_redelivery_delay=0.5) as emu:
            env = {**os.environ, "DINGTALK_OPENAPI_ENDPOINT": emu.base_url, "EMU_CLIENT_ID": emu.settings.client_id,
                   "EMU_CLIENT_SECRET": emu.settings.client_secret, "NO_PROXY": "127.0.0.1,localhost",
                   "no_proxy": "127.0.0.1,localhost"}
            with log.open("wb") as log_file:
                process = await trio.lowlevel.open_process([sys.executable, str(BOT_SCRIPT)], env=env,
                                                           stdout=subprocess.DEVNULL, stderr=log_file)
            try:
                await _scenario(emu)
            except BaseException:
                print(log.read_text(errors="replace")[-5000:])
                raise
            finally:
                process.kill()
                await process.wait()


async def _scenario(emu: Any) -> None:
    first = await emu.wait_for_connection(1)
    (reg,) = emu.registrations()
    assert reg["outcome"] == "ok" and reg["ua"].startswith("dingtalk-sdk-python/v0.24.")
    assert reg["userAgent"].startswith("DingTalkStream/1.0 SDK/0.24.")
    assert reg["subscriptions"] == [{"type": "EVENT", "topic": "*"}, {"type": "CALLBACK", "topic": BOT_TOPIC},
                                    {"type": "CALLBACK", "topic": CARD_CALLBACK_TOPIC}]

    # reply_text in a 1:1 chat, with the SDK's automatic @sender.
    sent = await emu.send_user_message("hello official", sender_staff_id="manager1234", sender_nick="Li Lei")
    (reply,) = await emu.wait_for_bot_message(sent["conversationId"])
    assert (reply["via"], reply["msgtype"], reply["text"]) == ("sessionWebhook", "text", "echo: hello official")
    assert reply["at"] == {"atUserIds": ["manager1234"]}
    ack = await emu.wait_for_ack(sent["messageId"])
    assert (ack["code"], ack["verdict"], ack["parsed"], ack["problems"]) == (200, "ok", {"response": "OK"}, [])

    # reply_markdown in a group (the text arrives with the space DingTalk leaves after "@Bot").
    group = await emu.send_user_message("markdown please", conversation_type="group")
    (md,) = await emu.wait_for_bot_message(group["conversationId"])
    assert (md["msgtype"], md["title"], md["text"]) == ("markdown", "Title", "**markdown please**")

    # An AI card: create + deliver, flowStatus updates, streaming, finish.
    ask = await emu.send_user_message("card now", sender_staff_id="manager1234")
    card = await emu.wait_for_card(conversation_id=ask["conversationId"], state="FINISHED")
    assert card["text"] == "Final answer to card now" and card["cardParamMap"]["msgTitle"] == "AI"
    assert [s["content"] for s in card["streams"]] == ["Thinking", "Thinking about it"]
    assert all(s["isFull"] for s in card["streams"])
    assert card["spaces"][0]["spaceType"] == "IM_ROBOT" and card["spaces"][0]["spaceId"] == "manager1234"
    messages = emu.bot_messages(ask["conversationId"])
    assert [m["via"] for m in messages] == ["sessionWebhook", "card"]
    assert messages[-1]["state"] == "FINISHED" and messages[-1]["text"] == "Final answer to card now"
    card_calls = [c for c in emu.calls() if "/v1.0/card/" in c["path"]]
    assert [c["api"] for c in card_calls] == ["POST /v1.0/card/instances", "POST /v1.0/card/instances/deliver",
                                              "PUT /v1.0/card/instances", "PUT /v1.0/card/streaming",
                                              "PUT /v1.0/card/streaming", "PUT /v1.0/card/instances"]
    assert all(c["status"] == 200 for c in card_calls)
    assert len(emu.calls("POST /v1.0/oauth2/accessToken")) == 1  # the SDK caches its token

    # Events: the SDK echoes the event data in its ACK; a failed one is redelivered.
    ev = await emu.send_event("chat_update_title", {"title": "New name", "chatId": "chat1"})
    ev_ack = await emu.wait_for_ack(ev["messageId"])
    assert ev_ack["verdict"] == "ok" and ev_ack["parsed"] == {"title": "New name", "chatId": "chat1"}
    flaky = await emu.send_event("flaky", {"n": 1})
    deliveries = await emu.wait_for_deliveries(flaky["eventId"], 2)
    second = await emu.wait_for_ack(deliveries[1]["messageId"])
    assert deliveries[0]["ack"]["code"] == 500 and deliveries[0]["ack"]["verdict"] == "error"
    assert second["verdict"] == "ok"

    # A card click answered over the Stream within 2 s updates the card.
    click = await emu.click_card(card["outTrackId"], user_id="manager1234", action_ids=["ok"])
    assert click["verdict"] == "ok" and click["applied"] is True
    assert emu.card(card["outTrackId"])["cardParamMap"]["status"] == "clicked by manager1234"

    # SYSTEM ping: the opaque comes back.
    (ping,) = await emu.ping()
    assert (await emu.wait_for_ack(ping["messageId"]))["verdict"] == "ok"

    # SYSTEM disconnect: the SDK ACKs it, closes with 1000 and reconnects with a new ticket.
    (disc,) = await emu.disconnect(first["connectionId"], reason="persistent connection is timeout")
    second_conn = await emu.wait_for_connection(2)
    closed = await emu.wait_for_connection_closed(first["connectionId"])
    assert (closed["closedBy"], closed["closeCode"]) == ("client", 1000)
    assert (await emu.wait_for_ack(disc["messageId"]))["parsed"] == {"reason": "persistent connection is timeout"}
    assert len(emu.registrations()) == 2 and emu.registrations()[1]["ticket"] != reg["ticket"]
    after = await emu.send_user_message("after reconnect", sender_staff_id="manager1234")
    assert after["connectionId"] == second_conn["connectionId"]
    replies = await emu.wait_for_bot_message(after["conversationId"], 3)
    assert replies[-1]["text"] == "echo: after reconnect"
    conn_log = emu.connection(first["connectionId"])
    assert all(f["ack"] is not None for f in conn_log["frames"] if f["expectAck"])
