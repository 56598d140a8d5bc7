"""The ``[dingtalk]`` configuration section.

One app (the common case)::

    [dingtalk]
    client_id = "dingxxxxxxxx"                  # or env DINGTALK_CLIENT_ID
    client_secret = { env = "MY_APP_SECRET" }   # or env DINGTALK_CLIENT_SECRET
    # robot_code = "dingxxxxxxxx"              # defaults to client_id (internal-app robots)
    # openapi_endpoint = "https://api.dingtalk.com"   # or env DINGTALK_OPENAPI_ENDPOINT

Several apps, each with its own connections, dedup scope and (issue 5) token cache::

    [dingtalk.apps.sales]
    client_id = "dingaaaa"
    client_secret = { file = "/run/secrets/sales" }
    [dingtalk.apps.support]
    client_id = "dingbbbb"
    client_secret = { env = "SUPPORT_SECRET" }

Tuning lives in ``[dingtalk.stream]``, identity mapping in ``[dingtalk.identity]``, and what the
connector sends in ``[dingtalk.replies]``, ``[dingtalk.cards]`` (AI cards), ``[dingtalk.media]``,
``[dingtalk.retry]`` and ``[dingtalk.budget]`` (their structs live next to the code that uses them:
``replies``, ``cards``, ``media``, ``retry``, ``openapi``); every key is documented on its field and
in the plugin README.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from host.config import Secret
from host_dingtalk_connector.cards import CardSettings
from host_dingtalk_connector.errors import DingTalkConfigError
from host_dingtalk_connector.media import MediaSettings
from host_dingtalk_connector.openapi import ApiBudgetSettings, default_oapi_endpoint
from host_dingtalk_connector.replies import ReplySettings
from host_dingtalk_connector.retry import RetrySettings
from host_dingtalk_connector.webhook import WebhookSettings

__all__ = [
    "DEFAULT_OPENAPI_ENDPOINT",
    "AppConfig",
    "AppSettings",
    "DingTalkSection",
    "IdentitySettings",
    "StreamSettings",
    "resolve_apps",
]

DEFAULT_OPENAPI_ENDPOINT = "https://api.dingtalk.com"
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


class StreamSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.stream]``: connection engine tuning (seconds unless said otherwise)."""

    #: Interval between WebSocket pings we send.
    ping_interval: float = 20.0
    #: A ping whose pong has not arrived after this long means the connection is dead.
    pong_timeout: float = 10.0
    #: No inbound frame of any kind (message or pong) for this long means the connection is dead.
    idle_timeout: float = 60.0
    #: No *application* frame for this long: open a fresh connection and retire this one
    #: (make-before-break, so nothing is lost if it was alive). Catches connections the gateway
    #: has silently unregistered while pongs still flow. 0 disables.
    app_idle_timeout: float = 300.0
    #: First reconnect delay ceiling; doubles per consecutive failure (full jitter).
    backoff_base: float = 1.0
    #: Largest reconnect delay.
    backoff_cap: float = 60.0
    #: A connection up this long resets the backoff.
    healthy_after: float = 60.0
    #: After a SYSTEM ``disconnect``, keep reading the old connection at most this long.
    drain_timeout: float = 15.0
    #: Timeout of the registration call (``connections/open``).
    register_timeout: float = 10.0
    #: Timeout of the WebSocket handshake.
    connect_timeout: float = 10.0
    #: Frames longer than this (characters) are refused, counted, and the connection stays up.
    max_frame_bytes: int = 1_048_576
    #: Frames longer than this close the connection (1009) and reconnect; must exceed max_frame_bytes.
    transport_max_bytes: int = 16_777_216
    #: Frames buffered between the socket and our reader.
    receive_queue: int = 64
    #: EVENT frames / card callbacks processed at the same time per app; beyond, left un-ACKed.
    max_inflight_events: int = 16
    #: How long accepted message ids are remembered (at least 600).
    dedup_ttl: float = 900.0
    #: How many ids are remembered per app at most.
    dedup_max_entries: int = 20_000
    #: ``serve`` waits this long for the first connection before reporting started anyway.
    startup_wait: float = 10.0
    #: On shutdown, in-flight events get this long to finish (and be ACKed) before sockets close.
    shutdown_timeout: float = 5.0
    #: On a hot reload of this plugin, the old connector's event handlers still running get this long
    #: to finish before they are cancelled (DingTalk would then redeliver the EVENT and it would run
    #: again from the start). The host's ``on_event`` timeout bounds them too.
    reload_handler_timeout: float = 30.0
    #: Subscribe to EVENT ``*`` (events enabled in the developer console).
    events: bool = True
    #: CALLBACK topics to subscribe to (bot messages and card callbacks by default).
    topics: list[str] = msgspec.field(
        default_factory=lambda: ["/v1.0/im/bot/messages/get", "/v1.0/card/instances/callback"]
    )
    #: ``ua`` sent at registration.
    user_agent: str = "host-dingtalk-connector/0.1.0"


class IdentitySettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.identity]``: how senders become site user ids (see ``identity.py``)."""

    #: TOML or JSON file mapping staffId / unionId / senderId to site user ids.
    mapping_file: str = ""
    #: ``package.module:factory`` of a custom resolver (wins over mapping_file).
    resolver: str = ""
    #: Free-form options for a custom resolver.
    options: dict[str, str] = msgspec.field(default_factory=dict)


class AppSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.apps.<name>]``: one DingTalk app (robot)."""

    client_id: str = ""
    client_secret: Secret | None = None
    #: The robot's code; defaults to client_id (true for internal-app robots).
    robot_code: str = ""
    #: Defaults to ``[dingtalk] openapi_endpoint``.
    openapi_endpoint: str = ""
    #: Base of the old APIs (``/media/upload``); defaults to ``[dingtalk] oapi_endpoint``.
    oapi_endpoint: str = ""
    #: This app's AI card template; defaults to ``[dingtalk.cards] template_id``.
    card_template_id: str = ""


class DingTalkSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk]``."""

    #: Set to false to load the plugin without connecting.
    enabled: bool = True
    #: The connector's name in the host (messages carry it in ``Message.connector``).
    connector_name: str = "dingtalk"
    client_id: str = ""
    client_secret: Secret | None = None
    robot_code: str = ""
    openapi_endpoint: str = ""
    #: Base of the old APIs (``/media/upload``): empty means ``https://oapi.dingtalk.com`` when
    #: ``openapi_endpoint`` is DingTalk's, else ``openapi_endpoint`` itself (an emulator, a proxy).
    oapi_endpoint: str = ""
    apps: dict[str, AppSettings] = msgspec.field(default_factory=dict)
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    identity: IdentitySettings = msgspec.field(default_factory=IdentitySettings)
    replies: ReplySettings = msgspec.field(default_factory=ReplySettings)
    cards: CardSettings = msgspec.field(default_factory=CardSettings)
    media: MediaSettings = msgspec.field(default_factory=MediaSettings)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    budget: ApiBudgetSettings = msgspec.field(default_factory=ApiBudgetSettings)
    #: How bot messages arrive: ``stream`` (the Stream WebSocket), ``webhook`` (signed HTTP callbacks
    #: on the host's HTTP server, ``[dingtalk.webhook]``; see ``webhook.py``) or ``both``.
    mode: Literal["stream", "webhook", "both"] = "stream"
    webhook: WebhookSettings = msgspec.field(default_factory=WebhookSettings)


@dataclass(frozen=True)
class AppConfig:
    """One app, resolved from config and environment and checked."""

    name: str
    client_id: str
    client_secret: Secret
    robot_code: str
    openapi_endpoint: str
    #: Base of the old APIs (``/media/upload``); empty: derived from ``openapi_endpoint``.
    oapi_endpoint: str = ""
    #: The AI card template of this app ("" = streamed replies are sent as one message).
    card_template_id: str = ""

    def __repr__(self) -> str:
        return f"AppConfig(name={self.name!r}, client_id={self.client_id!r}, openapi_endpoint={self.openapi_endpoint!r})"


def _endpoint(value: str, where: str) -> str:
    value = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", value):
        raise DingTalkConfigError(
            f"{where}: expected an http(s) URL like {DEFAULT_OPENAPI_ENDPOINT}, got {value!r}"
        )
    return value


def _check_stream(s: StreamSettings) -> None:
    positive = (
        "ping_interval", "pong_timeout", "idle_timeout", "backoff_base", "backoff_cap", "healthy_after",
        "drain_timeout", "register_timeout", "connect_timeout", "shutdown_timeout", "reload_handler_timeout",
    )  # fmt: skip
    for name in positive:
        if getattr(s, name) <= 0:
            raise DingTalkConfigError(
                f"[dingtalk.stream] {name}: must be > 0, got {getattr(s, name)}"
            )
    if s.app_idle_timeout < 0:
        raise DingTalkConfigError("[dingtalk.stream] app_idle_timeout: must be >= 0 (0 disables)")
    if s.backoff_cap < s.backoff_base:
        raise DingTalkConfigError("[dingtalk.stream] backoff_cap: must be >= backoff_base")
    if s.dedup_ttl < 600:
        raise DingTalkConfigError(
            f"[dingtalk.stream] dedup_ttl: must be at least 600 s (DingTalk redelivers late), got {s.dedup_ttl}"
        )
    for name in ("max_frame_bytes", "receive_queue", "max_inflight_events", "dedup_max_entries"):
        if getattr(s, name) < 1:
            raise DingTalkConfigError(f"[dingtalk.stream] {name}: must be at least 1")
    if s.transport_max_bytes <= s.max_frame_bytes:
        raise DingTalkConfigError(
            "[dingtalk.stream] transport_max_bytes: must be larger than max_frame_bytes"
        )
    if not s.topics and not s.events:
        raise DingTalkConfigError(
            "[dingtalk.stream] topics: subscribe to at least one topic or enable events"
        )


def resolve_apps(
    section: DingTalkSection, environ: Mapping[str, str] | None = None
) -> list[AppConfig]:
    """The apps to connect, with environment fallbacks applied.

    Config values win; what config leaves empty comes from ``DINGTALK_CLIENT_ID`` /
    ``DINGTALK_CLIENT_SECRET`` (only for the single top-level app) and ``DINGTALK_OPENAPI_ENDPOINT``
    (for every app), as the official SDK reads them. Returns ``[]`` when no credentials are set at
    all (the connector is then not started). Raises ``DingTalkConfigError`` for half-configured apps.
    """
    environ = os.environ if environ is None else environ
    _check_stream(section.stream)
    if section.connector_name.strip() == "":
        raise DingTalkConfigError("[dingtalk] connector_name: must not be empty")
    default_endpoint = (
        section.openapi_endpoint
        or environ.get("DINGTALK_OPENAPI_ENDPOINT", "")
        or DEFAULT_OPENAPI_ENDPOINT
    )
    default_endpoint = _endpoint(default_endpoint, "[dingtalk] openapi_endpoint")
    raw: list[tuple[str, str, AppSettings]] = []
    top_level = section.client_id or section.client_secret is not None
    if section.apps:
        if top_level:
            raise DingTalkConfigError(
                "[dingtalk]: set credentials either at the top level (one app) or in [dingtalk.apps.<name>], not both"
            )
        raw = [(name, f"[dingtalk.apps.{name}]", app) for name, app in sorted(section.apps.items())]
    else:
        env_secret = environ.get("DINGTALK_CLIENT_SECRET", "")
        single = AppSettings(
            client_id=section.client_id or environ.get("DINGTALK_CLIENT_ID", "").strip(),
            client_secret=section.client_secret
            if section.client_secret is not None
            else (
                Secret(env_secret.strip(), source="env:DINGTALK_CLIENT_SECRET")
                if env_secret
                else None
            ),
            robot_code=section.robot_code,
            openapi_endpoint=section.openapi_endpoint,
            oapi_endpoint=section.oapi_endpoint,
        )
        if not single.client_id and single.client_secret is None:
            return []
        raw = [("default", "[dingtalk]", single)]
    apps: list[AppConfig] = []
    seen_ids: set[str] = set()
    for name, where, app in raw:
        if not _APP_NAME.match(name):
            raise DingTalkConfigError(
                f"{where}: app name must be 1-40 letters, digits, '_', '.' or '-'"
            )
        client_id = app.client_id.strip()
        if not client_id:
            raise DingTalkConfigError(f"{where} client_id: missing (or set DINGTALK_CLIENT_ID)")
        if app.client_secret is None or not app.client_secret.reveal().strip():
            raise DingTalkConfigError(
                f"{where} client_secret: missing (or set DINGTALK_CLIENT_SECRET)"
            )
        if client_id in seen_ids:
            raise DingTalkConfigError(f"{where} client_id: the same app is configured twice")
        seen_ids.add(client_id)
        secret = app.client_secret
        # Stray whitespace in a pasted secret gives 401 authFailed (dify-on-dingtalk #28).
        if secret.reveal() != secret.reveal().strip():
            secret = Secret(secret.reveal().strip(), source="stripped")
        openapi = (
            _endpoint(app.openapi_endpoint, f"{where} openapi_endpoint")
            if app.openapi_endpoint
            else default_endpoint
        )
        oapi = app.oapi_endpoint or section.oapi_endpoint
        apps.append(
            AppConfig(
                name=name,
                client_id=client_id,
                client_secret=secret,
                robot_code=app.robot_code.strip() or client_id,
                openapi_endpoint=openapi,
                oapi_endpoint=_endpoint(oapi, f"{where} oapi_endpoint")
                if oapi
                else default_oapi_endpoint(openapi),
                card_template_id=(app.card_template_id or section.cards.template_id).strip(),
            )
        )
    return apps
