"""Red team: hot reload leaves no ghosts, one plugin cannot take the bot down, memory stays bounded.

(peers.md §12-F, §12-G, §12-I.) What ``test_reload.py`` / ``test_runtime.py`` do not reach:

* a plugin that calls ``sys.exit()`` (or raises its own ``BaseException`` subclass) from any hook,
  middleware, stream, connector or HTTP endpoint: the host keeps serving and the user gets an answer
  or the apology; but Ctrl-C and a coroutine being closed still end the host's work;
* a middleware failing after the answer was delivered: no apology after a good answer;
* hundreds of reloads alternating with rollbacks and removals: exactly one service instance, and no
  per-reload growth of the host's own tables;
* a flood of messages from many distinct users: no per-user structure in the host grows.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
from distfactory import SysPath, make_plugin_dist
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from test_reload import SECTIONED, config_for, dropins, load_dropin, write_plugin  # noqa: F401 (dropins: fixture)

from host import AuditEntry, hookimpl
from host.config import load_config
from host.loopback import LoopbackConnector
from host.plugins import escaped_from_plugin
from host.runtime import build_host
from host.testing import open_test_host

APOLOGY = "Sorry, something went wrong on my side and I could not answer. Please try again."
DEADLINE = 60  # seconds of virtual time; never reached when things work


class MyAbort(BaseException):
    """A plugin's own BaseException subclass (some libraries define such "abort" exceptions)."""


ESCAPES = [SystemExit(1), MyAbort("abort")]
ESCAPE_IDS = ["SystemExit", "BaseException-subclass"]


class Echo:
    @hookimpl
    def on_message(self, message):
        return "echo: " + message.text


class ExitsOnBoom:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @hookimpl
    async def on_message(self, message):
        if message.text == "boom":
            await trio.sleep(0.1)
            raise self.exc


# -- one plugin cannot take the bot down -------------------------------------------------------


def test_only_the_hosts_own_exits_are_not_a_plugin_failure() -> None:
    for exc in ESCAPES:
        assert escaped_from_plugin(exc)
    assert escaped_from_plugin(BaseExceptionGroup("g", [SystemExit(1), ValueError()]))
    for host_exit in (KeyboardInterrupt(), GeneratorExit()):
        assert not escaped_from_plugin(host_exit)
        assert not escaped_from_plugin(BaseExceptionGroup("g", [SystemExit(1), host_exit]))


KI_SCRIPT = textwrap.dedent('''
    import signal, sys, trio
    from host import hookimpl
    from host.testing import open_test_host

    class CpuBound:
        @hookimpl
        def on_message(self, message):
            signal.raise_signal(signal.SIGINT)  # the operator presses Ctrl-C during a busy hook
            return "done"

    async def main():
        async with open_test_host(("cpu", CpuBound())) as th:
            print("replies:", (await th.send("hi")).texts, flush=True)

    try:
        trio.run(main)
    except BaseException as exc:  # bare, or in the nurseries' exception group
        ctrl_c = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None)
        sys.exit(0 if ctrl_c else 4)
    sys.exit(3)  # trio.run returned: the Ctrl-C was swallowed
''')


def test_ctrl_c_during_a_hook_stops_a_host_run_by_plain_trio_run() -> None:
    # Embedded (no CLI signal handling), trio raises KeyboardInterrupt wherever the code is: it is
    # the operator's, not the plugin's failure to be answered with an apology.
    done = subprocess.run([sys.executable, "-c", KI_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-300:]


class SleepsInOnEvent:
    @hookimpl
    async def on_event(self, event):
        await trio.sleep(10)


@pytest.mark.anyio
async def test_closing_a_suspended_dispatch_does_not_resume_the_next_plugin() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("a", SleepsInOnEvent()), ("b", SleepsInOnEvent())) as th:
            coro = th.host.dispatcher.call("on_event", host=th.host, event=None)
            coro.send(None)  # suspended inside plugin b's hook
            # What the garbage collector does to an abandoned coroutine: had the GeneratorExit been
            # isolated as b's failure, the dispatcher would go on to plugin a ("coroutine ignored
            # GeneratorExit").
            coro.close()


@pytest.mark.anyio
@pytest.mark.parametrize("exc", ESCAPES, ids=ESCAPE_IDS)
async def test_sys_exit_in_on_message_gets_an_apology_and_the_bot_keeps_serving(exc, host_logs) -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("exits", ExitsOnBoom(exc))) as th:
            assert (await th.send("boom")).texts == [APOLOGY]
            assert (await th.send("again")).texts == []  # no fallback configured: silence is right here
            assert th.host.started
    assert any(type(exc).__name__ in m for m in host_logs.messages("ERROR"))


