"""The running host: replies, streams, apologies, backpressure, lifecycle hooks, shutdown."""

from __future__ import annotations

import os
import signal

import msgspec
import pytest
import trio

from host import AuditEntry, Reply, hookimpl
from host.cli import run_until_signal
from host.config import load_config
from host.loopback import LoopbackConnector
from host.runtime import build_host
from host.testing import open_test_host


class Streams:
    def __init__(self, words: list[str], fail_after: int | None = None, delay: float = 0.5) -> None:
        self.words, self.fail_after, self.delay = words, fail_after, delay

    @hookimpl
    def on_message(self, message):
        async def chunks():
            for i, word in enumerate(self.words):
                if self.fail_after is not None and i == self.fail_after:
                    raise ConnectionError("backend went away")
                await trio.sleep(self.delay)
                yield word

        return chunks()


@pytest.mark.anyio
async def test_hook_on_message_reply_kinds() -> None:
    class Kinds:
        @hookimpl
        def on_message(self, message):
            return {"text": "plain", "md": Reply.markdown("**bold**"), "none": None}[message.text]

    async with open_test_host(("kinds", Kinds()), config={"host": {"fallback_reply": "nobody answered"}}) as th:
        assert (await th.send("text")).texts == ["plain"]
        md = (await th.send("md")).deliveries[0].reply
        assert (md.kind, md.text) == ("markdown", "**bold**")
        assert (await th.send("none")).texts == ["nobody answered"]


@pytest.mark.anyio
async def test_streamed_reply_is_finished() -> None:
    async with open_test_host(("streams", Streams(["Hel", "lo", "!"]))) as th:
        result = await th.send("hi")
    [delivery] = result.deliveries
    assert delivery.streamed and delivery.state == "finished"
    assert delivery.chunks == ["Hel", "lo", "!"]
    assert delivery.text == "Hello!"


@pytest.mark.anyio
async def test_stream_breaking_midway_keeps_text_and_says_incomplete(host_logs) -> None:
    async with open_test_host(("streams", Streams(["partial ", "answer ", "never"], fail_after=2))) as th:
        [delivery] = (await th.send("hi")).deliveries
    assert delivery.state == "failed"
    assert delivery.text.startswith("partial answer ")
    assert "incomplete" in delivery.text
    assert any("backend went away" in m for m in host_logs.messages("ERROR"))


@pytest.mark.anyio
async def test_stream_past_stream_timeout_is_cut_and_finalized() -> None:
    slow = Streams(["a"] * 100, delay=10)
    async with open_test_host(("slow", slow), config={"host": {"stream_timeout": 35}}) as th:
        [delivery] = (await th.send("hi")).deliveries
    assert delivery.state == "failed"
    assert delivery.chunks == ["a", "a", "a"]
    assert "took too long" in delivery.text


@pytest.mark.anyio
async def test_raising_plugin_gets_user_an_apology_not_silence(host_logs) -> None:
    class Raises:
        @hookimpl
        def on_message(self, message):
            raise KeyError("secret internals")

    async with open_test_host(("raises", Raises())) as th:
        result = await th.send("hi")
        handled = th.host.metrics.render().decode()
    assert result.texts == [th.host.config.host.apology]
    assert "secret internals" not in result.texts[0]
    assert 'host_messages_handled_total{connector="loopback",outcome="apology"} 1.0' in handled
    [error] = host_logs.errors()
    assert error["plugin"] == "raises" and error["request_id"] == result.message.request_id


@pytest.mark.anyio
async def test_hanging_plugin_times_out_and_others_still_answer() -> None:
    class Hangs:
        @hookimpl
        async def on_message(self, message):
            await trio.sleep_forever()

    class Answers:
        @hookimpl
        def on_message(self, message):
            return "still here"

    async with open_test_host(("answers", Answers()), ("hangs", Hangs()),
                              config={"host": {"timeouts": {"on_message": 3}}}) as th:
        start = trio.current_time()
        result = await th.send("hi")
        assert trio.current_time() - start == pytest.approx(3)
    assert result.texts == ["still here"]


@pytest.mark.anyio
async def test_full_queue_refuses_then_accepts_when_room() -> None:
    release = trio.Event()

    class Blocks:
        @hookimpl
        async def on_message(self, message):
            await release.wait()
            return "done " + message.text

    config = {"host": {"concurrency": 1, "queue_size": 2, "timeouts": {"on_message": 1000}}}
    async with open_test_host(("blocks", Blocks()), config=config) as th:
        lb = th.loopback
        messages = [lb.make_message(str(i)) for i in range(5)]
        assert lb.try_send_message(messages[0])
        await trio.testing.wait_all_tasks_blocked()  # worker took message 0
        assert lb.try_send_message(messages[1]) and lb.try_send_message(messages[2])
        assert not lb.try_send_message(messages[3])  # queue full: refused, not dropped
        assert th.host.statistics()["queue_depth"] == 2
        rendered = th.host.metrics.render().decode()
        assert 'host_intake_rejected_total{connector="loopback",reason="full"} 1.0' in rendered
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lb.send_message, messages[3])  # waits for room
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        await th.host.wait_idle()
        assert sorted(d.text for d in lb.deliveries) == [f"done {i}" for i in range(4)]


