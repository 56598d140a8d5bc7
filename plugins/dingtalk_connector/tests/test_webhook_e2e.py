"""Webhook mode end to end: real Host with its HTTP server, the connector in webhook mode, the
emulator POSTing signed callbacks (``emulator.callbacks``), real sockets on 127.0.0.1.

Rules for this module: the real clock with short configured waits (``webhookkit.FAST_WEBHOOK``), an
absolute ``trio.fail_after`` around every test body, no sleeps to "let things happen": the driver
returns when the HTTP answer is in, and the emulator's ``wait_*`` helpers wait for replies.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.emulator.callbacks import open_callbacks, sign_callback
from host_dingtalk_connector.webhook_connector import WebhookConnector
from streamkit import Recorder, app_table
from webhookkit import AuditRecorder, open_webhook_host, webhook_config

from host import Reply, hookimpl
from host.errors import ConfigError

LIMIT = 30  # seconds, real clock: generous for a loaded 2-core machine


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


@pytest.mark.anyio
async def test_signed_callback_gets_exactly_one_inline_reply(host_logs: Any) -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("recorder", recorder)) as running:  # fmt: skip
            assert isinstance(running.connector, WebhookConnector)
            assert running.connector.is_ready() and running.host.is_ready()
            assert running.connector.streams == {}  # webhook mode opens no Stream connection
            assert emu.registrations() == []
            record = await callbacks.send_user_message(
                running.callback_url, "build status?", conversation_type="group", conversation_title="Ops"
            )
            assert record.status == 200 and record.outcome == "answered", record.to_dict()
            assert record.response == {"msgtype": "text", "text": {"content": "echo: build status?"}}
            replies = emu.bot_messages(record.conversation_id or "")
            assert [(r["via"], r["text"]) for r in replies] == [("callbackResponse", "echo: build status?")]
            assert emu.calls("POST /robot/sendBySession") == []  # answered once, inline only
            (message,) = recorder.messages
            # The same host Message a Stream push produces.
            assert message.id == record.msg_id and message.connector == "dingtalk" and message.app_id == "default"
            assert message.conversation.type == "group" and message.conversation.title == "Ops"
            assert message.text == "build status?" and message.mentions_bot is True
            assert message.sender.platform_ids["staffId"] == "user0001"
            assert message.context["inbound"] == "http_callback"
            assert running.metric("host_dingtalk_webhook_requests_total", outcome="accepted") == 1
            assert running.metric("host_dingtalk_webhook_answers_total", how="inline") == 1
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="text", outcome="accepted") == 1
            async with httpx.AsyncClient() as client:
                ready = await client.get(running.host.http.url + "/readyz")
            assert ready.status_code == 200 and ready.json()["connectors"] == {"dingtalk": True}
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_a_slow_answer_goes_through_the_session_webhook_once() -> None:
    recorder = Recorder(slow_seconds=1.5)  # longer than inline_reply_timeout (1.0)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("recorder", recorder)) as running:  # fmt: skip
            record = await callbacks.send_user_message(running.callback_url, "take your time")
            assert record.status == 200 and record.outcome == "empty" and record.response == {"msgtype": "empty"}
            replies = await emu.wait_for_bot_message(record.conversation_id or "")
            assert [(r["via"], r["text"]) for r in replies] == [("sessionWebhook", "echo: take your time")]
            await running.host.wait_idle()
            assert len(emu.bot_messages(record.conversation_id or "")) == 1
            assert running.metric("host_dingtalk_webhook_answers_total", how="empty") == 1


@pytest.mark.anyio
async def test_inline_answers_can_be_turned_off() -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu, webhook={"inline_reply_timeout": 0}),
                                  ("recorder", recorder)) as running:  # fmt: skip
            record = await callbacks.send_user_message(running.callback_url, "hi")
            assert record.outcome == "empty"
            replies = await emu.wait_for_bot_message(record.conversation_id or "")
            assert [(r["via"], r["text"]) for r in replies] == [("sessionWebhook", "echo: hi")]


class Streamer:
    """Answers with a streamed reply (no card template: sent as one markdown message at the end)."""

    @hookimpl
    async def on_message(self, message: Any) -> Any:
        async def chunks() -> Any:
            for part in ("stream", "ed ", "answer"):
                yield part

        return chunks()


@pytest.mark.anyio
async def test_a_streamed_answer_releases_the_request_at_once() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu, webhook={"inline_reply_timeout": 20, "callback_response_timeout": 30}),
                                  ("streamer", Streamer())) as running:  # fmt: skip
            with trio.fail_after(10):  # far less than the 20 s inline wait: released by open_stream
                record = await callbacks.send_user_message(running.callback_url, "stream please")
            assert record.outcome == "empty"
            replies = await emu.wait_for_bot_message(record.conversation_id or "")
            assert [r["text"] for r in replies] == ["streamed answer"]


@pytest.mark.anyio
async def test_tampered_stale_replayed_and_forged_callbacks_are_refused(host_logs: Any) -> None:
    recorder, audit = Recorder(), AuditRecorder()
    secret = "emulator-secret-0123456789"
    with trio.fail_after(LIMIT):
        async with open_emulator(client_secret=secret) as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("recorder", recorder), ("audit", audit)) as running:  # fmt: skip
            url = running.callback_url
            genuine = await callbacks.send_user_message(url, "genuine")
            assert genuine.outcome == "answered"

            replay = await callbacks.replay(genuine)
            assert (replay.status, replay.response["error"]) == (409, "replay")

            tampered_body = json.loads(genuine.body)
            tampered_body["text"]["content"] = "transfer all the money"
            tampered = await callbacks.replay(genuine, body=json.dumps(tampered_body).encode())
            assert (tampered.status, tampered.response["error"]) == (503, "signature_reused")

            stale_ms = emu.state.clock.epoch_ms() - 2 * 3600 * 1000
            stale = await callbacks.send_user_message(url, "old news", timestamp_ms=stale_ms)
            assert (stale.status, stale.response["error"]) == (401, "outside_window")

            forged = await callbacks.send_user_message(url, "forged", secret="not-the-app-secret")
            assert (forged.status, forged.response["error"]) == (401, "bad_sign")

            other_robot = await callbacks.send_user_message(
                url, "for someone else", tamper=lambda p: {**p, "robotCode": "dingsomeoneelse"}
            )
            assert (other_robot.status, other_robot.response["error"]) == (400, "robot_mismatch")

            unsigned = await callbacks.post(url, genuine.body, {"content-type": "application/json"})
            assert (unsigned.status, unsigned.response["error"]) == (401, "missing_headers")

            assert [m.text for m in recorder.messages] == ["genuine"]  # nothing else got through
            assert len(emu.bot_messages(genuine.conversation_id or "")) == 1
            for outcome in ("replay", "signature_reused", "outside_window", "bad_sign", "robot_mismatch",
                            "missing_headers"):  # fmt: skip
                assert running.metric("host_dingtalk_webhook_requests_total", outcome=outcome) == 1, outcome

            # Audit: the first refusal at once, the rest summarised (audit_interval = 1 s here).
            while len(audit.security()) < 2:
                await trio.sleep(0.05)
            actions = [e.action for e in audit.security()]
            assert actions[0] == "webhook_rejected" and actions[1:] == ["webhook_rejected_summary"], actions
            first, summary = audit.security()
            assert first.details["reason"] == "replay" and first.target == "/dingtalk/callback"
            assert summary.details["total"] == 5
            assert set(summary.details["counts"]) == {"signature_reused", "outside_window", "bad_sign",
                                                      "robot_mismatch", "missing_headers"}  # fmt: skip
            everything = host_logs.text() + repr([e for e in audit.entries])
            assert secret not in everything
            for record in (genuine, forged, stale):
                assert record.headers["sign"] not in everything  # signatures are not logged either
            reasons = " ".join(host_logs.messages("WARNING"))
            for reason in ("replay", "signature_reused", "outside_window", "bad_sign", "robot_mismatch"):
                assert f"({reason})" in reasons
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_a_redelivery_with_a_fresh_signature_is_acknowledged_not_processed() -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("recorder", recorder)) as running:  # fmt: skip
            first = await callbacks.send_user_message(running.callback_url, "once")
            assert first.outcome == "answered"
            timestamp = str(emu.state.clock.epoch_ms() + 1)
            again = await callbacks.post(running.callback_url, first.body, {
                "content-type": "application/json", "timestamp": timestamp,
                "sign": sign_callback(emu.settings.client_secret, timestamp)})  # fmt: skip
            assert again.status == 200 and again.response == {"msgtype": "empty"}
            await running.host.wait_idle()
            assert len(recorder.messages) == 1
            assert running.metric("host_dingtalk_webhook_requests_total", outcome="duplicate") == 1


@pytest.mark.anyio
async def test_a_full_queue_answers_503_and_the_retry_is_accepted() -> None:
    recorder = Recorder(gate=trio.Event())
    host_settings = {"queue_size": 1, "concurrency": 1}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu, webhook={"inline_reply_timeout": 0}),
                                  ("recorder", recorder), host_settings=host_settings) as running:  # fmt: skip
            url = running.callback_url
            first = await callbacks.send_user_message(url, "one")  # taken by the only worker
            while recorder.started != [first.msg_id]:
                await trio.sleep(0.005)
            second = await callbacks.send_user_message(url, "two")  # fills the queue
            assert (first.outcome, second.outcome) == ("empty", "empty")
            third = await callbacks.send_user_message(url, "three")
            assert third.status == 503 and third.response["error"] == "busy"
            # The exact same request may be retried: it was not processed, so it is no replay.
            assert recorder.gate is not None
            recorder.gate.set()
            await running.host.wait_idle()
            retry = await callbacks.replay(third)
            assert retry.status == 200, retry.to_dict()
            await running.host.wait_idle()
            assert [m.text for m in recorder.messages] == ["one", "two", "three"]
            assert running.metric("host_dingtalk_webhook_requests_total", outcome="busy") == 1


@pytest.mark.anyio
async def test_a_stopped_connector_answers_503_not_serving() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("recorder", Recorder())) as running:  # fmt: skip
            await running.connector.stop()
            assert not running.connector.is_ready()
            record = await callbacks.send_user_message(running.callback_url, "anyone?")
            assert (record.status, record.response["error"]) == (503, "not_serving")


@pytest.mark.anyio
async def test_both_mode_takes_stream_pushes_and_callbacks() -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu, mode="both"), ("recorder", recorder)) as running:  # fmt: skip
            assert running.connector.is_ready() and len(emu.connections()) == 1
            pushed = await emu.send_user_message("via stream")
            await emu.wait_for_ack(pushed["messageId"])
            posted = await callbacks.send_user_message(running.callback_url, "via http")
            assert posted.outcome == "answered"
            replies = await emu.wait_for_bot_message(pushed["conversationId"], 2)
            assert sorted((r["via"], r["text"]) for r in replies) == [
                ("callbackResponse", "echo: via http"), ("sessionWebhook", "echo: via stream")]


@pytest.mark.anyio
async def test_several_apps_share_the_callback_path() -> None:
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks:
            dingtalk = {
                "mode": "webhook",
                "webhook": {"inline_reply_timeout": 1.0},
                "apps": {
                    "sales": app_table(emu),
                    "support": {**app_table(emu), "client_id": "dingsupport", "client_secret": "SECsupport"},
                },
            }
            async with open_webhook_host(dingtalk, ("recorder", recorder)) as running:
                record = await callbacks.send_user_message(
                    running.callback_url, "for support", secret="SECsupport",
                    tamper=lambda p: {**p, "robotCode": "dingsupport"},
                )  # fmt: skip
                assert record.outcome == "answered"
                assert [m.app_id for m in recorder.messages] == ["support"]


@pytest.mark.anyio
async def test_reply_mentions_follow_the_reply_settings() -> None:
    class Mentioner:
        @hookimpl
        def on_message(self, message: Any) -> Reply:
            return Reply(text="noted", mention_sender=True)

    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_callbacks(emu) as callbacks, \
                open_webhook_host(webhook_config(emu), ("m", Mentioner())) as running:  # fmt: skip
            record = await callbacks.send_user_message(running.callback_url, "hi", conversation_type="group")
            assert record.response == {"msgtype": "text", "text": {"content": "@user0001 noted"},
                                       "at": {"atUserIds": ["user0001"]}}  # fmt: skip


def test_webhook_mode_needs_the_http_server(host_logs: Any) -> None:
    from host_dingtalk_connector import plugin as dingtalk_plugin

    from host.config import load_config
    from host.runtime import build_host

    data = {"logging": {"dir": ""}, "http": {"enabled": False}, "host": {"control_socket": ""},
            "dingtalk": {"client_id": "dingx", "client_secret": "s", "mode": "webhook"}}  # fmt: skip
    host = build_host(load_config(data=data, environ={}), plugins=[("dingtalk_connector", dingtalk_plugin)],
                      entry_points=False)  # fmt: skip
    assert "dingtalk" not in host.connectors
    assert any("[http] enabled" in line for line in host_logs.messages()), host_logs.messages()


def test_an_unknown_mode_is_a_config_error() -> None:
    from host_dingtalk_connector import plugin as dingtalk_plugin

    from host.config import load_config
    from host.runtime import build_host

    data = {"logging": {"dir": ""}, "http": {"enabled": False}, "host": {"control_socket": ""},
            "dingtalk": {"client_id": "dingx", "client_secret": "s", "mode": "carrier-pigeon"}}  # fmt: skip
    with pytest.raises(ConfigError, match="mode"):
        build_host(load_config(data=data, environ={}), plugins=[("dingtalk_connector", dingtalk_plugin)],
                   entry_points=False)  # fmt: skip


def test_bad_webhook_settings_are_config_errors_naming_the_key() -> None:
    from host_dingtalk_connector import plugin as dingtalk_plugin

    from host.config import load_config
    from host.runtime import build_host

    for webhook, key in (({"window_seconds": 0}, "window_seconds"), ({"path": "relative"}, "path"),
                         ({"inline_reply_timeout": -1}, "inline_reply_timeout"), ({"unknown": 1}, "unknown")):  # fmt: skip
        data = {"logging": {"dir": ""}, "http": {"enabled": True, "addr": "127.0.0.1:0"},
                "host": {"control_socket": ""},
                "dingtalk": {"client_id": "dingx", "client_secret": "s", "mode": "webhook", "webhook": webhook}}  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            build_host(load_config(data=data, environ={}), plugins=[("dingtalk_connector", dingtalk_plugin)],
                       entry_points=False)  # fmt: skip
