"""Helpers for the outbound tests (replies, cards, tokens, media) against the real emulator.

``open_outbound`` runs an ``Outbound`` (with its card service) pointed at an emulator; ``user_message``
has a user say something in the emulator and returns the host ``Message`` the connector would make of
it (the same ``convert_bot_message``), with its real session webhook. No Stream connection is needed:
these tests exercise what the connector sends, over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from host_dingtalk_connector.config import AppConfig
from host_dingtalk_connector.convert import convert_bot_message
from host_dingtalk_connector.emulator import Emulator
from host_dingtalk_connector.identity import NullResolver
from host_dingtalk_connector.outbound import Outbound
from host_dingtalk_connector.retry import RetrySettings

from host.config import Secret
from host.metrics import Metrics
from host.model import Message

#: Fast retries for tests (the defaults wait up to 8 s between attempts).
FAST_RETRY = RetrySettings(
    attempts=4, base_delay=0.01, max_delay=0.05, qps_delay=0.2, deadline=10.0, timeout=10.0
)
#: The public AI card template of the official SDK (the emulator accepts any id).
TEMPLATE = "382e4302-551d-4880-bf29-a30acfab2e71.schema"


def app_for(emu: Emulator, name: str = "default", **overrides: Any) -> AppConfig:
    fields: dict[str, Any] = {
        "name": name,
        "client_id": emu.settings.client_id,
        "client_secret": Secret(emu.settings.client_secret),
        "robot_code": emu.settings.effective_robot_code,
        "openapi_endpoint": emu.base_url,
    }
    fields.update(overrides)
    return AppConfig(**fields)


@asynccontextmanager
async def open_outbound(
    emu: Emulator,
    *,
    apps: list[AppConfig] | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> AsyncIterator[Outbound]:
    """An ``Outbound`` for ``emu`` with its card service running; closed on exit."""
    settings.setdefault("retry", FAST_RETRY)
    outbound = Outbound(apps or [app_for(emu)], metrics=metrics or Metrics(), **settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(outbound.run)
            try:
                yield outbound
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await outbound.aclose()


async def user_message(
    emu: Emulator,
    text: str = "hello",
    *,
    app: str = "default",
    connector: str = "dingtalk",
    **kwargs: Any,
) -> tuple[Message, dict[str, Any]]:
    """A user message said in the emulator, converted as the connector converts it."""
    sent = await emu.send_user_message(text, **kwargs)
    message = convert_bot_message(
        sent["payload"],
        connector=connector,
        app=app,
        resolver=NullResolver(),
        frame_message_id="test-frame",
    )
    return message, sent


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of a sample (0 when absent)."""
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def calls(emu: Emulator, api: str) -> list[dict[str, Any]]:
    return emu.calls(api)


def nlp_bridge_plugin() -> Any | None:
    """The NLP bridge's plugin module when that plugin is installed (the e2e tests' answering side).

    ``DINGTALK_TESTS_WITHOUT_NLP_BRIDGE=1`` pretends it is not (to run the stand-in locally).
    """
    import importlib.util
    import os

    if (
        os.environ.get("DINGTALK_TESTS_WITHOUT_NLP_BRIDGE")
        or importlib.util.find_spec("host_nlp_bridge") is None
    ):
        return None
    import host_nlp_bridge.plugin

    return host_nlp_bridge.plugin


@asynccontextmanager
async def open_bot(
    emu: Emulator,
    *plugins: tuple[str, Any],
    dingtalk: dict[str, Any] | None = None,
    sections: dict[str, Any] | None = None,
    host: dict[str, Any] | None = None,
) -> AsyncIterator[Any]:
    """A real host (the dingtalk plugin, ``plugins``) connected to ``emu``; yields the ``Host``.

    ``dingtalk`` is merged into the ``[dingtalk]`` table, ``sections`` adds other tables (e.g.
    ``nlp_bridge``), ``host`` into ``[host]``. The host is shut down on exit (and the run awaited).
    """
    from host_dingtalk_connector import plugin as dingtalk_plugin
    from streamkit import QUIET_STREAM

    from host.config import load_config
    from host.runtime import build_host

    data: dict[str, Any] = {
        "logging": {"dir": ""},
        "http": {"enabled": False},
        "host": {
            "control_socket": "",
            "reload": {"watch_entry_points": False},
            "shutdown_timeout": 10.0,
            **(host or {}),
        },
        "dingtalk": {
            "client_id": emu.settings.client_id,
            "client_secret": emu.settings.client_secret,
            "openapi_endpoint": emu.base_url,
            "stream": dict(QUIET_STREAM),
            "retry": {"base_delay": 0.05, "max_delay": 0.5},
            **(dingtalk or {}),
        },
        **(sections or {}),
    }
    config = load_config(data=data, environ={})
    running = build_host(
        config, plugins=[("dingtalk_connector", dingtalk_plugin), *plugins], entry_points=False
    )
    assert "dingtalk" in running.connectors, "the dingtalk connector was not registered"
    async with trio.open_nursery() as nursery:
        await nursery.start(running.run)
        try:
            yield running
        finally:
            running.request_shutdown()
