"""The host's HTTP server: /metrics moving with traffic, truthful /healthz and /readyz, plugin routes.

Every test runs a real hypercorn server on 127.0.0.1 (port 0) and talks to it with httpx. Real
sockets, so these tests use the real clock (see ``anyio_backend`` below) and an absolute
``trio.fail_after`` each; nothing asserts a duration.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from host import hookimpl, testing
from host.config import load_config
from host.errors import ConfigError
from host.http import HttpServerError
from host.loopback import LoopbackConnector
from host.runtime import Host, build_host
from host.testing import open_test_host

HTTP_ON = {"http": {"enabled": True, "addr": "127.0.0.1:0"}}
DEADLINE = 20  # seconds; generous for a loaded 2-core machine, never reached when things work


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # Real clock: with the virtual clock's autojump, time would leap while we wait on sockets and
    # fire hypercorn's and httpx's timeouts spuriously.
    return ("trio", {})


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(response.text)


@asynccontextmanager
async def http_test_host(*plugins: tuple[str, Any]) -> AsyncIterator[tuple[testing.TestHost, httpx.AsyncClient]]:
    async with open_test_host(*plugins, config=HTTP_ON) as th:
        async with httpx.AsyncClient(base_url=th.host.http.url, timeout=DEADLINE) as client:
            yield th, client


class Echo:
    @hookimpl
    def on_message(self, message):
        if message.text == "boom":
            raise RuntimeError("plugin bug")
        return f"echo: {message.text}"


# -- /metrics ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_metrics_move_as_messages_flow() -> None:
    with trio.fail_after(DEADLINE):
        async with http_test_host(("echo", Echo())) as (th, client):
            response = await client.get("/metrics")
            assert response.headers["content-type"] == CONTENT_TYPE_LATEST
            before = parse_metrics(response.text)
            for text in ("one", "two", "three"):
                assert (await th.send(text)).texts == [f"echo: {text}"]
            assert (await th.send("boom")).texts == [th.host.config.host.apology]
            after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("host_messages_received_total", connector="loopback") == 4
    assert delta("host_messages_handled_total", connector="loopback", outcome="answered") == 3
    assert delta("host_messages_handled_total", connector="loopback", outcome="apology") == 1
    assert delta("host_message_latency_seconds_count", connector="loopback") == 4
    assert delta("host_message_latency_seconds_bucket", connector="loopback", le="+Inf") == 4
    assert delta("host_queue_wait_seconds_count") == 4
    assert delta("host_hook_duration_seconds_count", plugin="echo", hook="on_message") == 4
    assert delta("host_hook_errors_total", plugin="echo", hook="on_message", kind="error") == 1
    assert value(after, "host_plugin_state", plugin="echo", version="", state="loaded") == 1
    assert value(after, "host_plugin_state", plugin="echo", version="", state="failed") == 0
    assert value(after, "host_queue_depth") == 0
    assert value(after, "host_in_flight_messages") == 0


@pytest.mark.anyio
async def test_metrics_show_a_failed_plugin_and_a_full_queue() -> None:
    class BadStart:
        @hookimpl
        def on_startup(self):
            raise RuntimeError("cannot open its database")

    class Slow:
        def __init__(self) -> None:
            self.release = trio.Event()

        @hookimpl
        async def on_message(self, message):
            await self.release.wait()
            return "done"

    slow = Slow()
    config = {**HTTP_ON, "host": {"concurrency": 1, "queue_size": 1}}
    with trio.fail_after(DEADLINE):
        async with open_test_host(("bad", BadStart()), ("slow", slow), config=config) as th:
            async with httpx.AsyncClient(base_url=th.host.http.url) as client:
                lb = th.loopback
                messages = [lb.make_message(f"m{i}") for i in range(3)]
                assert lb.try_send_message(messages[0])
                while th.host.statistics()["queue_depth"]:  # the worker took the first one
                    await trio.sleep(0.01)
                assert lb.try_send_message(messages[1])  # waits in the queue
                assert not lb.try_send_message(messages[2])  # refused: queue full
                samples = await scrape(client)
                assert value(samples, "host_queue_depth") == 1
                assert value(samples, "host_in_flight_messages") == 2
                assert value(samples, "host_intake_rejected_total", connector="loopback", reason="full") == 1
                assert value(samples, "host_plugin_state", plugin="bad", version="", state="failed") == 1
                assert value(samples, "host_plugin_state", plugin="bad", version="", state="loaded") == 0
                slow.release.set()
                await th.host.wait_idle()


@pytest.mark.anyio
async def test_a_broken_collector_gives_a_500_not_a_traceback(host_logs) -> None:
    class Broken(Collector):
        broken = False

        def collect(self):
            if self.broken:
                raise RuntimeError("collector bug")
            return []

    with trio.fail_after(DEADLINE):
        async with http_test_host() as (th, client):
            collector = Broken()
            th.host.metrics.register_collector(collector)
            collector.broken = True
            response = await client.get("/metrics")
            assert response.status_code == 500
            assert "Traceback" not in response.text and "collector bug" not in response.text
            assert (await client.get("/healthz")).status_code == 200
    assert any("metrics collection failed" in r["message"] for r in host_logs.errors())


# -- /healthz and /readyz ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_healthz_and_readyz_when_ready() -> None:
    with trio.fail_after(DEADLINE):
        async with http_test_host(("echo", Echo())) as (_th, client):
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok"
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            body = ready.json()
            assert body["ready"] is True and body["reasons"] == []
            assert body["connectors"] == {"loopback": True}
            assert body["plugins"] == {"loaded": ["echo"], "failed": []}
            assert (await client.head("/healthz")).status_code == 200
            assert (await client.get("/nowhere")).status_code == 404


@pytest.mark.anyio
async def test_readyz_is_false_until_the_host_has_started() -> None:
    class GatedStartup:
        def __init__(self) -> None:
            self.gate = trio.Event()

        @hookimpl
        async def on_startup(self):
            await self.gate.wait()

    gated = GatedStartup()
    host = build_host(load_config(data={"logging": {"dir": ""}, **HTTP_ON}, environ={}), plugins=[("gated", gated)],
                      entry_points=False)
    host.add_connector(LoopbackConnector())
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.run)
            await host.http.wait_listening()
            async with httpx.AsyncClient(base_url=host.http.url) as client:
                # The HTTP server is up while plugins are still starting: alive, not ready.
                assert (await client.get("/healthz")).status_code == 200
                response = await client.get("/readyz")
                assert response.status_code == 503
                assert response.json()["ready"] is False
                assert "host has not finished starting" in response.json()["reasons"]
                gated.gate.set()
                while not host.started:
                    await trio.sleep(0.01)
                assert (await client.get("/readyz")).status_code == 200
            host.request_shutdown()
    assert not host.http.listening


@pytest.mark.anyio
async def test_readyz_follows_connector_readiness(host_logs) -> None:
    class Flaky(LoopbackConnector):
        def __init__(self) -> None:
            super().__init__("flaky")
            self.broken = False

        def is_ready(self) -> bool:
            if self.broken:
                raise RuntimeError("is_ready bug")
            return self.ready

    with trio.fail_after(DEADLINE):
        async with open_test_host(config=HTTP_ON) as th:
            flaky = Flaky()
            th.host.add_connector(flaky)  # not served: never became ready
            async with httpx.AsyncClient(base_url=th.host.http.url) as client:
                response = await client.get("/readyz")
                assert response.status_code == 503
                assert response.json()["connectors"] == {"loopback": True, "flaky": False}
                assert response.json()["reasons"] == ["connector flaky is not ready"]

                flaky.ready = True  # "connected"
                assert (await client.get("/readyz")).status_code == 200

                th.loopback.ready = False  # e.g. the platform dropped the connection
                response = await client.get("/readyz")
                assert response.status_code == 503
                assert response.json()["reasons"] == ["connector loopback is not ready"]
                th.loopback.ready = True
                assert (await client.get("/readyz")).status_code == 200

                flaky.broken = True
                assert (await client.get("/readyz")).status_code == 503
                flaky.broken = False
            del th.host.connectors["flaky"]
    assert any("is_ready() raised" in r["message"] for r in host_logs.errors())


@pytest.mark.anyio
async def test_readyz_is_false_while_shutting_down() -> None:
    class Busy:
        def __init__(self) -> None:
            self.started = trio.Event()
            self.release = trio.Event()

        @hookimpl
        async def on_message(self, message):
            self.started.set()
            await self.release.wait()
            return "finally"

    busy = Busy()
    with trio.fail_after(DEADLINE):
        async with http_test_host(("busy", busy)) as (th, client):
            th.loopback.try_send_message(th.loopback.make_message("work"))
            await busy.started.wait()
            th.host.request_shutdown()
            while not th.host.closed:
                await trio.sleep(0.01)
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert "host is shutting down" in response.json()["reasons"]
            assert (await client.get("/healthz")).status_code == 200  # draining, still alive
            busy.release.set()


@pytest.mark.anyio
async def test_readyz_lists_failed_plugins() -> None:
    class BadStart:
        @hookimpl
        def on_startup(self):
            raise RuntimeError("no database")

    with trio.fail_after(DEADLINE):
        async with http_test_host(("bad", BadStart()), ("echo", Echo())) as (_th, client):
            body = (await client.get("/readyz")).json()
    assert body["plugins"] == {"loaded": ["echo"], "failed": ["bad"]}
    assert "no database" not in str(body)  # names only: error texts stay in the log


# -- routes added by plugins -------------------------------------------------------------------


class Webhook:
    """A plugin that adds routes the way a webhook connector or an admin API will."""

    @hookimpl
    def register_connectors(self, host, register):
        async def callback(request: Request) -> Response:
            body = await request.body()
            return PlainTextResponse(f"got {len(body)} bytes")

        async def crash(request: Request) -> Response:
            raise RuntimeError("endpoint bug with details")

        async def status(request: Request) -> Response:
            return PlainTextResponse("admin ok")

        host.http.add_route("/dingtalk/callback", callback, methods=["POST"])
        host.http.add_route("/crash", crash)
        host.http.mount("/admin", Starlette(routes=[Route("/status", status)]))


@pytest.mark.anyio
async def test_plugins_add_routes_to_the_same_server(host_logs) -> None:
    with trio.fail_after(DEADLINE):
        async with http_test_host(("webhook", Webhook())) as (th, client):
            http = th.host.http
            owners = {(r.path, r.kind): r.owner for r in http.routes()}
            assert owners[("/dingtalk/callback", "http")] == "webhook"
            assert owners[("/admin", "mount")] == "webhook"
            assert owners[("/metrics", "http")] == "host"

            response = await client.post("/dingtalk/callback", content=b"12345")
            assert (response.status_code, response.text) == (200, "got 5 bytes")
            assert (await client.get("/dingtalk/callback")).status_code == 405
            assert (await client.get("/admin/status")).text == "admin ok"

            crashed = await client.get("/crash")
            assert crashed.status_code == 500
            assert "details" not in crashed.text and "Traceback" not in crashed.text
            assert (await client.get("/healthz")).status_code == 200

            with pytest.raises(ValueError, match="already served by webhook"):
                http.add_route("/dingtalk/callback", lambda request: None)
            with pytest.raises(ValueError, match="already served by host"):
                http.add_route("/metrics", lambda request: None)
            with pytest.raises(ValueError, match="already served by webhook"):
                http.add_route("/admin/other", lambda request: None)
            with pytest.raises(ValueError, match="shadow"):
                http.mount("/", Starlette())
            with pytest.raises(ValueError, match="must start with"):
                http.add_route("relative", lambda request: None)

            assert http.remove_routes("webhook") == 3
            assert (await client.post("/dingtalk/callback")).status_code == 404
            assert (await client.get("/admin/status")).status_code == 404
            assert (await client.get("/metrics")).status_code == 200
            with pytest.raises(ValueError):
                http.remove_routes("host")
    [error] = host_logs.errors()
    assert error["plugin"] == "webhook" and "/crash" in error["message"]


# -- configuration and startup errors ----------------------------------------------------------


def test_http_configuration_and_environment_override() -> None:
    settings = load_config(data={}, environ={}).section("http")
    assert (settings.enabled, settings.addr) == (True, "127.0.0.1:9464")
    settings = load_config(data={}, environ={"HOST_HTTP_ADDR": "0.0.0.0:9100"}).section("http")
    assert settings.host_port() == ("0.0.0.0", 9100)
    assert load_config(data={"http": {"addr": "[::1]:0"}}, environ={}).section("http").host_port() == ("::1", 0)
    for bad in ("9464", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":9464"):
        with pytest.raises(ConfigError, match=r"\[http\].*addr: expected HOST:PORT"):
            load_config(data={"http": {"addr": bad}}, environ={})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(data={}, environ={"HOST_HTTP_ADDR": "nonsense"})
    with pytest.raises(ConfigError, match=r"\[http\]"):
        load_config(data={"http": {"port": 80}}, environ={})


@pytest.mark.anyio
async def test_address_in_use_is_a_clear_startup_error(host_logs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        host = build_host(load_config(data={"logging": {"dir": ""}, "http": {"addr": addr}}, environ={}),
                          entry_points=False)
        with trio.fail_after(DEADLINE), pytest.RaisesGroup(
            pytest.RaisesExc(HttpServerError, match=f"cannot listen on '{addr}'.*in use"), flatten_subgroups=True
        ):
            await host.run()
    assert not host.started
    assert any("cannot listen" in r["message"] for r in host_logs.errors())


@pytest.mark.anyio
async def test_http_server_is_off_in_test_hosts_by_default() -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(("echo", Echo())) as th:
            assert isinstance(th.host, Host)
            assert not th.host.http.enabled and not th.host.http.listening
            with pytest.raises(RuntimeError, match="disabled"):
                _ = th.host.http.url
            assert (await th.send("hi")).texts == ["echo: hi"]
