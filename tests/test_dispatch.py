"""Per-implementation isolation, timeouts and timing in host.dispatch (virtual time)."""

from __future__ import annotations

import functools
import time

import pytest
import trio

from host import dispatch, hookimpl
from host.config import load_config
from host.dispatch import Dispatcher
from host.plugins import PluginManager


class Answers:
    def __init__(self, text: str) -> None:
        self.text = text

    @hookimpl
    def on_message(self, message):
        return self.text


class Raises:
    @hookimpl
    def on_message(self, message):
        raise ValueError("plugin bug")


class Hangs:
    @hookimpl
    async def on_message(self, message):
        await trio.sleep_forever()


class SlowAsync:
    @hookimpl
    async def on_message(self, message):
        await trio.sleep(5)
        return "slow but fine"


def dispatcher(*plugins: tuple[str, object], config: dict | None = None) -> Dispatcher:
    manager = PluginManager()
    for name, obj in plugins:
        manager.add(name, obj)
    return Dispatcher(manager, load_config(data=config or {}, environ={}).host)


@pytest.mark.anyio
async def test_raising_implementation_does_not_stop_others(host_logs) -> None:
    d = dispatcher(("first", Answers("one")), ("bad", Raises()), ("last", Answers("two")))
    outcomes = await d.call("on_message", host=None, message=None)
    assert [o.plugin for o in outcomes] == ["last", "bad", "first"]  # pluggy order: LIFO
    assert [o.value for o in outcomes if o.ok] == ["two", "one"]
    bad = next(o for o in outcomes if o.plugin == "bad")
    assert isinstance(bad.error, ValueError)
    assert d.statistics()[("bad", "on_message")].errors == 1
    error = host_logs.errors()[0]
    assert error["plugin"] == "bad"
    assert "plugin bad raised in on_message" in error["message"]


@pytest.mark.anyio
async def test_hanging_implementation_times_out_per_plugin_setting() -> None:
    d = dispatcher(
        ("hangs", Hangs()),
        ("slow", SlowAsync()),
        config={"host": {"timeouts": {"on_message": 2}, "plugin_timeouts": {"slow": {"on_message": 10}}}},
    )
    start = trio.current_time()
    outcomes = await d.call("on_message", host=None, message=None)
    by_plugin = {o.plugin: o for o in outcomes}
    assert by_plugin["hangs"].timed_out
    assert by_plugin["slow"].value == "slow but fine"
    assert trio.current_time() - start == pytest.approx(7)  # 2 s timeout + 5 s slow call
    assert d.statistics()[("hangs", "on_message")].timeouts == 1
    assert d.timeout_for("slow", "on_message") == 10
    assert d.timeout_for("hangs", "on_startup") == 30


@pytest.mark.anyio
async def test_latency_is_recorded_per_plugin_and_hook() -> None:
    d = dispatcher(("slow", SlowAsync()))
    for _ in range(3):
        await d.call("on_message", host=None, message=None)
    stats = d.statistics()[("slow", "on_message")]
    assert stats.count == 3
    assert sum(stats.buckets) == 3


@pytest.mark.anyio
async def test_paused_plugin_holds_new_calls_at_its_gate_and_drains() -> None:
    d = dispatcher(("slow", SlowAsync()), ("fast", Answers("x")))
    results: list[list[str]] = []

    async def call() -> None:
        results.append([o.plugin for o in await d.call("on_message", host=None, message=None)])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(1)
        d.pause("slow")
        assert d.inflight["slow"] == 1
        nursery.start_soon(call)  # reaches the paused plugin: waits at its gate, not counted in flight
        assert await d.wait_plugin_idle("slow", deadline_seconds=10)
        assert trio.current_time() == pytest.approx(5)
        assert results == [["fast", "slow"]]
        await trio.sleep(20)
        assert results == [["fast", "slow"]]  # still waiting: the reload is not over
        d.resume("slow")
    assert results == [["fast", "slow"], ["fast", "slow"]]
    assert trio.current_time() == pytest.approx(25 + 5)


@pytest.mark.anyio
async def test_gate_wait_is_bounded_then_the_plugin_is_skipped(host_logs) -> None:
    d = dispatcher(("slow", SlowAsync()), ("fast", Answers("x")),
                   config={"host": {"reload": {"drain_timeout": 10}}})
    d.pause("slow")
    outcomes = await d.call("on_message", host=None, message=None)
    assert [o.plugin for o in outcomes] == ["fast"]
    assert trio.current_time() == pytest.approx(10 + 30)
    assert "plugin slow is still being reloaded after 40s; on_message skips it" in host_logs.text()


@pytest.mark.anyio
async def test_call_after_the_gate_goes_to_the_plugins_new_implementation() -> None:
    manager = PluginManager()
    manager.add("greeter", Answers("v1"))
    d = Dispatcher(manager, load_config(data={}, environ={}).host)
    d.pause("greeter")
    results: list[object] = []

    async def call() -> None:
        results.extend(o.value for o in await d.call("on_message", host=None, message=None))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.sleep(1)
        manager.unregister("greeter")
        manager.add("greeter", Answers("v2"))
        d.resume("greeter")
    assert results == ["v2"]


class Streams:
    @hookimpl
    async def on_message(self, message):
        async def chunks():
            yield "a"

        return chunks()


