"""Red-team tests: the bot must not go silent, nor answer (or act on) one thing twice, across
reconnects (peers.md 12-A/12-B; complaints 1 and 2 of section 15).

Rules for this module (as ``test_stream_timing.py``): ``MockClock(autojump_threshold=0.1)`` so that
timers (redelivery, slow handlers, backoff) run in virtual time while loopback socket exchanges stay
real; an absolute ``trio.fail_after`` around every test; assertions about what happened, never how
long it took.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from host_dingtalk_connector.emulator import CARD_CALLBACK_TOPIC, open_emulator
from streamkit import Recorder, dingtalk_config, open_host

from host import Event, hookimpl

LIMIT = 3600  # virtual seconds


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0.1)})


async def wait_for(predicate: Any) -> None:
    """Poll host-side state that settles within a few loopback round trips (10 ms virtual steps)."""
    while not predicate():
        await trio.sleep(0.01)


@dataclass
class SlowEvents:
    """A plugin whose ``on_event`` takes ``seconds`` (well within the host's 30 s hook timeout)."""

    seconds: float = 20.0
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    @hookimpl
    async def on_event(self, event: Event) -> None:
        self.started.append(event.type)
        await trio.sleep(self.seconds)
        self.finished.append(event.type)


CARD_CLICK = {
    "type": "actionCallback",
    "outTrackId": "card_silence_1",
    "corpId": "ding5a1b2c3d4e5f6789",
    "userId": "user0001",
    "content": json.dumps({"cardPrivateData": {"actionIds": ["btn_go"], "params": {"action": "go"}}}),
}


@pytest.mark.anyio
async def test_card_click_being_handled_survives_a_dropped_connection() -> None:
    """A card click is ACKed on acceptance (DingTalk gives 2 s), so DingTalk never redelivers it: if
    its handler were cancelled because the socket it came in on dropped, the click would be lost in
    silence. The handler must run to completion on its own."""
    plugin = SlowEvents(seconds=20.0)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("slow", plugin)) as running:
            first = await emu.wait_for_connection(1)
            sent = await emu.send_callback(CARD_CALLBACK_TOPIC, CARD_CLICK)
            assert (await emu.wait_for_ack(sent["messageId"]))["verdict"] == "ok"
            await wait_for(lambda: plugin.started == ["card_callback"])
            await emu.faults.drop(first["connectionId"])  # a network blip while the handler runs
            await emu.wait_for_connection(2)
            await trio.sleep(60)  # far past the handler's 20 s
            assert plugin.finished == ["card_callback"]
            assert running.metric("host_dingtalk_events_total", app="default", outcome="success") == 1


@pytest.mark.anyio
async def test_event_being_handled_across_a_reconnect_is_handled_once() -> None:
    """An EVENT is ACKed after ``on_event``. When its connection drops meanwhile, the handler must
    still finish (not be cancelled half way and run again from the start on the redelivery), and
    the redelivery on the new connection is answered SUCCESS from that outcome."""
    plugin = SlowEvents(seconds=20.0)
    with trio.fail_after(LIMIT):
        async with open_emulator(event_redelivery_delay=3.0, event_max_redeliveries=30) as emu, open_host(
            dingtalk_config(emu), ("slow", plugin)
        ):
            first = await emu.wait_for_connection(1)
            sent = await emu.send_event("approval_finished", {"processInstanceId": "p1"})
            await wait_for(lambda: plugin.started == ["approval_finished"])
            await emu.faults.drop(first["connectionId"])
            await emu.wait_for_connection(2)
            acked = await emu.wait_until(
                lambda: [d for d in emu.deliveries(sent["eventId"]) if d["ack"] and d["ack"]["verdict"] == "ok"] or None
            )
            assert plugin.started == ["approval_finished"]  # not started a second time
            assert plugin.finished == ["approval_finished"]
            assert len(acked) == 1


@pytest.mark.anyio
async def test_a_handler_that_outlived_its_connection_is_still_bounded_by_shutdown(host_logs: Any) -> None:
    """Handlers no longer die with their socket, but stopping the app still ends them (after
    ``shutdown_timeout``): shutdown is never held up by a hanging handler."""
    plugin = SlowEvents(seconds=100_000.0)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            async with open_host(dingtalk_config(emu), ("slow", plugin)):
                first = await emu.wait_for_connection(1)
                sent = await emu.send_callback(CARD_CALLBACK_TOPIC, CARD_CLICK)
                await emu.wait_for_ack(sent["messageId"])
                await wait_for(lambda: plugin.started == ["card_callback"])
                await emu.faults.drop(first["connectionId"])
                await emu.wait_for_connection(2)
            # The host stopped (within LIMIT, far below the handler's 100 000 s): it was cancelled.
            assert plugin.finished == []
    assert any("cancelled at stop" in w for w in host_logs.messages("WARNING"))


