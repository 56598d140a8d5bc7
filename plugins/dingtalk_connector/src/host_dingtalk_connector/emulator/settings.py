"""``EmulatorSettings``: every knob of the emulator, with DingTalk's documented values as defaults.

Items the protocol reference marks [UNCONFIRMED] (we could not find what DingTalk really does) are
settings too, each with the most plausible default; the README lists them all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "EmulatorSettings", "PushPolicy"]

#: Credentials the emulator accepts unless told otherwise (documented in the README).
DEFAULT_CLIENT_ID = "dingemulatorapp01"
DEFAULT_CLIENT_SECRET = "emulator-secret-0123456789"

PushPolicy = Literal["random", "round_robin", "newest"]
_POLICIES = ("random", "round_robin", "newest")


@dataclass(kw_only=True)
class EmulatorSettings:
    """Settings of one emulator instance. Durations are seconds on the emulator clock.

    ``client_secret`` is left out of ``repr`` so settings can be logged.
    """

    # --- where it listens -------------------------------------------------------------------
    host: str = "127.0.0.1"
    #: HTTP port of the OpenAPIs, the control API and the chat page (0 = any free port).
    port: int = 0
    #: TCP port of the Stream gateway's WebSocket endpoint (0 = any free port). It is the
    #: ``endpoint`` handed out by ``connections/open``, like DingTalk's separate wss host.
    gateway_port: int = 0
    #: HTTP port of the session webhooks (``sessionWebhook`` URLs; 0 = any free port), like
    #: DingTalk's separate ``oapi.dingtalk.com`` host. A lean HTTP/1.1 server (``h11_server``)
    #: serves the same app there: every answered message is one POST to it.
    webhook_port: int = 0

    # --- the app (one internal app with its robot) ------------------------------------------
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = field(default=DEFAULT_CLIENT_SECRET, repr=False)
    #: The robot's code; DingTalk uses the AppKey for internal-app robots (None = ``client_id``).
    robot_code: str | None = None
    corp_id: str = "dingemulatorcorp0001"
    unified_app_id: str = "0e3b1f52-7c3d-4b8e-9f10-2a6c5d4e3f21"
    bot_name: str = "Emulator Bot"
    #: Users known to the org besides everyone who ever sent a message (staff id -> nick).
    users: dict[str, str] = field(default_factory=lambda: {"user0001": "Emulator User"})

    # --- registration and the gateway -------------------------------------------------------
    ticket_ttl: float = 90.0
    #: HTTP status for an unknown/expired/reused ticket [UNCONFIRMED]; answered before the upgrade.
    ticket_reject_status: int = 401
    #: Which of an app's connections gets a push: random (DingTalk's documented behaviour),
    #: round_robin, or newest (the unverified "newest connection wins" third-party claim).
    push_policy: PushPolicy = "random"
    #: Seed for the random choices (push target), None = unpredictable.
    random_seed: int | None = None
    #: Send SYSTEM ``ping`` every N seconds on each connection [UNCONFIRMED interval], None = off.
    server_ping_interval: float | None = None
    #: Close (TCP) a connection whose SYSTEM ping got no correct ACK within N s [UNCONFIRMED].
    server_ping_timeout: float | None = None
    #: After SYSTEM ``disconnect`` the TCP connection is closed this long later if still open.
    disconnect_grace: float = 10.0
    #: Send ``disconnect`` ("persistent connection is timeout") after N s [UNCONFIRMED], None = never.
    max_connection_lifetime: float | None = None
    #: Largest WebSocket message the gateway accepts from a client [UNCONFIRMED].
    max_inbound_message_bytes: int = 1024 * 1024
    #: Frames the emulator builds are checked against this (Java SDK's 256 KiB inbound cap);
    #: only the ``oversized`` fault exceeds it on purpose.
    max_frame_bytes: int = 256 * 1024
    #: Answer ``connections/open`` with this status/code for a bad body [UNCONFIRMED].
    registration_bad_request_status: int = 400

    # --- redelivery -------------------------------------------------------------------------
    #: Redeliver an EVENT not ACKed (or answered LATER / non-200) after N s (None = off).
    event_redelivery_delay: float | None = 3.0
    #: How many times an EVENT is redelivered at most [UNCONFIRMED].
    event_max_redeliveries: int = 3
    #: Redeliver an un-ACKed bot message after N s (None = off, the documented behaviour;
    #: field reports say 16-60 s).
    bot_redelivery_delay: float | None = None
    bot_max_redeliveries: int = 1
    #: Redelivered copies get a new ``headers.messageId`` (data keeps its msgId / eventId)
    #: [UNCONFIRMED].
    redelivery_new_message_id: bool = True
    #: Card callbacks must be ACKed within this many seconds to update the card.
    card_callback_timeout: float = 2.0

    # --- bot messages and session webhooks --------------------------------------------------
    #: ``sessionWebhookExpiredTime - createAt`` (90 minutes in every sample).
    session_webhook_ttl: float = 5400.0
    #: errcode/errmsg of ``sendBySession`` for an expired or unknown session [UNCONFIRMED].
    session_expired_errcode: int = 300001
    session_unknown_errcode: int = 300002
    #: Lifetime of a ``messageFiles/download`` URL [UNCONFIRMED].
    download_url_ttl: float = 3600.0

    # --- tokens -----------------------------------------------------------------------------
    token_ttl: float = 7200.0
    #: Asking for a token while one is valid returns it with its lifetime renewed.
    token_refresh_extends: bool = True

    # --- OpenAPI limits ---------------------------------------------------------------------
    #: Per-app per-API calls per second (standard edition) -> 403 QpsLimitForAppkeyAndApi.
    qps_limit: int = 20
    #: Per-API overrides of ``qps_limit``, keyed "METHOD /path", e.g. "PUT /v1.0/card/streaming".
    qps_limits: dict[str, int] = field(default_factory=dict)
    batch_send_max_users: int = 20
    group_msg_param_max_bytes: int = 15000
    #: ``PUT /v1.0/card/streaming`` content size limit per call (DingTalk recommends 1 KB; the
    #: server answers 200092 "content is too large" [UNCONFIRMED threshold]), None = unchecked.
    streaming_max_content_bytes: int | None = None
    #: Reject ``isFull: false`` (append) on markdown-bound keys (DingTalk needs full text there).
    streaming_reject_append_on_markdown: bool = False
    #: Card variables treated as markdown-bound (the public AI card templates' keys).
    markdown_keys: tuple[str, ...] = ("msgContent", "markdown", "content")
    #: A streaming call without ``isFull`` fails with ``param.stream.isFull`` ("isFull is null").
    streaming_require_is_full: bool = True
    #: Reject streaming updates after FINISHED/FAILED [UNCONFIRMED what DingTalk does].
    streaming_reject_after_terminal: bool = True

    def __post_init__(self) -> None:
        if self.push_policy not in _POLICIES:
            raise ValueError(f"push_policy must be one of {_POLICIES}, got {self.push_policy!r}")
        for name in ("ticket_ttl", "disconnect_grace", "session_webhook_ttl", "token_ttl",
                     "card_callback_timeout", "download_url_ttl"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("server_ping_interval", "server_ping_timeout", "max_connection_lifetime",
                     "event_redelivery_delay", "bot_redelivery_delay"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if self.qps_limit < 1:
            raise ValueError(f"qps_limit must be >= 1, got {self.qps_limit!r}")
        self.markdown_keys = tuple(self.markdown_keys)

    @property
    def effective_robot_code(self) -> str:
        return self.robot_code or self.client_id

    def replace(self, **overrides: Any) -> EmulatorSettings:
        """A copy with ``overrides`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **overrides)

    def public_dict(self) -> dict[str, Any]:
        """Every setting except the secret (for the control API and logs)."""
        data = dataclasses.asdict(self)
        data.pop("client_secret")
        data["markdown_keys"] = list(self.markdown_keys)
        return data

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))
