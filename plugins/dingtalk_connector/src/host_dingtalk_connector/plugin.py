"""The ``dingtalk_connector`` plugin: configuration section and the Stream connector.

Entry point ``host.plugins: dingtalk_connector = "host_dingtalk_connector.plugin"``.

* ``register_config_sections``: ``[dingtalk]`` (``host_dingtalk_connector.config.DingTalkSection``).
* ``register_connectors``: one ``DingTalkConnector`` serving every configured app; nothing when no
  credentials are configured (config or ``DINGTALK_CLIENT_ID`` / ``DINGTALK_CLIENT_SECRET``) or
  ``enabled = false``. A configuration error raises (the host logs it and starts without us).
* ``on_shutdown``: closes the reply HTTP client, after the host drained its replies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from host import hookimpl
from host.logs import logger
from host_dingtalk_connector.config import DingTalkSection, resolve_apps
from host_dingtalk_connector.connector import DingTalkConnector
from host_dingtalk_connector.identity import load_resolver

if TYPE_CHECKING:
    from host.runtime import Host

host_api = ">=1.0,<2"


@hookimpl
def register_config_sections(register: Callable[..., None]) -> None:
    register("dingtalk", DingTalkSection)


@hookimpl
def register_connectors(host: Host, register: Callable[..., None]) -> None:
    section: DingTalkSection = host.config.section("dingtalk")
    if not section.enabled:
        logger.info("dingtalk connector disabled by [dingtalk] enabled = false")
        return
    apps = resolve_apps(section)
    if not apps:
        logger.info(
            "dingtalk connector: no credentials configured ([dingtalk] client_id/client_secret or "
            "DINGTALK_CLIENT_ID/DINGTALK_CLIENT_SECRET); not connecting"
        )
        return
    resolver = load_resolver(section.identity)
    register(DingTalkConnector(section.connector_name, apps, section.stream, metrics=host.metrics, resolver=resolver))
    logger.info(
        "dingtalk connector {}: app(s) {} via {}",
        section.connector_name,
        ", ".join(f"{a.name} ({a.client_id})" for a in apps),
        ", ".join(sorted({a.openapi_endpoint for a in apps})),
    )


@hookimpl
async def on_shutdown(host: Host) -> None:
    for connector in host.connectors.values():
        if isinstance(connector, DingTalkConnector):
            await connector.aclose()