@pytest.mark.anyio
async def test_message_whose_ack_was_lost_is_answered_once_after_a_reconnect() -> None:
    """The ACK of an accepted message never reaches DingTalk, the connection drops, and DingTalk
    redelivers the message (new frame messageId, same msgId) on the new connection: ACKed there,
    answered once."""
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator(bot_redelivery_delay=20.0, bot_max_redeliveries=3) as emu, open_host(
            dingtalk_config(emu), ("recorder", recorder)
        ) as running:
            first = await emu.wait_for_connection(1)
            emu.faults.lose_acks(1)
            sent = await emu.send_user_message("did you get this?")
            await emu.wait_for_bot_message(sent["conversationId"])  # answered on the first connection
            await emu.faults.drop(first["connectionId"])
            second = await emu.wait_for_connection(2)
            frames = await emu.wait_until(
                lambda: [d for d in emu.deliveries(sent["msgId"]) if d["ack"] is not None] or None
            )
            (redelivered,) = frames
            assert redelivered["connectionId"] == second["connectionId"]
            assert redelivered["messageId"] != sent["messageId"] and redelivered["ack"]["verdict"] == "ok"
            await trio.sleep(60)  # time for a second answer to show up, if one were coming
            assert [r["text"] for r in emu.bot_messages(sent["conversationId"])] == ["echo: did you get this?"]
            assert [m.id for m in recorder.messages] == [sent["msgId"]]
            assert running.metric("host_dingtalk_redeliveries_total", app="default") == 1


@pytest.fixture
def restore_modules() -> Iterator[None]:
    """A plugin reload re-imports ``host_dingtalk_connector``: put the original modules back."""
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] == "host_dingtalk_connector"}
    yield
    for key in [k for k in sys.modules if k.split(".")[0] == "host_dingtalk_connector"]:
        del sys.modules[key]
    sys.modules.update(saved)


@pytest.mark.anyio
async def test_redelivery_after_a_hot_reload_is_answered_once(restore_modules: None) -> None:
    """As above, but the connector plugin is hot-reloaded instead of the socket dropping: the new
    connector must remember what the old one already accepted."""
    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator(bot_redelivery_delay=20.0, bot_max_redeliveries=3) as emu, open_host(
            dingtalk_config(emu), ("recorder", recorder)
        ) as running:
            await emu.wait_for_connection(1)
            emu.faults.lose_acks(1)
            sent = await emu.send_user_message("did you get this?")
            await emu.wait_for_bot_message(sent["conversationId"])
            result = await running.host.reloader.reload_plugin("dingtalk_connector", reason="test")
            assert result.outcome == "reloaded", result
            await emu.wait_until(lambda: [d for d in emu.deliveries(sent["msgId"]) if d["ack"] is not None] or None)
            await trio.sleep(60)
            answers = [r["text"] for r in emu.bot_messages(sent["conversationId"])]
    # Asserted after a clean shutdown (a failure inside the block would unwind the reload mid-way).
    assert answers == ["echo: did you get this?"]
    assert [m.id for m in recorder.messages] == [sent["msgId"]]


@dataclass
class CountsConcurrentEvents(SlowEvents):
    running: int = 0
    most_at_once: int = 0

    @hookimpl
    async def on_event(self, event: Event) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await SlowEvents.on_event(self, event)
        finally:
            self.running -= 1


@pytest.mark.anyio
async def test_event_being_handled_is_not_started_again_by_the_reloaded_connector(restore_modules: None) -> None:
    """The connector plugin is reloaded while an EVENT is being handled: the old version's handler
    runs on to its end (it outlives its connections, and the old connector's stop gives it
    ``reload_handler_timeout``), and DingTalk's redeliveries to the new connector meanwhile must not
    start the same event a second time beside it."""
    plugin = CountsConcurrentEvents(seconds=20.0)
    with trio.fail_after(LIMIT):
        async with open_emulator(event_redelivery_delay=1.0, event_max_redeliveries=60) as emu, open_host(
            dingtalk_config(emu), ("slow", plugin)
        ) as running:
            await emu.wait_for_connection(1)
            sent = await emu.send_event("approval_finished", {"processInstanceId": "p2"})
            await wait_for(lambda: plugin.started == ["approval_finished"])
            result = await running.host.reloader.reload_plugin("dingtalk_connector", reason="test")
            assert result.outcome == "reloaded", result
            await trio.sleep(90)  # redeliveries every second to the new connector, past the handler's 20 s
            most_at_once, started, finished = plugin.most_at_once, list(plugin.started), list(plugin.finished)
    assert most_at_once == 1  # never two runs of the one event at the same time
    # Not cancelled by the old connector's stop (reload_handler_timeout, not shutdown_timeout) and
    # run again from the start: started once, finished once.
    assert (started, finished) == (["approval_finished"], ["approval_finished"])
    assert any(d["ack"] and d["ack"]["verdict"] == "ok" for d in emu.deliveries(sent["eventId"]))