@pytest.mark.anyio
async def test_other_plugins_still_answer_when_one_calls_sys_exit() -> None:
    # pluggy calls the last registered first: "exits" runs before "echo" and must not stop it.
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("exits", ExitsOnBoom(SystemExit(3)))) as th:
            assert (await th.send("boom")).texts == ["echo: boom"]


class MiddlewareExits:
    def __init__(self, when: str) -> None:
        self.when = when

    @hookimpl
    def register_middleware(self, register):
        async def middleware(message, call_next):
            if self.when == "before":
                raise SystemExit(2)
            await call_next(message)
            if self.when == "after":
                raise RuntimeError("metrics backend down")
            if self.when == "after-exit":
                raise SystemExit(2)

        register(middleware)


@pytest.mark.anyio
async def test_middleware_calling_sys_exit_before_call_next_gets_an_apology() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("mw", MiddlewareExits("before"))) as th:
            assert (await th.send("one")).texts == [APOLOGY]
            assert (await th.send("two")).texts == [APOLOGY]


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["after", "after-exit"])
async def test_middleware_failing_after_the_answer_sends_no_apology_after_it(when, host_logs) -> None:
    # The user already has the answer: an apology after it would claim a failure they did not see.
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("mw", MiddlewareExits(when))) as th:
            assert (await th.send("hi")).texts == ["echo: hi"]
            metrics = th.host.metrics.render().decode()
    assert 'host_messages_handled_total{connector="loopback",outcome="answered"} 1.0' in metrics
    assert any("message handling failed" in m for m in host_logs.messages("ERROR"))


class MiddlewareCallsNextTwice:
    """A retry middleware done wrong: it calls call_next again although the first call answered."""

    @hookimpl
    def register_middleware(self, register):
        async def retry(message, call_next):
            await call_next(message)
            await call_next(message)

        register(retry)


@pytest.mark.anyio
async def test_middleware_calling_call_next_twice_does_not_answer_twice(host_logs) -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("retry", MiddlewareCallsNextTwice())) as th:
            assert (await th.send("once")).texts == ["echo: once"]
            assert (await th.send("again")).texts == ["echo: again"]
    assert any("plugin retry called call_next again" in m for m in host_logs.messages("ERROR"))


class StreamExits:
    @hookimpl
    def on_message(self, message):
        async def chunks() -> AsyncIterator[str]:
            yield "first part"
            await trio.sleep(0.1)
            sys.exit(4)

        return chunks() if message.text == "stream" else None


@pytest.mark.anyio
async def test_stream_calling_sys_exit_midway_is_finalized_and_the_bot_keeps_serving() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("streams", StreamExits()), ("echo", Echo())) as th:
            result = await th.send("stream")
            [streamed] = [d for d in result.deliveries if d.streamed]
            assert streamed.state == "failed" and streamed.text.startswith("first part")
            assert "incomplete" in streamed.text
            assert (await th.send("after")).texts == ["echo: after"]


class EventExits:
    @hookimpl
    def on_event(self, event):
        sys.exit(5)


@pytest.mark.anyio
async def test_on_event_calling_sys_exit_is_reported_not_consumed() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("events", EventExits())) as th:
            assert await th.loopback.send_event("member_added") is False  # DingTalk would redeliver
            assert (await th.send("after")).texts == ["echo: after"]


class AuditExits:
    def __init__(self) -> None:
        self.seen: list[AuditEntry] = []

    @hookimpl
    def on_audit(self, entry):
        self.seen.append(entry)
        if entry.action == "explode":
            raise SystemExit(6)


@pytest.mark.anyio
async def test_on_audit_calling_sys_exit_loses_that_record_only(host_logs) -> None:
    auditor = AuditExits()
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("auditor", auditor)) as th:
            th.host.audit_soon("test", "explode")  # stored by the background flusher
            await th.host.audit("test", "after")
            assert (await th.send("still")).texts == ["echo: still"]
    actions = [e.action for e in auditor.seen]
    assert actions.index("explode") < actions.index("after")
    assert any("not stored" in m for m in host_logs.messages("ERROR"))


