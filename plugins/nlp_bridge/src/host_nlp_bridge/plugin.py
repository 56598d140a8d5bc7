"""The ``nlp_bridge`` plugin: the hook implementations the host calls.

Entry point ``host.plugins: nlp_bridge = "host_nlp_bridge.plugin"``. One ``Bridge`` per running host
is created in ``on_startup`` (HTTP clients opened) and closed in ``on_shutdown``. ``on_message``
hands every message to it; the bridge never raises into the host.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from host import Message, Reply, hookimpl
from host.logs import current_plugin, logger
from host.model import ReplyResult
from host_nlp_bridge.bridge import Bridge, HostLimits
from host_nlp_bridge.config import NlpBridgeSection, resolve
from host_nlp_bridge.metrics import BridgeMetrics

if TYPE_CHECKING:
    from host.runtime import Host

__all__ = ["SECTION", "bridge_for", "on_message", "on_shutdown", "on_startup", "register_config_sections"]

host_api = ">=1.0,<2"

#: The configuration section this plugin owns.
SECTION = "nlp_bridge"

_bridges: weakref.WeakKeyDictionary[Host, Bridge] = weakref.WeakKeyDictionary()


def bridge_for(host: Host) -> Bridge | None:
    """The bridge serving ``host`` (``None`` before ``on_startup`` or after ``on_shutdown``)."""
    return _bridges.get(host)


@hookimpl
def register_config_sections(register: Callable[..., None]) -> None:
    register(SECTION, NlpBridgeSection)


@hookimpl
async def on_startup(host: Host) -> None:
    section: NlpBridgeSection = host.config.section(SECTION)
    settings = resolve(section, os.environ)
    plugin = current_plugin.get() or SECTION
    limits = HostLimits(
        message_timeout=host.dispatcher.timeout_for(plugin, "on_message"),
        stream_timeout=host.config.host.stream_timeout,
    )
    bridge = Bridge(settings, BridgeMetrics(host.metrics), limits=limits)
    _bridges[host] = bridge
    if not os.environ.get("NLP_BASE_URL") and (os.environ.get("NLP_API_KEY") or os.environ.get("NLP_MODEL")):
        logger.warning("nlp_bridge: NLP_API_KEY / NLP_MODEL are ignored because NLP_BASE_URL is not set")
    if settings.echo_only:
        logger.info(
            "nlp_bridge: no NLP backend is configured, so the built-in echo backend answers "
            "(replies start with '[echo]'); set NLP_BASE_URL (with NLP_API_KEY, NLP_MODEL) or "
            "[nlp_bridge.backends] in host.toml to use a real one"
        )
    else:
        configured = [line for name, line in zip(bridge.backends, bridge.describe(), strict=True) if name != "echo"]
        logger.info(
            "nlp_bridge: backends {}; default {}{}{}",
            "; ".join(configured),
            settings.default_backend,
            f", fallback {' -> '.join(settings.fallback)}" if settings.fallback else "",
            f" (from {', '.join(settings.env_used)})" if settings.env_used else "",
        )


@hookimpl
async def on_shutdown(host: Host) -> None:
    bridge = _bridges.pop(host, None)
    if bridge is not None:
        await bridge.aclose()


@hookimpl
async def on_message(host: Host, message: Message) -> ReplyResult:
    bridge = _bridges.get(host)
    if bridge is None:
        return None
    try:
        return await bridge.handle(message)
    except Exception as exc:
        # A bug of ours: the user still gets an honest answer rather than the host's generic one.
        logger.opt(exception=exc).error("nlp_bridge: handling the message failed: {!r}", exc)
        return Reply.text_(bridge.messages.failure)