@pytest.mark.anyio
async def test_hook_register_middleware_wraps_async_handling() -> None:
    seen: list[str] = []

    class Timing:
        @hookimpl
        def register_middleware(self, host, register):
            async def outer(message, call_next):
                start = trio.current_time()
                seen.append("outer-in")
                await call_next(message)
                seen.append(f"outer-out {trio.current_time() - start:.0f}s")

            async def gate(message, call_next):
                if message.text == "blocked":
                    seen.append("gate-stopped")
                    return
                await call_next(message)

            register(outer)
            register(gate)

        @hookimpl
        async def on_message(self, message):
            await trio.sleep(4)
            seen.append("handler")
            return "ok"

    async with open_test_host(("timing", Timing())) as th:
        assert (await th.send("go")).texts == ["ok"]
        assert (await th.send("blocked")).texts == []
    assert seen == ["outer-in", "handler", "outer-out 4s", "outer-in", "gate-stopped", "outer-out 0s"]


@pytest.mark.anyio
async def test_hook_on_event_outcome_reports_failures() -> None:
    received = []

    class Events:
        @hookimpl
        def on_event(self, event):
            received.append(event.type)
            if event.type == "bad":
                raise RuntimeError("cannot handle")

    async with open_test_host(("events", Events())) as th:
        assert await th.loopback.send_event("chat_update_title", {"title": "x"}) is True
        assert await th.loopback.send_event("bad") is False
    assert received == ["chat_update_title", "bad"]


@pytest.mark.anyio
async def test_hook_on_startup_failure_marks_plugin_failed_and_on_shutdown_runs() -> None:
    calls: list[str] = []

    class FailsToStart:
        @hookimpl
        async def on_startup(self, host):
            raise OSError("port in use")

        @hookimpl
        def on_message(self, message):
            return "should never answer"

        @hookimpl
        def on_shutdown(self):
            calls.append("failed plugin shutdown")

    class Fine:
        @hookimpl
        def on_startup(self, host):
            calls.append("startup")

        @hookimpl
        async def on_shutdown(self, host):
            calls.append("shutdown")

        @hookimpl
        def on_message(self, message):
            return "fine"

    async with open_test_host(("fails", FailsToStart()), ("fine", Fine())) as th:
        assert (await th.send("hi")).texts == ["fine"]
        record = th.host.plugins.records["fails"]
    assert record.state == "failed" and "port in use" in record.error
    assert calls == ["startup", "shutdown"]


@pytest.mark.anyio
async def test_hook_on_audit_receives_plugin_lifecycle_and_plugin_actions() -> None:
    entries: list[AuditEntry] = []

    class Auditor:
        @hookimpl
        def on_audit(self, entry):
            entries.append(entry)

    class Sensitive:
        @hookimpl
        async def on_message(self, host, message):
            await host.audit("permission", "grant", actor=message.sender.identity, target="admins",
                             details={"role": "admin"})
            return "granted"

    async with open_test_host(("auditor", Auditor()), ("sensitive", Sensitive())) as th:
        await th.send("grant me")
    kinds = [(e.category, e.action, e.target) for e in entries]
    assert ("plugin", "load", "auditor") in kinds and ("plugin", "load", "sensitive") in kinds
    grant = next(e for e in entries if e.action == "grant")
    assert grant.actor == "user-1" and grant.details == {"role": "admin"} and grant.request_id


def test_hook_register_config_sections_validates_and_hook_register_connectors() -> None:
    class Section(msgspec.Struct, forbid_unknown_fields=True):
        greeting: str = "hi"
        retries: int = 3

    class WithConfig:
        @hookimpl
        def register_config_sections(self, register):
            register("greeter", Section)

        @hookimpl
        def register_connectors(self, host, register):
            register(LoopbackConnector(name=f"lb-{host.config.section('greeter').greeting}"))

    config = load_config(data={"greeter": {"greeting": "hello"}}, environ={})
    host = build_host(config, plugins=[("greeter", WithConfig())], entry_points=False)
    assert host.config.section("greeter") == Section(greeting="hello", retries=3)
    assert list(host.connectors) == ["lb-hello"]

    from host.errors import ConfigError

    bad = load_config(data={"greeter": {"retries": "three"}}, environ={})
    with pytest.raises(ConfigError, match=r"\[greeter\] retries: Expected `int`, got `str`"):
        build_host(bad, plugins=[("greeter", WithConfig())], entry_points=False)


@pytest.mark.anyio
async def test_sigterm_drains_in_flight_messages_then_runs_on_shutdown() -> None:
    events: list[str] = []

    class Slow:
        @hookimpl
        async def on_message(self, message):
            await trio.sleep(3)
            events.append(f"answered {message.text}")
            return "ok " + message.text

        @hookimpl
        def on_shutdown(self):
            events.append("on_shutdown")

    config = load_config(
        data={"logging": {"dir": ""}, "http": {"enabled": False},
              "host": {"concurrency": 2, "control_socket": "", "reload": {"watch_entry_points": False}}},
        environ={},
    )
    host = build_host(config, plugins=[("slow", Slow())], entry_points=False)
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_until_signal, host)
            for i in range(4):
                assert loopback.try_send_message(loopback.make_message(str(i)))
            await trio.sleep(1)  # two in flight, two queued
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep(0.5)
            assert not loopback.try_send_message(loopback.make_message("late"))  # intake closed
    assert sorted(d.text for d in loopback.deliveries) == ["ok 0", "ok 1", "ok 2", "ok 3"]
    assert events[-1] == "on_shutdown"


@pytest.mark.anyio
async def test_shutdown_deadline_cancels_and_finalizes_open_streams() -> None:
    endless = Streams(["tick "] * 1000, delay=1)
    config = {"host": {"shutdown_timeout": 5, "stream_timeout": 10_000}}
    async with open_test_host(("endless", endless), config=config) as th:
        assert th.loopback.try_send_message(th.loopback.make_message("go"))
        await trio.sleep(3.5)
        th.host.request_shutdown()
    [delivery] = th.loopback.deliveries
    assert delivery.state == "failed"
    assert "interrupted" in delivery.text
    assert delivery.text.startswith("tick tick tick")