class Lifecycle:
    def __init__(self, name: str, log: list[str], exit_in: str = "") -> None:
        self.name, self.log, self.exit_in = name, log, exit_in

    @hookimpl
    async def on_startup(self):
        await trio.lowlevel.checkpoint()
        self.log.append(f"start {self.name}")
        if self.exit_in == "on_startup":
            sys.exit(7)

    @hookimpl
    async def on_shutdown(self):
        await trio.lowlevel.checkpoint()
        self.log.append(f"stop {self.name}")
        if self.exit_in == "on_shutdown":
            raise SystemExit(8)

    @hookimpl
    def on_message(self, message):
        return f"{self.name}: {message.text}"


@pytest.mark.anyio
async def test_sys_exit_in_on_startup_fails_only_that_plugin() -> None:
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        # "first" is registered first, so pluggy starts it last: the exit comes before it.
        async with open_test_host(("first", Lifecycle("first", log)), ("bad", Lifecycle("bad", log, "on_startup"))) as th:
            assert th.host.plugins.records["bad"].state == "failed"
            assert "SystemExit" in (th.host.plugins.records["bad"].error or "")
            assert (await th.send("hi")).texts == ["first: hi"]
    assert log == ["start bad", "start first", "stop first"]


@pytest.mark.anyio
async def test_sys_exit_in_on_shutdown_does_not_skip_the_other_plugins_shutdown() -> None:
    log: list[str] = []
    with trio.fail_after(DEADLINE):
        async with open_test_host(("first", Lifecycle("first", log)), ("bad", Lifecycle("bad", log, "on_shutdown"))):
            pass
    assert log[-2:] == ["stop bad", "stop first"]


class ExitingConnector(LoopbackConnector):
    async def serve(self, intake, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(1)
        sys.exit(9)


class ConnectorPlugin:
    @hookimpl
    def register_connectors(self, register):
        register(ExitingConnector(name="exiting"))


@pytest.mark.anyio
async def test_connector_calling_sys_exit_stops_that_connector_only(host_logs) -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("conn", ConnectorPlugin())) as th:
            await trio.sleep(2)
            assert (await th.send("hi")).texts == ["echo: hi"]
    assert any("connector exiting failed" in m for m in host_logs.messages("ERROR"))


def test_plugin_calling_sys_exit_at_import_fails_only_that_plugin(dropins: Path) -> None:  # noqa: F811
    write_plugin(dropins, "quitter", "1", body="raise SystemExit('missing dependency: foo')\n")
    write_plugin(dropins, "greeter", "1")
    host = build_host(load_config(data=config_for(dropins), environ={}), entry_points=False)
    assert host.plugins.records["quitter"].state == "failed"
    assert "missing dependency: foo" in (host.plugins.records["quitter"].error or "")
    assert host.plugins.records["greeter"].state == "loaded"


class TestHttpEndpoint:
    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, Any]]:
        return ("trio", {})  # real clock: real sockets

    class Routes:
        @hookimpl
        def on_startup(self, host):
            async def quit_endpoint(request: Request) -> PlainTextResponse:
                sys.exit(10)

            host.http.add_route("/quit", quit_endpoint)

    @pytest.mark.anyio
    async def test_endpoint_calling_sys_exit_is_a_500_and_the_server_keeps_serving(self) -> None:
        config = {"http": {"enabled": True, "addr": "127.0.0.1:0"}}
        with trio.fail_after(20):
            async with open_test_host(("routes", self.Routes()), ("echo", Echo()), config=config) as th:
                async with httpx.AsyncClient(base_url=th.host.http.url, timeout=20) as client:
                    assert (await client.get("/quit")).status_code == 500
                    assert (await client.get("/healthz")).status_code == 200
                assert (await th.send("hi")).texts == ["echo: hi"]


# -- hot reload leaves no ghosts ---------------------------------------------------------------

