"""Hot reload: swap, rollback, drain, no ghosts, configuration reload, triggers."""

from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import tracemalloc
import warnings
import weakref
from pathlib import Path

import pytest
import trio

from host import hookimpl
from host.cli import run_until_signal
from host.testing import open_test_host

PLUGIN_V = '''
import trio
from host import hookimpl, Reply
VERSION = "{version}"
started = []

@hookimpl
def on_startup(host):
    {startup}
    started.append(VERSION)

@hookimpl
async def on_message(message):
    if message.text == "slow":
        await trio.sleep(10)
    return "{version}: " + message.text
'''


def write_plugin(root: Path, name: str, version: str, startup: str = "pass", body: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    code = body if body is not None else PLUGIN_V.format(version=version, startup=startup)
    (root / f"{name}.py").write_text(textwrap.dedent(code))
    # Python caches bytecode by mtime with one-second resolution: make each version distinct.
    stamp = 1_700_000_000 + int(version.strip("v") or 0) if version.strip("v").isdigit() else None
    if stamp:
        os.utime(root / f"{name}.py", (stamp, stamp))


@pytest.fixture
def dropins(tmp_path: Path):
    root = tmp_path / "dropins"
    root.mkdir()
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if getattr(sys.modules[m], "__file__", "") and
                 str(sys.modules[m].__file__).startswith(str(root))]:
        del sys.modules[name]


def config_for(root: Path, **extra) -> dict:
    # The file watcher is off here: these tests trigger reloads themselves (test_watch_* covers it).
    return {"host": {"reload": {"plugins_dir": str(root), "drain_timeout": 30, "watch_plugins_dir": False},
                     **extra}}


async def load_dropin(th, name: str):
    return await th.host.reloader.reload_plugin(name, reason="test")


