"""The ``dingtalk_connector`` plugin: configuration section, the Stream connector, the demo.

Entry point ``host.plugins: dingtalk_connector = "host_dingtalk_connector.plugin"``.

* ``register_config_sections``: ``[dingtalk]`` (``host_dingtalk_connector.config.DingTalkSection``).
* ``register_commands``: ``python -m host demo`` (``host_dingtalk_connector.demo``).
* ``register_connectors``: one ``DingTalkConnector`` serving every configured app; nothing when no
  credentials are configured (config or ``DINGTALK_CLIENT_ID`` / ``DINGTALK_CLIENT_SECRET``) or
  ``enabled = false``. A configuration error raises (the host logs it and starts without us).
* ``register_middleware``: downloads the files of incoming messages before plugins see them
  (``Media.path``), and deletes them once the message is handled.
* ``on_startup``: starts the ``TaskRunner`` in which AI cards stream their updates (a host service,
  so it outlives the connector while the host drains replies at shutdown).
* ``on_shutdown``: at host shutdown, ends AI cards still open and closes the HTTP client (after the
  host drained its replies); when only this plugin is reloaded, lets open replies finish first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from host import hookimpl
from host.logs import logger
from host_dingtalk_connector.config import DingTalkSection, resolve_apps
from host_dingtalk_connector.connector import DingTalkConnector
from host_dingtalk_connector.errors import DingTalkConfigError
from host_dingtalk_connector.identity import load_resolver
from host_dingtalk_connector.tasks import TaskRunner
from host_dingtalk_connector.webhook_connector import WebhookConnector

if TYPE_CHECKING:
    from host.runtime import Host

host_api = ">=1.0,<2"

#: The card runner of each running host (this module is imported afresh when the plugin reloads).
_runners: WeakKeyDictionary[Host, TaskRunner] = WeakKeyDictionary()


def _connectors(host: Host) -> list[DingTalkConnector]:
    return [c for c in host.connectors.values() if isinstance(c, DingTalkConnector)]


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
    if section.mode != "stream" and not host.http.enabled:
        raise DingTalkConfigError(
            f"[dingtalk] mode = {section.mode!r} receives HTTP callbacks on the host's HTTP server: "
            "set [http] enabled = true (or mode = \"stream\")"
        )
    # Webhook mode (HTTP callbacks, webhook_connector.py) extends the Stream connector.
    connector_class = DingTalkConnector if section.mode == "stream" else WebhookConnector
    connector = connector_class(
        section.connector_name,
        apps,
        section.stream,
        metrics=host.metrics,
        resolver=resolver,
        replies=section.replies,
        cards=section.cards,
        media=section.media,
        retry=section.retry,
        budget=section.budget,
    )
    if isinstance(connector, WebhookConnector):
        connector.setup_webhook(host, section.webhook, receive_stream=section.mode == "both")
    previous = host.connectors.get(section.connector_name)
    if previous is not None:  # a hot reload: remember what the old version already accepted
        connector.inherit_dedup(previous)
    runner = _runners.get(host)
    if runner is not None:  # a reload: on_startup ran before the connectors were registered
        connector.outbound.attach(runner)
    register(connector)
    logger.info(
        "dingtalk connector {}: app(s) {} via {}",
        section.connector_name,
        ", ".join(f"{a.name} ({a.client_id})" for a in apps),
        ", ".join(sorted({a.openapi_endpoint for a in apps})),
    )


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    from host_dingtalk_connector.demo import configure_parser, run_demo

    register(
        "demo",
        run_demo,
        help="chat with your bot in the terminal, against a local DingTalk emulator (no credentials)",
        configure=configure_parser,
    )


@hookimpl
def register_middleware(host: Host, register: Callable[..., None]) -> None:
    for connector in _connectors(host):
        register(connector.outbound.media_middleware())


@hookimpl
async def on_startup(host: Host) -> None:
    runner = TaskRunner()
    await host.start_service(runner.run, name="dingtalk card updates")
    _runners[host] = runner
    for connector in _connectors(host):
        connector.outbound.attach(runner)


@hookimpl
async def on_shutdown(host: Host) -> None:
    # host.started: the host keeps running and only this plugin is being unloaded or reloaded.
    reloading = host.started
    for connector in _connectors(host):
        if reloading:
            # The host starts the new version's connector before stopping this one, which keeps
            # answering the messages it accepted meanwhile: its HTTP client must stay open until then.
            connector.retire_when_stopped()
        else:
            await connector.aclose()