SERVICE_PLUGIN = '''
import sys
import msgspec
import trio
from host import hookimpl
from starlette.responses import PlainTextResponse

VERSION = "{version}"
MODE = "{mode}"
# Instances of the service across every generation (kept outside the module, which reload replaces).
LIVE = sys.modules.setdefault("_svc_live", type(sys)("_svc_live"))
if not hasattr(LIVE, "running"):
    LIVE.running = []

class Section(msgspec.Struct):
    greeting: str = "hi"

@hookimpl
def register_config_sections(register):
    register("svcplugin", Section)

async def _service(*, task_status):
    LIVE.running.append(VERSION)
    task_status.started()
    try:
        await trio.sleep_forever()
    finally:
        LIVE.running.remove(VERSION)

async def _hello(request):
    return PlainTextResponse(VERSION)

@hookimpl
async def on_startup(host):
    await host.start_service(_service)
    host.http.add_route("/svc", _hello)
    host.metrics.counter("svc_calls_total", "calls", ["kind"]).labels("startup").inc()
    if MODE == "exit":
        sys.exit("new version cannot start")
    if MODE == "raise":
        raise RuntimeError("new version cannot start")

@hookimpl
async def on_shutdown():
    if MODE == "hang":
        await trio.sleep_forever()

@hookimpl
def register_middleware(register):
    async def passthrough(message, call_next):
        await call_next(message)
    register(passthrough)

@hookimpl
def on_message(host, message):
    return VERSION + " " + host.config.section("svcplugin").greeting
'''


def _service_running() -> list[str]:
    return list(sys.modules["_svc_live"].running)


def _host_tables(host: Any) -> dict[str, int]:
    """Sizes of the host's own per-plugin tables: none may grow with reloads."""
    dispatcher = host.dispatcher
    return {
        "hook_stats": len(dispatcher.statistics()),
        "inflight": len(dispatcher.inflight),
        "gates": len(dispatcher._gates),
        "paused": len(dispatcher.paused),
        "nurseries": len(host._plugin_nurseries),
        "scope_done": len(host._plugin_scope_done),
        "connector_done": len(host._connector_done),
        "routes": len(host.http.routes()),
        "middleware": len(host.middleware),
        "sections": len(host.section_schemas),
        "records": len(host.plugins.records),
        "metric_series": sum(len(f.samples) for f in host.metrics.registry.collect()),
        "hookimpls": sum(len(getattr(host.plugins.pm.hook, h).get_hookimpls()) for h in ("on_message", "on_startup")),
        "audit_backlog": len(host._audit_backlog),
    }


@pytest.mark.anyio
async def test_two_hundred_reloads_rollbacks_and_removals_leave_one_service_and_no_growth(
    dropins: Path,  # noqa: F811
) -> None:
    sys.modules.pop("_svc_live", None)
    modes = ["ok", "raise", "exit", "hang", "ok", "broken", "removed", "ok"]
    version = 1
    write_plugin(dropins, "svcplugin", str(version), body=SERVICE_PLUGIN.format(version=version, mode="ok"))
    config = config_for(dropins, timeouts={"on_shutdown": 2})
    with trio.fail_after(3600):
        async with open_test_host(config=config) as th:
            assert _service_running() == ["1"]
            baseline: dict[str, int] | None = None
            gc.collect()
            tracemalloc.start()
            try:
                for cycle in range(25):  # 25 x 8 = 200 reloads
                    if cycle == 5:
                        gc.collect()
                        baseline, memory_at_5 = _host_tables(th.host), tracemalloc.get_traced_memory()[0]
                    for mode in modes:
                        version += 1
                        path = dropins / "svcplugin.py"
                        if mode == "removed":
                            path.unlink()
                        elif mode == "broken":
                            write_plugin(dropins, "svcplugin", str(version), body="raise SystemExit(1)\n")
                        else:
                            body = SERVICE_PLUGIN.format(version=version, mode=mode)
                            write_plugin(dropins, "svcplugin", str(version), body=body)
                        before = _service_running()
                        result = await load_dropin(th, "svcplugin")
                        running = _service_running()
                        expected = {"ok": "reloaded", "hang": "reloaded", "raise": "rolled_back",
                                    "exit": "rolled_back", "broken": "failed", "removed": "unloaded"}[mode]
                        if mode == "ok" and not before:
                            expected = "loaded"
                        assert result.outcome == expected, (mode, result)
                        if mode in ("ok", "hang"):
                            assert running == [str(version)]
                        elif mode == "removed":
                            assert running == []
                        else:  # rollback / refused import: exactly the old instance, restarted or kept
                            assert len(running) == 1 and running == before
                        if running:
                            text = (await th.send("hi")).texts
                            assert len(text) == 1 and text[0].endswith(" hi"), (mode, text)
                gc.collect()
                tables, memory_at_25 = _host_tables(th.host), tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
    assert baseline is not None
    assert tables == baseline
    growth = (memory_at_25 - memory_at_5) / (20 * len(modes))
    assert growth < 4_000, f"memory grows {growth:.0f} B per reload"


