"""The emulator's webhook-mode driver (``emulator.callbacks``) against a scripted bot: a tiny
Starlette app on a real hypercorn server, written from the protocol reference only (it does not use
the connector), so these tests check the emulator, not our connector.

Real clock, short waits, an absolute ``trio.fail_after`` around every test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio
from host_dingtalk_connector.emulator import open_callbacks, open_emulator
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

pytestmark = pytest.mark.anyio
LIMIT = 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


class ScriptedBot:
    """Verifies each callback as the reference says, records it, and answers per ``answer``."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: list[dict[str, Any]] = []
        self.answer: Any = {"msgtype": "markdown", "markdown": {"title": "Hi", "text": "**hi**"}}
        self.delay = 0.0

    async def callback(self, request: Request) -> Response:
        timestamp, sign = request.headers["timestamp"], request.headers["sign"]
        mac = hmac.new(self.secret.encode(), f"{timestamp}\n{self.secret}".encode(), hashlib.sha256)
        valid = hmac.compare_digest(base64.b64encode(mac.digest()).decode(), sign)
        self.received.append({"timestamp": int(timestamp), "valid": valid, "body": await request.json(),
                              "content_type": request.headers.get("content-type")})  # fmt: skip
        if self.delay:
            await trio.sleep(self.delay)
        return JSONResponse(self.answer)


@asynccontextmanager
async def serve_app(app: Starlette) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) until the block ends; yields its base URL."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        (bound,) = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))
        yield bound
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def serve_bot(bot: ScriptedBot) -> AsyncIterator[str]:
    async with serve_app(Starlette(routes=[Route("/cb", bot.callback, methods=["POST"])])) as base:
        yield f"{base}/cb"


async def test_a_signed_callback_and_its_inline_answer_are_recorded() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks:
            bot = ScriptedBot(emu.settings.client_secret)
            async with serve_bot(bot) as url:
                record = await callbacks.send_user_message(url, "hello", conversation_type="group")
            (received,) = bot.received
            assert received["valid"] is True
            assert received["content_type"] == "application/json; charset=utf-8"
            assert abs(received["timestamp"] - emu.state.clock.epoch_ms()) < 60_000
            body = received["body"]
            assert body["msgId"] == record.msg_id and body["text"] == {"content": " hello"}
            assert body["sessionWebhook"].startswith(emu.webhook_url + "/robot/sendBySession?session=")
            assert record.status == 200 and record.outcome == "answered"
            timeline = emu.timeline(record.conversation_id or "")
            assert [(m["from"], m.get("via"), m["text"]) for m in timeline] == [
                ("user", None, "hello"), ("bot", "callbackResponse", "**hi**")]
            assert timeline[0]["delivered"] is True
            assert callbacks.to_list()[0]["inlineReply"]["title"] == "Hi"


async def test_answers_dingtalk_would_not_take_are_flagged() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks:
            bot = ScriptedBot(emu.settings.client_secret)
            async with serve_bot(bot) as url:
                bot.answer = {"msgtype": "empty"}
                empty = await callbacks.send_user_message(url, "a")
                bot.answer = {"msgtype": "image", "image": {}}
                bad = await callbacks.send_user_message(url, "b")
            assert empty.outcome == "empty" and emu.bot_messages(empty.conversation_id or "") == []
            assert bad.outcome == "bad_answer" and "400105" in bad.error


async def test_timeouts_errors_and_undeliverable_messages() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu, answer_timeout=0.2) as callbacks:
            bot = ScriptedBot(emu.settings.client_secret)
            async with serve_bot(bot) as url:
                bot.delay = 1.0
                slow = await callbacks.send_user_message(url, "slow")
                silent = await callbacks.send_user_message(url, "unheard", conversation_type="group", at_bot=False)
            gone = await callbacks.send_user_message(url, "nobody home")  # the server is stopped now
            assert slow.outcome == "timeout" and slow.status is None
            assert silent.outcome == "not_delivered" and len(bot.received) == 1
            assert gone.outcome == "error"
            user_messages = [m for m in emu.timeline(slow.conversation_id or "") if m["from"] == "user"]
            assert [m["delivered"] for m in user_messages] == [False, False]


async def test_signing_options_and_replays() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks:
            bot = ScriptedBot(emu.settings.client_secret)
            async with serve_bot(bot) as url:
                emu.faults.advance_clock(7200)  # DingTalk's clock two hours ahead
                ahead = await callbacks.send_user_message(url, "from the future")
                wrong = await callbacks.send_user_message(url, "forged", secret="guess")
                tampered = await callbacks.send_user_message(url, "x", tamper=lambda p: {**p, "robotCode": "other"})
                again = await callbacks.replay(ahead)
                custom = await callbacks.send_user_message(url, "y", timestamp_ms=123, sign="not-a-sign")
            assert bot.received[0]["timestamp"] >= (time.time() + 7200 - 60) * 1000  # signed on the emulator clock
            assert [r["valid"] for r in bot.received] == [True, False, True, True, False]
            assert bot.received[2]["body"]["robotCode"] == "other"
            assert bot.received[3] == bot.received[0] and again.replay_of == ahead.seq
            assert custom.headers["timestamp"] == "123" and custom.headers["sign"] == "not-a-sign"
            assert wrong.outcome == tampered.outcome == "answered"  # this bot does not refuse anything


async def test_the_control_api_drives_webhook_mode() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            bot = ScriptedBot(emu.settings.client_secret)
            async with serve_bot(bot) as url, httpx.AsyncClient(base_url=emu.base_url) as http:
                sent = await http.post("/_emulator/webhook-callbacks",
                                       json={"url": url, "text": "hi", "conversationType": "group"})
                assert sent.status_code == 200, sent.text
                record = sent.json()
                assert record["outcome"] == "answered" and record["status"] == 200
                assert record["inlineReply"]["via"] == "callbackResponse"
                again = await http.post(f"/_emulator/webhook-callbacks/{record['seq']}/replay")
                assert again.json()["replayOf"] == record["seq"]
                stale = await http.post("/_emulator/webhook-callbacks",
                                        json={"url": url, "text": "x", "timestampMs": 5, "secret": "guess"})
                assert stale.json()["timestamp"] == "5"
                listed = (await http.get("/_emulator/webhook-callbacks")).json()
                assert [r["seq"] for r in listed] == [record["seq"], again.json()["seq"], stale.json()["seq"]]
                assert [r["valid"] for r in bot.received] == [True, True, False]
                for bad, message in (({"text": "no url"}, "'url' is required"),
                                     ({"url": url, "topic": "/x"}, "'topic' does not apply"),
                                     ({"url": url, "timestampMs": "soon"}, "'timestampMs'"),
                                     ({"url": url, "nonsense": 1}, "unknown fields nonsense")):  # fmt: skip
                    refused = await http.post("/_emulator/webhook-callbacks", json=bad)
                    assert refused.status_code == 400 and message in refused.json()["error"], refused.text
                missing = await http.post("/_emulator/webhook-callbacks/999999/replay")
                assert missing.status_code == 404
