"""Helpers for the Stream connector tests: a real Host wired to one or more emulators.

Everything runs for real on 127.0.0.1: the emulator's HTTP server and gateway, httpx registration,
trio-websocket connections, the host's queue and workers, and a small recording plugin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from host_dingtalk_connector import plugin as dingtalk_plugin
from host_dingtalk_connector.connector import DingTalkConnector
from host_dingtalk_connector.emulator import Emulator

from host import Event, Message, hookimpl
from host.config import load_config
from host.runtime import Host, build_host

#: Stream settings for tests: keepalive timers far away unless a test wants them.
QUIET_STREAM: dict[str, Any] = {
    "ping_interval": 3600.0,
    "pong_timeout": 30.0,
    "idle_timeout": 7200.0,
    "app_idle_timeout": 0.0,
    "startup_wait": 10.0,
    "shutdown_timeout": 5.0,
}


@dataclass
class Recorder:
    """A test plugin: records messages and events, answers ``echo: <text>`` unless told otherwise."""

    messages: list[Message] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    answer: bool = True
    #: Event types whose on_event raises (the connector must ACK LATER).
    failing_event_types: set[str] = field(default_factory=set)
    #: Fail each failing event type only this many times (then succeed).
    failures_left: dict[str, int] = field(default_factory=dict)
    gate: trio.Event | None = None
    slow_seconds: float = 0.0
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    event_seconds: float = 0.0

    @hookimpl
    async def on_message(self, message: Message) -> str | None:
        self.started.append(message.id)
        self.messages.append(message)
        if self.gate is not None:
            await self.gate.wait()
        if self.slow_seconds:
            await trio.sleep(self.slow_seconds)
        self.finished.append(message.id)
        return f"echo: {message.text}" if self.answer else None

    @hookimpl
    async def on_event(self, event: Event) -> None:
        self.events.append(event)
        if self.event_seconds:
            await trio.sleep(self.event_seconds)
        if event.type in self.failing_event_types:
            left = self.failures_left.get(event.type)
            if left is None or left > 0:
                if left is not None:
                    self.failures_left[event.type] = left - 1
                raise RuntimeError(f"cannot handle {event.type} now")


def app_table(emu: Emulator, **extra: Any) -> dict[str, Any]:
    """Config of one app pointing at ``emu``."""
    return {
        "client_id": emu.settings.client_id,
        "client_secret": emu.settings.client_secret,
        "openapi_endpoint": emu.base_url,
        **extra,
    }


def dingtalk_config(emu: Emulator, *, stream: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {**app_table(emu), **extra, "stream": {**QUIET_STREAM, **(stream or {})}}


@dataclass
class RunningHost:
    host: Host

    @property
    def connector(self) -> DingTalkConnector:
        connector = self.host.connectors["dingtalk"]
        assert isinstance(connector, DingTalkConnector)
        return connector

    def metric(self, name: str, **labels: str) -> float:
        """Current value of a metric sample (0 when absent)."""
        for family in self.host.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0


@asynccontextmanager
async def open_host(
    dingtalk: dict[str, Any],
    *plugins: tuple[str, Any],
    host_settings: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    running: type[RunningHost] = RunningHost,
) -> AsyncIterator[Any]:
    """Run a real Host with the dingtalk plugin (configured by ``dingtalk``) and ``plugins``.

    ``http``: the ``[http]`` table (the HTTP server is off by default); ``running``: the wrapper
    yielded around the Host (``RunningHost`` or a subclass).
    """
    host_section = {
        "shutdown_timeout": 10.0,
        "control_socket": "",
        "reload": {"watch_entry_points": False},
        **(host_settings or {}),
    }
    data = {"logging": {"dir": ""}, "http": http or {"enabled": False}, "dingtalk": dingtalk,
            "host": host_section}  # fmt: skip
    config = load_config(data=data, environ={})
    host = build_host(config, plugins=[("dingtalk_connector", dingtalk_plugin), *plugins], entry_points=False)
    assert "dingtalk" in host.connectors, "the dingtalk connector was not registered"
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        try:
            yield running(host)
        finally:
            host.request_shutdown()


def acks(emu: Emulator) -> list[dict[str, Any]]:
    return [a for c in emu.connections() for a in c["acks"]]


def inbound_problems(emu: Emulator) -> list[dict[str, Any]]:
    return [p for c in emu.connections() for p in c["inboundProblems"]]


class ExplodingResolver:
    """A custom identity resolver with a bug for one user (``[dingtalk.identity] resolver``)."""

    def __init__(self, settings: Any) -> None:
        self.victim = settings.options.get("explode_for", "")

    def resolve(self, ids: Any) -> str | None:
        if ids.get("staffId") == self.victim:
            raise KeyError("resolver bug")
        return "site:" + ids.get("staffId", "?")