# -- memory: a flood of distinct users ---------------------------------------------------------


@pytest.mark.anyio
async def test_a_flood_of_distinct_users_and_conversations_grows_no_host_table() -> None:
    with trio.fail_after(DEADLINE * 10):
        async with open_test_host(("echo", Echo()), ("mw", MiddlewareExits("none"))) as th:
            loopback = th.loopback

            async def flood(start: int, count: int) -> None:
                for i in range(start, start + count):
                    message = loopback.make_message("x", sender_id=f"user-{i}", conversation_id=f"conv-{i}",
                                                    group=i % 2 == 0)
                    await loopback.send_message(message)
                await th.host.wait_idle()
                loopback.deliveries.clear()  # the test connector's own record, not the host's

            await flood(0, 2_000)
            gc.collect()
            tables = _host_tables(th.host)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                await flood(2_000, 20_000)
                gc.collect()
                after = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            assert _host_tables(th.host) == tables
    per_message = (after - before) / 20_000
    assert per_message < 50, f"memory grows {per_message:.1f} B per distinct user"


class MiddlewareHangs:
    @hookimpl
    def register_middleware(self, register):
        async def middleware(message, call_next):
            if message.text == "hang":
                await trio.sleep_forever()  # e.g. awaiting a lock or a socket without a timeout
            await call_next(message)

        register(middleware)


@pytest.mark.anyio
async def test_middleware_that_never_returns_gets_an_apology_and_frees_its_worker(host_logs) -> None:
    config = {"host": {"concurrency": 2}}
    with trio.fail_after(DEADLINE * 100):
        async with open_test_host(("echo", Echo()), ("mw", MiddlewareHangs()), config=config) as th:
            hung = [th.loopback.make_message("hang") for _ in range(2)]  # every worker
            for message in hung:
                assert th.loopback.try_send_message(message)
            after = th.loopback.make_message("after")
            assert th.loopback.try_send_message(after)
            await th.host.wait_idle()
            assert [[d.text for d in th.loopback.replies_to(m.id)] for m in hung] == [[APOLOGY], [APOLOGY]]
            assert [d.text for d in th.loopback.replies_to(after.id)] == ["echo: after"]
            assert (await th.send("later")).texts == ["echo: later"]
    assert sum("never returns" in m for m in host_logs.messages("ERROR")) == 2


class ShieldedHang:
    """A middleware that sits in a shielded region past the handling deadline, then returns."""

    @hookimpl
    def register_middleware(self, register):
        async def middleware(message, call_next):
            if message.text == "slow":
                with trio.CancelScope(shield=True):
                    await trio.sleep(1000)
                return  # no call_next: the watchdog's cancel was never delivered inside
            await call_next(message)

        register(middleware)


@pytest.mark.anyio
async def test_watchdog_cancel_pending_when_a_message_ends_does_not_hit_the_next_one() -> None:
    with trio.fail_after(DEADLINE * 100):
        async with open_test_host(("echo", Echo()), ("mw", ShieldedHang()), config={"host": {"concurrency": 1}}) as th:
            slow, after = th.loopback.make_message("slow"), th.loopback.make_message("next")
            assert th.loopback.try_send_message(slow) and th.loopback.try_send_message(after)
            await th.host.wait_idle()
            assert [d.text for d in th.loopback.replies_to(slow.id)] == [APOLOGY]
            assert [d.text for d in th.loopback.replies_to(after.id)] == ["echo: next"]


# -- ghosts in the host's own tables after an upgrade or a removal ---------------------------------

VERSIONED_DIST = '''
from host import hookimpl

@hookimpl
def on_message(message):
    return "{version}: " + message.text
'''