@pytest.mark.anyio
async def test_returned_stream_stays_in_flight_until_released() -> None:
    d = dispatcher(("streamer", Streams()), ("fast", Answers("x")))
    outcomes = await d.call("on_message", host=None, message=None)
    assert sorted((o.plugin, o.held) for o in outcomes) == [("fast", False), ("streamer", True)]
    streamed = next(o for o in outcomes if o.held)
    assert d.inflight["streamer"] == 1
    d.pause("streamer")
    assert not await d.wait_plugin_idle("streamer", deadline_seconds=1)
    d.release("streamer")
    assert await d.wait_plugin_idle("streamer", deadline_seconds=1)
    await streamed.value.aclose()
    # Only on_message streams are held: other hooks' results are the caller's business.
    assert d.inflight["streamer"] == 0


def test_registration_hooks_must_be_sync() -> None:
    class AsyncRegister:
        @hookimpl
        async def register_commands(self, register):
            pass

    d = dispatcher(("bad", AsyncRegister()))
    [outcome] = d.call_sync("register_commands", register=lambda *a, **k: None)
    assert isinstance(outcome.error, TypeError)


# -- async implementations without an await ------------------------------------------------------


class InstantAsync:
    @hookimpl
    async def on_message(self, message):
        return "instant"


class InstantAsyncRaises:
    @hookimpl
    async def on_message(self, message):
        raise ValueError("async plugin bug")


class InstantAsyncBlocksTheLoop:
    @hookimpl
    async def on_message(self, message):
        time.sleep(0.005)  # a blocking call in an async def: the mistake the warning is for
        return "late"


@pytest.fixture
def scopes_made(monkeypatch) -> list[trio.CancelScope]:
    """Every cancel scope the dispatcher opens for a call (trio's CancelScope cannot be subclassed)."""
    made: list[trio.CancelScope] = []

    def counting_scope(*args, **kwargs) -> trio.CancelScope:
        scope = trio.CancelScope(*args, **kwargs)
        made.append(scope)
        return scope

    monkeypatch.setattr(dispatch, "_CancelScope", counting_scope)
    return made


@pytest.mark.anyio
async def test_async_implementations_without_await_need_no_cancel_scope(host_logs, scopes_made) -> None:
    d = dispatcher(("sync", Answers("one")), ("instant", InstantAsync()), ("bad", InstantAsyncRaises()))
    outcomes = await d.call("on_message", host=None, message=None)
    assert [(o.plugin, o.value) for o in outcomes if o.ok] == [("instant", "instant"), ("sync", "one")]
    bad = next(o for o in outcomes if o.plugin == "bad")
    assert isinstance(bad.error, ValueError)
    assert "plugin bad raised in on_message" in host_logs.errors()[0]["message"]
    assert d.statistics()[("instant", "on_message")].count == 1
    assert scopes_made == []


@pytest.mark.anyio
async def test_one_cancel_scope_per_call_once_an_implementation_awaits(scopes_made) -> None:
    d = dispatcher(
        ("instant", InstantAsync()),
        ("hangs", Hangs()),
        ("slow", SlowAsync()),
        config={"host": {"timeouts": {"on_message": 2}, "plugin_timeouts": {"slow": {"on_message": 10}}}},
    )
    outcomes = await d.call("on_message", host=None, message=None)
    by_plugin = {o.plugin: o for o in outcomes}
    assert by_plugin["hangs"].timed_out  # the await-free one beside it changes nothing
    assert by_plugin["slow"].value == "slow but fine"
    assert by_plugin["instant"].value == "instant"
    # One for the call, and a fresh one after the timeout spent it.
    assert len(scopes_made) == 2


@pytest.mark.anyio
async def test_async_implementation_blocking_the_loop_is_reported_not_timed_out(host_logs) -> None:
    d = dispatcher(
        ("blocky", InstantAsyncBlocksTheLoop()),
        config={"host": {"plugin_timeouts": {"blocky": {"on_message": 0.001}}}},
    )
    [outcome] = await d.call("on_message", host=None, message=None)
    assert outcome.ok and outcome.value == "late"  # it cannot be interrupted: its answer stands
    assert d.statistics()[("blocky", "on_message")].timeouts == 0
    assert any("plugin blocky blocked the event loop in on_message" in m for m in host_logs.messages("WARNING"))


class Wrapped:
    def __init__(self) -> None:
        async def inner(message):
            await trio.lowlevel.checkpoint()

        @functools.wraps(inner)
        async def no_await_wrapper(message):
            return "wrapper"

        self.no_await_wrapper = no_await_wrapper


def test_which_coroutine_functions_can_suspend() -> None:
    async def plain(message):
        return message

    async def awaits(message):
        await trio.lowlevel.checkpoint()

    async def async_for(stream):
        async for _ in stream:
            pass

    async def async_with(lock):
        async with lock:
            pass

    async def async_comprehension(stream):
        return [item async for item in stream]

    async def await_in_comprehension(awaitables):
        return [await item for item in awaitables]

    assert dispatch._cannot_suspend(plain)
    assert dispatch._cannot_suspend(InstantAsync().on_message)  # a bound method: its function's code
    assert dispatch._cannot_suspend(Wrapped().no_await_wrapper)  # the wrapper is what runs
    for can_suspend in (awaits, async_for, async_with, async_comprehension, await_in_comprehension, Hangs().on_message):
        assert not dispatch._cannot_suspend(can_suspend), can_suspend.__name__

    class CallableObject:  # no code to read: counted as able to suspend
        async def __call__(self, message):
            return None

    assert not dispatch._cannot_suspend(CallableObject())
