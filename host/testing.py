"""Test tooling for plugin authors: an opt-in pytest plugin.

Enable it in a ``conftest.py``::

    pytest_plugins = ["host.testing"]

Then, in a test (anyio's pytest plugin runs it on trio with a virtual clock, see ``anyio_backend``)::

    @pytest.mark.anyio
    async def test_answers(host_logs):
        async with open_test_host(("my_plugin", my_plugin_module)) as th:
            result = await th.send("hello")
            assert result.texts == ["hello back"]
        assert not host_logs.errors()

``open_test_host`` runs a real ``Host`` with the chosen plugins and the loopback connector; ``send``
offers a message through the normal intake queue and returns once the host is idle, with every reply
(and streamed chunk) produced for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from loguru import logger

from host.config import load_config
from host.logs import current_plugin, current_request_id
from host.loopback import Delivery, LoopbackConnector
from host.model import Message
from host.runtime import Host, build_host

__all__ = ["CapturedLogs", "SendResult", "TestHost", "anyio_backend", "host_logs", "open_test_host"]


@dataclass
class SendResult:
    """Replies produced for one message sent through ``TestHost.send``."""

    message: Message
    deliveries: list[Delivery]

    @property
    def texts(self) -> list[str]:
        return [d.reply.text for d in self.deliveries]

    @property
    def chunks(self) -> list[list[str]]:
        return [d.chunks for d in self.deliveries if d.streamed]


@dataclass
class TestHost:
    """A running host with a loopback connector."""

    host: Host
    loopback: LoopbackConnector

    async def send(self, text: str, **kwargs: Any) -> SendResult:
        """Send a message as a user and wait until the host handled it (and everything else)."""
        message = self.loopback.make_message(text, **kwargs)
        await self.loopback.send_message(message)
        await self.host.wait_idle()
        return SendResult(message, self.loopback.replies_to(message.id))

    async def send_message(self, message: Message) -> SendResult:
        await self.loopback.send_message(message)
        await self.host.wait_idle()
        return SendResult(message, self.loopback.replies_to(message.id))


@asynccontextmanager
async def open_test_host(
    *plugins: tuple[str, Any],
    config: dict[str, Any] | None = None,
    entry_points: bool = False,
) -> AsyncIterator[TestHost]:
    """Run a host with ``plugins`` (``(name, module_or_object)`` pairs) and a loopback connector.

    ``config`` is the TOML document as a dict (defaults apply to what it leaves out; the error log is
    off unless configured). Installed plugins are loaded too only when ``entry_points=True``. The host
    is shut down gracefully on exit.
    """
    # Quiet defaults for tests: no error log file, no HTTP server, no control socket, no
    # entry-point polling (each can be turned on by ``config``).
    defaults: dict[str, Any] = {
        "logging": {"dir": ""},
        "http": {"enabled": False},
        "host": {"control_socket": "", "reload": {"watch_entry_points": False}},
    }
    data = _deep_merge(defaults, config or {})
    host = build_host(load_config(data=data, environ={}), plugins=plugins, entry_points=entry_points)
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        try:
            yield TestHost(host, loopback)
        finally:
            host.request_shutdown()


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class CapturedLogs:
    """Loguru records captured during a test (message, level, plugin, request id, exception)."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["level"] in ("ERROR", "CRITICAL")]

    def messages(self, level: str | None = None) -> list[str]:
        return [r["message"] for r in self.records if level is None or r["level"] == level]

    def text(self) -> str:
        return "\n".join(r["line"] for r in self.records)


@pytest.fixture
def host_logs() -> Iterator[CapturedLogs]:
    """Capture every loguru record emitted during the test."""
    from host.logs import _json_line

    captured = CapturedLogs()

    def sink(message: Any) -> None:
        record = message.record
        exc = record["exception"]
        captured.records.append(
            {
                "message": record["message"],
                "level": record["level"].name,
                "plugin": record["extra"].get("plugin", current_plugin.get()),
                "request_id": record["extra"].get("request_id", current_request_id.get()),
                "exception": None if exc is None else exc.value,
                "line": _json_line(record),
            }
        )

    handler_id = logger.add(sink, level="TRACE", diagnose=False, backtrace=False)
    try:
        yield captured
    finally:
        logger.remove(handler_id)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Run ``@pytest.mark.anyio`` tests on trio with a virtual clock: sleeps are instant."""
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