@pytest.mark.anyio
async def test_upgraded_plugin_is_not_still_reported_loaded_at_its_old_version(tmp_path: Path) -> None:
    root = tmp_path / "site"

    def install(version: str, stamp: int) -> None:
        for old in root.glob("host_verdemo-*.dist-info"):
            shutil.rmtree(old)
        make_plugin_dist(root, dist="host-verdemo", module="host_verdemo", entry_name="verdemo",
                         code=VERSIONED_DIST.format(version=version), version=version)
        os.utime(root / "host_verdemo.py", (stamp, stamp))  # a distinct mtime: no stale bytecode

    install("1.0.0", 1_700_000_001)
    config = {"plugins": {"allow": ["verdemo"]}}
    with SysPath(root), trio.fail_after(DEADLINE):
        async with open_test_host(config=config, entry_points=True) as th:
            assert (await th.send("a")).texts == ["1.0.0: a"]
            install("2.0.0", 1_700_000_002)
            assert (await th.host.reloader.reload_plugin("verdemo")).outcome == "reloaded"
            assert (await th.send("b")).texts == ["2.0.0: b"]
            (root / "host_verdemo.py").unlink()
            for old in root.glob("host_verdemo-*.dist-info"):
                shutil.rmtree(old)
            assert (await th.host.reloader.reload_plugin("verdemo")).outcome == "unloaded"
            samples = {
                (s.labels["version"], s.labels["state"]): s.value
                for family in th.host.metrics.registry.collect() if family.name == "host_plugin_state"
                for s in family.samples if s.labels["plugin"] == "verdemo"
            }
    # One series per state, for the version the host has now: a dashboard counting loaded plugins
    # must not see 1.0.0 and 2.0.0 still loaded.
    assert samples == {("2.0.0", "loaded"): 0, ("2.0.0", "failed"): 0, ("2.0.0", "disabled"): 1,
                       ("2.0.0", "incompatible"): 0}


@pytest.mark.anyio
async def test_removed_plugins_config_schema_does_not_refuse_the_next_configuration(
    dropins: Path, tmp_path: Path  # noqa: F811
) -> None:
    write_plugin(dropins, "alpha", "1", body=SECTIONED.replace("{name}", "alpha"))
    config_file = tmp_path / "host.toml"

    def write_config(alpha: str) -> None:
        config_file.write_text(
            f'[logging]\ndir = ""\n[http]\nenabled = false\n[host]\ncontrol_socket = ""\n'
            f'[host.reload]\nplugins_dir = "{dropins}"\nwatch_plugins_dir = false\nwatch_entry_points = false\n'
            f"[alpha]\n{alpha}\n"
        )

    write_config('greeting = "hi"')
    host = build_host(load_config(config_file, environ={}), entry_points=False)
    host.add_connector(LoopbackConnector())
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            (dropins / "alpha.py").unlink()
            assert (await host.reloader.reload_plugin("alpha")).outcome == "unloaded"
            # The operator prepares [alpha] for the plugin's next major version (other keys).
            write_config('salutation = "hey"')
            await host.reloader.reload_config(reason="test")
            applied = host.config.data.get("alpha")
            host.request_shutdown()
    assert applied == {"salutation": "hey"}  # not refused by the schema of a plugin that is gone


class CrashingService:
    """Two background services; one crashes a second after it started (a poller hitting a bug)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.ticks = 0
        self.audit: list[AuditEntry] = []

    @hookimpl
    async def on_startup(self, host):
        async def poller(*, task_status):
            task_status.started()
            await trio.sleep(1)
            raise self.exc

        async def ticker(*, task_status):
            task_status.started()
            while True:
                await trio.sleep(1)
                self.ticks += 1

        await host.start_service(poller)
        await host.start_service(ticker)

    @hookimpl
    def on_audit(self, entry):
        self.audit.append(entry)


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [RuntimeError("poller bug"), SystemExit(11)], ids=["RuntimeError", "SystemExit"])
async def test_a_crashing_background_service_ends_alone(exc, host_logs) -> None:
    plugin = CrashingService(exc)
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("svc", plugin)) as th:
            await trio.sleep(5)
            assert (await th.send("hi")).texts == ["echo: hi"]
            ticks = plugin.ticks
            await trio.sleep(3)
            assert plugin.ticks > ticks  # the plugin's other service goes on
            metrics = th.host.metrics.render().decode()
    assert 'host_plugin_service_failures_total{plugin="svc"} 1.0' in metrics
    assert [(e.action, e.target) for e in plugin.audit if e.action == "service_failed"] == [("service_failed", "svc")]
    assert any("poller" in m and "failed" in m for m in host_logs.messages("ERROR"))


class ServiceFailsToStart:
    @hookimpl
    async def on_startup(self, host):
        async def broken(*, task_status):
            raise OSError("port 8080 already in use")

        await host.start_service(broken)


@pytest.mark.anyio
async def test_a_service_failing_before_it_started_fails_its_plugins_startup() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo()), ("svc", ServiceFailsToStart())) as th:
            record = th.host.plugins.records["svc"]
            assert record.state == "failed" and "port 8080 already in use" in (record.error or "")
            assert (await th.send("hi")).texts == ["echo: hi"]
