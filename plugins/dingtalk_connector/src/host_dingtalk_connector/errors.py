"""The connector's exceptions.

::

    DingTalkError
    ├── DingTalkConfigError      invalid [dingtalk] configuration (also a host ConfigError)
    ├── FrameError               a WebSocket frame could not be used; ``reason`` is a bounded label
    │   └── PayloadError         the frame was fine but its ``data`` payload was not
    ├── ConnectError             could not open a Stream connection (transient: retried with backoff)
    │   ├── RegistrationError    POST /v1.0/gateway/connections/open failed (``status``, ``code``)
    │   └── HandshakeFailed      the WebSocket upgrade with the ticket failed
    ├── ReplyError               a reply could not be sent (also a host DeliveryError)
    │   └── OpenApiError         DingTalk refused or failed an OpenAPI call (``status``, ``code``,
    │       │                    ``request_id``: DingTalk's ``requestid``, for support tickets)
    │       └── TokenError       no access token: refused credentials, or the token API failed
    ├── HttpTransportError       an HTTP request got no answer (network error, timeout: ``timeout``)
    └── MediaError               a file could not be downloaded or uploaded (size limit, refusal)

Nothing here ever carries a secret: registration errors name the DingTalk error code and the HTTP
status, never the request body.
"""

from __future__ import annotations

from host.errors import ConfigError, DeliveryError

__all__ = [
    "ConnectError",
    "DingTalkConfigError",
    "DingTalkError",
    "FrameError",
    "HandshakeFailed",
    "HttpTransportError",
    "MediaError",
    "OpenApiError",
    "PayloadError",
    "RegistrationError",
    "ReplyError",
    "TokenError",
]


class DingTalkError(Exception):
    """Base of every error this package raises on purpose."""


class DingTalkConfigError(DingTalkError, ConfigError):
    """The ``[dingtalk]`` configuration is invalid; the message is meant for the operator as is."""


class FrameError(DingTalkError):
    """A frame from the gateway could not be used.

    ``reason`` is a short bounded label (used as a metric label): ``not_json``, ``not_object``,
    ``binary``, ``oversized``, ``missing_headers``, ``missing_message_id``, ``missing_topic``,
    ``unknown_type``, ``unknown_topic``, ``data_not_json``, ``bad_payload``. ``message_id`` is the
    frame's ``headers.messageId`` when it could be read.
    """

    def __init__(self, reason: str, detail: str, *, message_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.message_id = message_id


class PayloadError(FrameError):
    """The frame's ``data`` decoded, but is not a usable bot message / event payload."""

    def __init__(self, detail: str, *, message_id: str | None = None) -> None:
        super().__init__("bad_payload", detail, message_id=message_id)


class ConnectError(DingTalkError):
    """Opening a Stream connection failed. Always treated as transient: retried with backoff."""


class RegistrationError(ConnectError):
    """The gateway refused or failed ``POST /v1.0/gateway/connections/open``.

    ``status`` is the HTTP status (``None`` for a network error or timeout), ``code`` DingTalk's error
    code (e.g. ``authFailed``) when the body had one.
    """

    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code


class HandshakeFailed(ConnectError):
    """The WebSocket handshake with the ticket failed (rejected, timed out or network error)."""


class ReplyError(DingTalkError, DeliveryError):
    """A reply could not be delivered to DingTalk."""


class OpenApiError(ReplyError):
    """DingTalk refused (or kept failing) an OpenAPI call, after the retries it deserved.

    ``status`` is the HTTP status (``None`` for network errors and timeouts), ``code`` DingTalk's
    error code (``Forbidden.AccessDenied.QpsLimitForAppkeyAndApi``, ``invalidParameter.userIds.empty``,
    or an old-API ``errcode`` as a string), ``request_id`` DingTalk's ``requestid`` (quote it to
    DingTalk support), ``transient`` whether retrying later could succeed.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        transient: bool = False,
    ) -> None:
        suffix = f" (DingTalk request id {request_id})" if request_id else ""
        super().__init__(detail + suffix)
        self.detail = detail
        self.status = status
        self.code = code
        self.request_id = request_id
        self.transient = transient


class TokenError(OpenApiError):
    """No access token: the credentials were refused (``invalidClientIdOrSecret``) or the token API
    kept failing. Every OpenAPI call of the app fails with it until a refresh succeeds."""


class HttpTransportError(DingTalkError):
    """An HTTP request (``http11.KeepAliveHttp``) got no answer: connection refused or broken, TLS
    refused, or ``timeout`` (the deadline passed). The message never holds the URL."""

    def __init__(self, detail: str, *, timeout: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.timeout = timeout


class MediaError(DingTalkError):
    """A file of a message could not be downloaded, or one could not be uploaded.

    ``reason`` is a bounded label: ``too_large``, ``refused``, ``unavailable``, ``io``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
