"""Connection behaviour that depends on timers, under trio's virtual clock, over real sockets.

Rules for this module: ``MockClock(autojump_threshold=0.1)``: when every task has been blocked for
0.1 s of *real* time, the clock jumps to the next deadline. Loopback I/O completes far faster, so
timers (keepalive, watchdog, backoff, redelivery, 30 s plugins) fire in virtual time while socket
exchanges stay real. Every test has an absolute ``trio.fail_after`` in virtual seconds, set far
beyond the timers it exercises. Assertions are about what happened (reasons, counts, order of
events), never about how long it took.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.stream import AppStream
from streamkit import Recorder, dingtalk_config, open_host

LIMIT = 3600  # virtual seconds


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0.1)})


async def wait_for(predicate: Any) -> None:
    """Poll host-side state that settles within a few loopback round trips.

    Only for short waits: each poll is a 10 ms timer, and under autojump the virtual clock then only
    advances by 10 ms per 0.1 s of real time. Waits on long timers use the emulator's ``wait_*``
    helpers (signalled, no polling) or a plain virtual ``trio.sleep``.
    """
    while not predicate():
        await trio.sleep(0.01)


def stream_of(running: Any) -> AppStream:
    return running.connector.streams["default"]


@pytest.mark.anyio
async def test_zombie_connection_is_caught_by_the_inbound_watchdog() -> None:
    recorder = Recorder()
    # No WebSocket pings: only the "nothing received for idle_timeout" watchdog can notice.
    stream = {"ping_interval": 100_000.0, "idle_timeout": 60.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream), ("recorder", recorder)) as running:
            first = await emu.wait_for_connection(1)
            emu.faults.zombie()
            second = await emu.wait_for_connection(2)
            await emu.wait_for_connection_closed(first["connectionId"])
            assert stream_of(running).reconnects == {"idle": 1}
            assert running.metric("host_dingtalk_reconnects_total", app="default", reason="idle") == 1
            sent = await emu.send_user_message("still there?")
            assert sent["connectionId"] == second["connectionId"]
            replies = await emu.wait_for_bot_message(sent["conversationId"])
            assert [r["text"] for r in replies] == ["echo: still there?"]


@pytest.mark.anyio
async def test_zombie_connection_is_caught_by_the_pong_deadline() -> None:
    stream = {"ping_interval": 20.0, "pong_timeout": 10.0, "idle_timeout": 10_000.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream)) as running:
            first = await emu.wait_for_connection(1)
            # Healthy pings first (at 20 s and 40 s): the emulator's relay counts them.
            await trio.sleep(45)
            assert (emu.connection(first["connectionId"])["clientPings"] or 0) >= 2
            assert stream_of(running).reconnects == {}
            emu.faults.zombie()
            await emu.wait_for_connection(2)
            assert stream_of(running).reconnects == {"pong_timeout": 1}


@pytest.mark.anyio
async def test_abrupt_drop_reconnects_with_growing_backoff() -> None:
    stream = {"backoff_base": 1.0, "backoff_cap": 60.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream)) as running:
            await emu.wait_for_connection(1)
            engine = stream_of(running)
            # The gateway is down for the next three attempts.
            emu.faults.refuse_registration("error", status=503, count=3)
            await emu.faults.drop()
            second = await emu.wait_for_connection(2)
            assert engine.reconnects == {"dropped": 1, "register_failed": 3}
            ceilings = [ceiling for ceiling, _delay in engine.delays]
            assert ceilings == [1.0, 2.0, 4.0, 8.0]
            assert all(0 <= delay <= ceiling for ceiling, delay in engine.delays)
            statuses = [r["status"] for r in emu.registrations()]
            assert statuses == [200, 503, 503, 503, 200]
            # A fresh ticket for every attempt: each successful registration's ticket is used once.
            tickets = [r["ticket"] for r in emu.registrations() if r.get("ticket")]
            assert len(set(tickets)) == len(tickets) == 2
            assert second["state"] == "open" and running.connector.is_ready()


@pytest.mark.anyio
async def test_backoff_resets_only_after_a_healthy_period() -> None:
    stream = {"backoff_base": 1.0, "healthy_after": 60.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream)) as running:
            engine = stream_of(running)
            await emu.wait_for_connection(1)
            await emu.faults.drop()  # short-lived connection: no reset
            await emu.wait_for_connection(2)
            await emu.faults.drop()
            await emu.wait_for_connection(3)
            assert [c for c, _d in engine.delays] == [1.0, 2.0]
            await trio.sleep(120)  # this one stays healthy past healthy_after
            await emu.faults.drop()
            await emu.wait_for_connection(4)
            assert [c for c, _d in engine.delays] == [1.0, 2.0, 1.0]


@pytest.mark.anyio
async def test_registration_timeout_is_retried() -> None:
    stream = {"register_timeout": 10.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            emu.faults.refuse_registration("timeout")
            async with open_host(dingtalk_config(emu, stream={**stream, "startup_wait": 1.0})) as running:
                engine = stream_of(running)
                assert not running.connector.is_ready()
                await trio.sleep(40)  # two or more attempts time out after register_timeout
                assert engine.reconnects.get("register_failed", 0) >= 2
                emu.faults.clear_registration()
                await emu.wait_for_connection(1)
                await wait_for(running.connector.is_ready)


@pytest.mark.anyio
async def test_disconnect_is_make_before_break_and_loses_nothing() -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator(disconnect_grace=10.0) as emu, open_host(
            dingtalk_config(emu), ("recorder", recorder)
        ) as running:
            first = await emu.wait_for_connection(1)
            await trio.sleep(30)
            before = [await emu.send_user_message(f"before {i}") for i in range(5)]
            await emu.disconnect(reason="persistent connection is timeout")
            second = await emu.wait_for_connection(2)
            after = [await emu.send_user_message(f"after {i}") for i in range(5)]
            closed = await emu.wait_for_connection_closed(first["connectionId"])
            sent = before + after
            assert all(s["delivered"] for s in sent)
            for item in sent:
                assert (await emu.wait_for_ack(item["messageId"]))["verdict"] == "ok"
            await wait_for(lambda: len(recorder.messages) == len(sent))
            assert sorted(m.id for m in recorder.messages) == sorted(s["msgId"] for s in sent)
            # Make before break: the replacement was open before the old socket went away.
            assert second["openedAt"] <= closed["closedAt"]
            assert {s["connectionId"] for s in before} == {first["connectionId"]}
            assert {s["connectionId"] for s in after} == {second["connectionId"]}
            engine = stream_of(running)
            assert engine.reconnects == {"disconnect": 1}
            assert list(engine.delays) == []  # no backoff for a planned hand-over
            # The disconnect frame itself was acknowledged on the old connection.
            old = emu.connection(first["connectionId"])
            (frame,) = [f for f in old["frames"] if f["kind"] == "disconnect"]
            assert frame["ack"] is not None and frame["ack"]["code"] == 200


@pytest.mark.anyio
async def test_app_level_silence_hands_over_to_a_fresh_connection() -> None:
    stream = {"app_idle_timeout": 100.0, "drain_timeout": 15.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu, stream=stream)) as running:
            first = await emu.wait_for_connection(1)
            second = await emu.wait_for_connection(2)
            closed = await emu.wait_for_connection_closed(first["connectionId"])
            assert closed["closedBy"] == "client" and closed["closeCode"] == 1000
            assert second["openedAt"] <= closed["closedAt"]
            assert stream_of(running).reconnects == {"app_idle": 1}


@pytest.mark.anyio
async def test_ack_is_sent_long_before_a_slow_plugin_answers() -> None:
    recorder = Recorder(slow_seconds=30.0)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(
            dingtalk_config(emu), ("recorder", recorder), host_settings={"timeouts": {"on_message": 120}}
        ):
            sent = await emu.send_user_message("think hard")
            ack = await emu.wait_for_ack(sent["messageId"])
            assert ack["verdict"] == "ok"
            # The plugin is still thinking when the ACK is already at DingTalk.
            assert recorder.started == [sent["msgId"]] and recorder.finished == []
            assert ack["latency"] < 30
            replies = await emu.wait_for_bot_message(sent["conversationId"])
            assert [r["text"] for r in replies] == ["echo: think hard"]
            assert recorder.finished == [sent["msgId"]]


@pytest.mark.anyio
async def test_backpressure_leaves_messages_unacked_until_redelivered() -> None:
    gate = trio.Event()
    recorder = Recorder(answer=False, gate=gate)
    with trio.fail_after(LIMIT):
        async with open_emulator(bot_redelivery_delay=20.0, bot_max_redeliveries=5) as emu, open_host(
            dingtalk_config(emu),
            ("recorder", recorder),
            host_settings={"queue_size": 1, "concurrency": 1, "timeouts": {"on_message": 600}},
        ) as running:
            m1 = await emu.send_user_message("one")
            await wait_for(lambda: recorder.started == [m1["msgId"]])  # the only worker is busy
            m2 = await emu.send_user_message("two")  # fills the queue
            assert (await emu.wait_for_ack(m2["messageId"]))["verdict"] == "ok"
            m3 = await emu.send_user_message("three")  # no room: must stay un-ACKed
            frames = await emu.wait_for_deliveries(m3["msgId"], 2)
            assert frames[0]["ack"] is None
            assert running.metric("host_dingtalk_messages_total", app="default", msgtype="text", outcome="deferred") >= 1
            gate.set()
            await emu.wait_until(lambda: any(d["ack"] for d in emu.deliveries(m3["msgId"])) or None)
            await wait_for(lambda: len(recorder.messages) == 3)
            assert [m.id for m in recorder.messages] == [m1["msgId"], m2["msgId"], m3["msgId"]]
            deliveries = emu.deliveries(m3["msgId"])
            acked = [d for d in deliveries if d["ack"] is not None]
            assert len(acked) == 1 and acked[0]["ack"]["verdict"] == "ok"
            assert deliveries[0]["ack"] is None


@pytest.mark.anyio
async def test_event_busy_handlers_leave_events_for_redelivery() -> None:
    recorder = Recorder(event_seconds=20.0)
    stream = {"max_inflight_events": 1}
    with trio.fail_after(LIMIT):
        async with open_emulator(event_redelivery_delay=3.0, event_max_redeliveries=30) as emu, open_host(
            dingtalk_config(emu, stream=stream), ("recorder", recorder), host_settings={"timeouts": {"on_event": 120}}
        ) as running:
            slow = await emu.send_event("slow", {})
            await wait_for(lambda: len(recorder.events) == 1)
            other = await emu.send_event("other", {})
            # While the only handler slot is busy, "other" (and slow's own redeliveries) wait.
            assert (await emu.wait_for_ack(slow["messageId"]))["verdict"] == "ok"
            frames = await emu.wait_for_deliveries(other["eventId"], 2)
            assert frames[0]["ack"] is None
            await emu.wait_until(lambda: any(d["ack"] for d in emu.deliveries(other["eventId"])) or None)
            assert [e.type for e in recorder.events] == ["slow", "other"]
            assert running.metric("host_dingtalk_events_total", app="default", outcome="deferred") >= 1


@pytest.mark.anyio
async def test_dedup_memory_expires_after_its_ttl() -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(
            dingtalk_config(emu, stream={"dedup_ttl": 600.0}), ("recorder", recorder)
        ) as running:
            first = await emu.send_user_message("original", msgId="msgFIXED==")
            await emu.wait_for_ack(first["messageId"])
            await trio.sleep(300)
            again = await emu.send_user_message("redelivered within the TTL", msgId="msgFIXED==")
            await emu.wait_for_ack(again["messageId"])
            await trio.sleep(700)
            late = await emu.send_user_message("after the TTL", msgId="msgFIXED==")
            await emu.wait_for_ack(late["messageId"])
            await wait_for(lambda: len(recorder.messages) == 2)
            assert [m.text for m in recorder.messages] == ["original", "after the TTL"]
            assert running.metric("host_dingtalk_redeliveries_total", app="default") == 1


@pytest.mark.anyio
async def test_shutdown_does_not_wait_for_a_hanging_registration() -> None:
    stream = {"register_timeout": 10_000.0, "startup_wait": 1.0}
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            emu.faults.refuse_registration("timeout")
            with trio.fail_after(100):  # far less than register_timeout
                async with open_host(dingtalk_config(emu, stream=stream)) as running:
                    assert not running.connector.is_ready()
                    assert len(emu.state.registrations) == 1  # the attempt is hanging
            assert emu.connections() == []
            emu.faults.clear_registration()