@pytest.mark.anyio
async def test_reload_swaps_version_and_audits(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    audit: list = []

    class Auditor:
        @hookimpl
        def on_audit(self, entry):
            audit.append(entry)

    async with open_test_host(("auditor", Auditor()), config=config_for(dropins)) as th:
        assert th.host.plugins.records["greeter"].state == "loaded"  # from plugins_dir at startup
        assert (await th.send("hi")).texts == ["1: hi"]
        write_plugin(dropins, "greeter", "2")
        result = await load_dropin(th, "greeter")
        assert result.outcome == "reloaded", result
        assert (await th.send("hi")).texts == ["2: hi"]
        assert len(th.host.plugins.pm.hook.on_message.get_hookimpls()) == 1
        metrics = th.host.metrics.render().decode()
    assert 'host_plugin_reloads_total{outcome="reloaded",plugin="greeter"} 1.0' in metrics
    actions = [(e.category, e.action, e.target) for e in audit]
    assert ("plugin", "load", "greeter") in actions
    assert ("plugin", "reload_reloaded", "greeter") in actions


@pytest.mark.anyio
async def test_new_version_failing_to_import_keeps_old_serving(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        write_plugin(dropins, "greeter", "2", body="import no_such_module_anywhere\n")
        result = await load_dropin(th, "greeter")
        assert result.outcome == "failed"
        assert "no_such_module_anywhere" in result.error
        assert (await th.send("still")).texts == ["1: still"]
        assert th.host.plugins.records["greeter"].state == "loaded"


@pytest.mark.anyio
async def test_new_version_with_bad_hooks_or_api_range_is_refused(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        write_plugin(dropins, "greeter", "2", body="from host import hookimpl\n@hookimpl\ndef on_mesage(message):\n    return 1\n")
        result = await load_dropin(th, "greeter")
        assert result.outcome == "failed" and "did you mean 'on_message'" in result.error
        write_plugin(dropins, "greeter", "3", body='host_api = ">=7"\n')
        result = await load_dropin(th, "greeter")
        assert result.outcome == "failed" and ">=7" in result.error
        assert (await th.send("x")).texts == ["1: x"]


@pytest.mark.anyio
async def test_new_version_whose_on_startup_raises_rolls_back(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        write_plugin(dropins, "greeter", "2", startup="raise RuntimeError('cannot open database')")
        result = await load_dropin(th, "greeter")
        assert result.outcome == "rolled_back"
        assert "cannot open database" in result.error
        assert (await th.send("hi")).texts == ["1: hi"]
        module = sys.modules["greeter"]
        assert module.VERSION == "1" and module.started == ["1", "1"]  # started again after rollback


@pytest.mark.anyio
async def test_reload_drains_in_flight_calls_first(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        slow = th.loopback.make_message("slow")
        assert th.loopback.try_send_message(slow)
        await trio.sleep(1)  # in flight, 9 s to go
        write_plugin(dropins, "greeter", "2")
        start = trio.current_time()
        result = await load_dropin(th, "greeter")
        assert trio.current_time() - start == pytest.approx(9)  # waited for the call to finish
        assert result.outcome == "reloaded" and result.drained
        await th.host.wait_idle()
        assert [d.text for d in th.loopback.replies_to(slow.id)] == ["1: slow"]
        assert (await th.send("after")).texts == ["2: after"]


@pytest.mark.anyio
async def test_removed_plugin_is_unloaded(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        (dropins / "greeter.py").unlink()
        result = await load_dropin(th, "greeter")
        assert result.outcome == "unloaded"
        assert th.host.plugins.records["greeter"].state == "disabled"
        assert (await th.send("hi")).texts == []


GHOST = '''
import trio
from host import hookimpl
from host.loopback import LoopbackConnector

state = {"ports": []}

async def _listen(*, task_status):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    state["ports"].append(listeners[0].socket.getsockname()[1])
    async with listeners[0]:
        task_status.started()
        await trio.sleep_forever()

async def _ticker(*, task_status):
    task_status.started()
    while True:
        await trio.sleep(1)

@hookimpl
async def on_startup(host):
    await host.start_service(_listen)
    await host.start_service(_ticker)

@hookimpl
def register_connectors(host, register):
    register(LoopbackConnector(name="ghost-lb"))

@hookimpl
def register_middleware(host, register):
    async def passthrough(message, call_next):
        await call_next(message)
    register(passthrough)

@hookimpl
def on_message(message):
    return "ghost"
'''


def _walk(task) -> int:
    return 1 + sum(_walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


def count_tasks(host=None) -> int:
    """Tasks in the whole run, or only under the host's service and connector nurseries."""
    if host is None:
        return _walk(trio.lowlevel.current_root_task())
    return sum(_walk(child) for nursery in (host._services, host._serving) for child in nursery.child_tasks)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
async def test_hundred_reloads_leave_no_ghosts(dropins: Path) -> None:
    # Collect earlier tests' garbage first, quietly: their unclosed sockets must not be blamed on us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    write_plugin(dropins, "ghost", "1", body=GHOST)
    async with open_test_host(config=config_for(dropins)) as th:
        assert (await load_dropin(th, "ghost")).outcome == "reloaded"
        tasks, host_tasks, fds = count_tasks(), count_tasks(th.host), open_fds()
        first_module = weakref.ref(sys.modules["ghost"])
        tracemalloc.start()
        try:
            for i in range(100):
                result = await load_dropin(th, "ghost")
                assert result.outcome == "reloaded", result
                if i == 19:
                    gc.collect()
                    after_20 = tracemalloc.get_traced_memory()[0]
            gc.collect()
            after_100 = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        assert count_tasks(th.host) == host_tasks
        assert count_tasks() <= tasks  # tasks outside the host (pytest, anyio) may only finish
        assert open_fds() <= fds  # unrelated threads of earlier tests may close theirs meanwhile
        pm = th.host.plugins.pm
        assert [i.plugin_name for i in pm.hook.on_message.get_hookimpls()] == ["ghost"]
        assert [p for p, _ in th.host.middleware] == ["", "ghost"]  # "": the built-in access control
        assert [name for name in th.host.connectors if name.startswith("ghost")] == ["ghost-lb"]
        ports = sys.modules["ghost"].state["ports"]
        assert len(ports) == 1  # each generation has its own module state; the old ones are gone
        assert first_module() is None  # retired generations are garbage collected
        growth_per_reload = (after_100 - after_20) / 80
        assert growth_per_reload < 2_000, f"memory grows {growth_per_reload:.0f} B per reload"
        assert (await th.send("hi")).texts == ["ghost"]


@pytest.mark.anyio
async def test_old_listening_ports_are_closed_after_reload(dropins: Path) -> None:
    write_plugin(dropins, "ghost", "1", body=GHOST)
    async with open_test_host(config=config_for(dropins)) as th:
        old_port = sys.modules["ghost"].state["ports"][0]
        await load_dropin(th, "ghost")
        new_port = sys.modules["ghost"].state["ports"][0]
        assert old_port != new_port
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", new_port)
            await stream.aclose()
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", old_port)


SECTIONED = '''
import msgspec
from host import hookimpl

class Section(msgspec.Struct, forbid_unknown_fields=True):
    greeting: str = "hello"

@hookimpl
def register_config_sections(register):
    register("{name}", Section)

@hookimpl
def on_message(host, message):
    return host.config.section("{name}").greeting + " from {name}"
'''


@pytest.mark.anyio
async def test_config_reload_reloads_only_changed_sections_and_refuses_invalid(
    dropins: Path, tmp_path: Path
) -> None:
    for name in ("alpha", "beta"):
        write_plugin(dropins, name, "1", body=SECTIONED.replace("{name}", name))
    config_file = tmp_path / "host.toml"

    def write_config(alpha: str, beta: str) -> None:
        config_file.write_text(textwrap.dedent(f'''
            [logging]
            dir = ""
            [http]
            enabled = false
            [host]
            control_socket = ""
            [host.reload]
            plugins_dir = "{dropins}"
            watch_plugins_dir = false
            watch_entry_points = false
            [alpha]
            greeting = {alpha}
            [beta]
            greeting = {beta}
        '''))

    write_config('"hi"', '"hey"')
    from host.config import load_config
    from host.runtime import build_host

    host = build_host(load_config(config_file, environ={}), entry_points=False)
    from host.loopback import LoopbackConnector

    lb = LoopbackConnector()
    host.add_connector(lb)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        write_config('"bonjour"', '"hey"')
        results = await host.reloader.reload_config(reason="test")
        assert [(r.plugin, r.outcome) for r in results] == [("alpha", "reloaded")]
        message = lb.make_message("x")
        await lb.send_message(message)
        await host.wait_idle()
        assert sorted(d.text for d in lb.replies_to(message.id)) == ["bonjour from alpha", "hey from beta"]
        write_config("42", '"hey"')  # invalid: greeting must be a string
        assert await host.reloader.reload_config(reason="test") == []
        assert host.config.section("alpha").greeting == "bonjour"
        host.request_shutdown()


@pytest.mark.anyio
async def test_sighup_reloads_changed_dropins(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    from host.config import load_config
    from host.loopback import LoopbackConnector
    from host.runtime import build_host

    data = {"logging": {"dir": ""}, "http": {"enabled": False},
            "host": {"control_socket": "", "reload": {"plugins_dir": str(dropins), "watch_entry_points": False,
                                                     "watch_plugins_dir": False}}}
    host = build_host(load_config(data=data, environ={}), entry_points=False)
    lb = LoopbackConnector()
    host.add_connector(lb)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_until_signal, host)
            write_plugin(dropins, "greeter", "2")
            os.kill(os.getpid(), signal.SIGHUP)
            while sys.modules["greeter"].VERSION != "2":
                await trio.sleep(0.1)
            message = lb.make_message("hi")
            await lb.send_message(message)
            await host.wait_idle()
            assert [d.text for d in lb.replies_to(message.id)] == ["2: hi"]
            host.request_shutdown()


CONNECTOR_PLUGIN = '''
import trio
from host import hookimpl
from reload_events import EVENTS

GENERATION = "{gen}"

class Conn:
    name = "mbb"
    platform = "test"

    def __init__(self):
        self._stop = trio.Event()
        self.ready = False

    async def serve(self, intake, *, task_status):
        EVENTS.append("connect " + GENERATION)
        self.ready = True
        task_status.started()
        await self._stop.wait()
        EVENTS.append("closed " + GENERATION)

    async def stop(self):
        EVENTS.append("stop " + GENERATION)
        self._stop.set()

    def is_ready(self):
        return self.ready

    async def deliver(self, message, reply): ...
    async def open_stream(self, message): raise NotImplementedError
    async def send(self, target, reply, *, app_id=None): ...

@hookimpl
def register_connectors(host, register):
    register(Conn())
'''


@pytest.mark.anyio
async def test_dropins_load_at_startup_and_connector_reload_makes_before_break(dropins: Path) -> None:
    from reload_events import EVENTS

    EVENTS.clear()
    write_plugin(dropins, "mbbplugin", "1", body=CONNECTOR_PLUGIN.replace("{gen}", "1"))
    async with open_test_host(config=config_for(dropins)) as th:
        assert th.host.plugins.records["mbbplugin"].state == "loaded"  # loaded from plugins_dir at startup
        assert EVENTS == ["connect 1"]
        write_plugin(dropins, "mbbplugin", "2", body=CONNECTOR_PLUGIN.replace("{gen}", "2"))
        assert (await load_dropin(th, "mbbplugin")).outcome == "reloaded"
        assert EVENTS[:3] == ["connect 1", "connect 2", "stop 1"]  # the new one is up before the old stops
        assert th.host.connectors["mbb"].is_ready()
    assert EVENTS[-2:] == ["stop 2", "closed 2"]


@pytest.mark.anyio
async def test_message_arriving_mid_reload_waits_and_is_answered_by_the_new_version(dropins: Path) -> None:
    # A plugin being swapped is not skipped: new calls wait at its gate until the swap is over.
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        slow = th.loopback.make_message("slow")
        assert th.loopback.try_send_message(slow)
        await trio.sleep(1)  # in flight for 9 s more: the reload drains it
        write_plugin(dropins, "greeter", "2")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load_dropin, th, "greeter")
            await trio.sleep(2)  # the reload is draining now
            assert "greeter" in th.host.dispatcher.paused
            during = th.loopback.make_message("during")
            assert th.loopback.try_send_message(during)
        await th.host.wait_idle()
        assert [d.text for d in th.loopback.replies_to(slow.id)] == ["1: slow"]
        assert [d.text for d in th.loopback.replies_to(during.id)] == ["2: during"]
        assert not th.host.dispatcher.paused


@pytest.mark.anyio
async def test_message_arriving_mid_rollback_is_answered_by_the_old_version(dropins: Path) -> None:
    write_plugin(dropins, "greeter", "1")
    async with open_test_host(config=config_for(dropins)) as th:
        slow = th.loopback.make_message("slow")
        assert th.loopback.try_send_message(slow)
        await trio.sleep(1)
        write_plugin(dropins, "greeter", "2", startup="raise RuntimeError('cannot open database')")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load_dropin, th, "greeter")
            await trio.sleep(2)
            during = th.loopback.make_message("during")
            assert th.loopback.try_send_message(during)
        await th.host.wait_idle()
        assert [d.text for d in th.loopback.replies_to(during.id)] == ["1: during"]


STREAMER = '''
import trio
from host import hookimpl
state = {"closed": False}

@hookimpl
def on_message(message):
    async def chunks():
        for word in ("one ", "two ", "three"):
            await trio.sleep(1)
            if state["closed"]:
                raise RuntimeError("stream read after on_shutdown")
            yield word
    return chunks()

@hookimpl
def on_shutdown():
    state["closed"] = True
'''


@pytest.mark.anyio
async def test_reload_waits_for_a_stream_returned_but_not_read_yet(dropins: Path) -> None:
    # The streamer returns its iterator at once; a later plugin keeps the same on_message call busy
    # for 5 s before the host starts reading the stream. The reload must wait for the stream.
    class SlowSecond:
        @hookimpl(trylast=True)
        async def on_message(self, message):
            await trio.sleep(5)

    write_plugin(dropins, "streamer", "1", body=STREAMER)
    async with open_test_host(("slow-second", SlowSecond()), config=config_for(dropins)) as th:
        message = th.loopback.make_message("go")
        assert th.loopback.try_send_message(message)
        await trio.sleep(1)  # streamer returned; slow-second is still running
        write_plugin(dropins, "streamer", "2", body=STREAMER)
        result = await load_dropin(th, "streamer")
        assert result.outcome == "reloaded" and result.drained
        await th.host.wait_idle()
        replies = th.loopback.replies_to(message.id)
        assert [(d.text, d.state) for d in replies] == [("one two three", "finished")]


ROLLBACK_CONNECTOR = CONNECTOR_PLUGIN + '''
@hookimpl
def on_startup():
    if GENERATION == "2":
        raise RuntimeError("cannot start")
'''


@pytest.mark.anyio
async def test_connector_rollback_leaves_one_running_connector(dropins: Path) -> None:
    from reload_events import EVENTS

    EVENTS.clear()
    write_plugin(dropins, "mbbplugin", "1", body=ROLLBACK_CONNECTOR.replace("{gen}", "1"))
    async with open_test_host(config=config_for(dropins)) as th:
        write_plugin(dropins, "mbbplugin", "2", body=ROLLBACK_CONNECTOR.replace("{gen}", "2"))
        assert (await load_dropin(th, "mbbplugin")).outcome == "rolled_back"
        # The old version's fresh connector is up before the original one stops; nothing else runs.
        assert EVENTS == ["connect 1", "connect 1", "stop 1", "closed 1"]
        assert th.host.connectors["mbb"].is_ready()
    assert EVENTS[-2:] == ["stop 1", "closed 1"] and len(EVENTS) == 6


EVENT_CONNECTOR = '''
import trio
from host import hookimpl
from host.model import Event
from reload_events import EVENTS

GENERATION = "{gen}"
live = []

class Conn:
    name = "evc"
    platform = "test"

    def __init__(self):
        self._stop = trio.Event()
        self._nursery = None

    async def serve(self, intake, *, task_status):
        self.intake = intake
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._stop.wait()
        # serve returns only when the events it submitted are handled (as a real connector ACKs them)

    def submit_later(self):
        event = Event(id="e1", platform="test", connector="evc", type="ping", payload={})
        self._nursery.start_soon(self.intake.submit_event, event)

    async def stop(self):
        self._stop.set()

    def is_ready(self):
        return True

    async def deliver(self, message, reply): ...
    async def open_stream(self, message): raise NotImplementedError
    async def send(self, target, reply, *, app_id=None): ...

@hookimpl
def register_connectors(host, register):
    conn = Conn()
    live.append(conn)
    register(conn)

@hookimpl
def on_event(event):
    EVENTS.append("event handled by " + GENERATION)

@hookimpl
def on_shutdown():
    # An event reaches the old connector while its plugin is being swapped.
    live[-1].submit_later()
'''


@pytest.mark.anyio
async def test_event_arriving_mid_reload_does_not_hold_up_the_old_connectors_stop(dropins: Path) -> None:
    # The old connector's stop waits for the events it is handling; such an event waits at the
    # plugin's gate, so the gate must open before the old connectors are stopped.
    from reload_events import EVENTS

    EVENTS.clear()
    write_plugin(dropins, "evplugin", "1", body=EVENT_CONNECTOR.replace("{gen}", "1"))
    async with open_test_host(config=config_for(dropins)) as th:
        write_plugin(dropins, "evplugin", "2", body=EVENT_CONNECTOR.replace("{gen}", "2"))
        start = trio.current_time()
        assert (await load_dropin(th, "evplugin")).outcome == "reloaded"
        assert trio.current_time() - start < 1  # not the 30 s stop deadline
        assert EVENTS == ["event handled by 2"]
