"""The robot OpenAPI client of one app (reference dingtalk-protocol.md 6.3, 9).

``OpenApiClient.call`` is the one place where the connector talks to ``api.dingtalk.com``:

* the app's access token in ``x-acs-dingtalk-access-token`` (``tokens.AccessTokens``);
* a per-API call budget (``budget.TokenBucket``) below DingTalk's 20 QPS per app and API, which
  slows down on its own when DingTalk still answers ``403 QpsLimit``;
* errors classified (reference 9.1): ``InvalidAuthentication`` drops the token and retries once with
  a new one; network errors, timeouts, 5xx, 429, ``system.busy`` and QpsLimit are retried with
  backoff (``retry.RetrySettings``); everything else is permanent and raised at once as an
  ``OpenApiError`` carrying the HTTP status, DingTalk's code and its ``requestid``.

On top of it, the robot send APIs: ``send_to_user`` (``oToMessages/batchSend``, 1:1 chats) and
``send_to_group`` (``groupMessages/send``), and ``robot_message(reply)``, which maps a host ``Reply``
to their ``msgKey``/``msgParam``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import trio

from host.logs import logger
from host.model import Reply
from host_dingtalk_connector.budget import TokenBucket
from host_dingtalk_connector.errors import OpenApiError
from host_dingtalk_connector.retry import Retrying, RetrySettings

if TYPE_CHECKING:
    from host_dingtalk_connector.config import AppConfig
    from host_dingtalk_connector.tokens import AccessTokens

__all__ = [
    "BATCH_SEND",
    "GROUP_SEND",
    "ApiBudgetSettings",
    "OpenApiClient",
    "classify",
    "default_oapi_endpoint",
    "robot_message",
    "title_of",
]

BATCH_SEND = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND = "/v1.0/robot/groupMessages/send"
#: Codes meaning "this token is not (or no longer) valid": drop it and retry once with a new one.
_AUTH_CODES = frozenset(
    {"InvalidAuthentication", "token.notExisted", "AuthenticationFailed.InvalidToken"}
)
_TRANSIENT_CODES = frozenset(
    {"system.busy", "system.error", "unknownError", "send.too.fast", "send.byToken.tooFast"}
)


class ApiBudgetSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.budget]``: calls per second per app and per API (DingTalk allows 20)."""

    #: Steady rate of each OpenAPI per app (robot sends, downloads, card creation).
    calls_per_second: float = 12.0
    #: Calls allowed at once above the steady rate; rate + burst must stay below DingTalk's 20.
    burst: float = 4.0
    #: After a QpsLimit answer the rate is halved, but not below this.
    min_calls_per_second: float = 1.0
    #: Seconds without QpsLimit after which the rate grows back by one call per second.
    recovery_interval: float = 5.0

    def __post_init__(self) -> None:
        if self.calls_per_second <= 0 or self.burst < 1 or self.min_calls_per_second <= 0:
            raise ValueError("calls_per_second and min_calls_per_second must be > 0, burst >= 1")
        if self.recovery_interval <= 0:
            raise ValueError("recovery_interval: must be > 0")

    def bucket(self, rate: float | None = None, burst: float | None = None) -> TokenBucket:
        return TokenBucket(
            rate if rate is not None else self.calls_per_second,
            burst if burst is not None else self.burst,
            min_rate=self.min_calls_per_second,
            recovery_interval=self.recovery_interval,
        )


def default_oapi_endpoint(openapi_endpoint: str) -> str:
    """The old-API base matching an OpenAPI base: DingTalk's own hosts map to ``oapi.dingtalk.com``;
    anything else (an emulator, a proxy) serves both on the same base."""
    base = openapi_endpoint.rstrip("/")
    for new, old in (
        ("://api.dingtalk.com", "://oapi.dingtalk.com"),
        ("://api.dingtalk.io", "://oapi.dingtalk.io"),
    ):
        if base.endswith(new):
            return base[: -len(new)] + old
    return base


def classify(status: int | None, code: str | None) -> str:
    """``auth``, ``qps``, ``transient`` or ``permanent`` for an OpenAPI failure."""
    if code in _AUTH_CODES or status == 401:
        return "auth"
    if code is not None and "QpsLimit" in code:
        return "qps"
    if status is None or status >= 500 or status == 429 or code in _TRANSIENT_CODES:
        return "transient"
    return "permanent"


def title_of(text: str, fallback: str = "Reply") -> str:
    """A markdown message's title (DingTalk shows it in notifications): the first line, short."""
    for line in text.splitlines():
        line = line.strip().lstrip("#>*-_` ").strip()
        if line:
            return line[:20]
    return fallback


def robot_message(reply: Reply) -> tuple[str, dict[str, str]]:
    """``(msgKey, msgParam)`` of ``reply`` for the robot send APIs (reference 6.3).

    text -> ``sampleText``; markdown -> ``sampleMarkdown``; a card with one button ->
    ``sampleActionCard``; with 2 to 5 buttons -> ``sampleActionCard2..5`` (vertical buttons); more
    buttons than that: the first five are buttons and the rest become links in the text; a card
    without buttons -> ``sampleMarkdown``.
    """
    if reply.kind == "text":
        return "sampleText", {"content": reply.text}
    title = reply.title or title_of(reply.text)
    if reply.kind == "markdown" or not reply.buttons:
        return "sampleMarkdown", {"title": title, "text": reply.text}
    buttons = reply.buttons
    text = reply.text
    if len(buttons) > 5:
        text += "\n\n" + "\n".join(f"- [{b.title}]({b.url})" for b in buttons[5:])
        buttons = buttons[:5]
    if len(buttons) == 1:
        return "sampleActionCard", {
            "title": title, "text": text, "singleTitle": buttons[0].title, "singleURL": buttons[0].url,
        }  # fmt: skip
    param = {"title": title, "text": text}
    for i, button in enumerate(buttons, start=1):
        param[f"actionTitle{i}"] = button.title
        param[f"actionURL{i}"] = button.url
    return f"sampleActionCard{len(buttons)}", param


class OpenApiClient:
    """Calls DingTalk's OpenAPIs as one app. Shares the connector's HTTP client."""

    def __init__(
        self,
        app: AppConfig,
        http: httpx.AsyncClient,
        tokens: AccessTokens,
        *,
        retry: RetrySettings | None = None,
        budget: ApiBudgetSettings | None = None,
        oapi_endpoint: str | None = None,
    ) -> None:
        self.app = app
        self.http = http
        self.tokens = tokens
        #: Base of the old OpenAPIs (``/media/upload``): ``https://oapi.dingtalk.com`` in production.
        self.oapi_endpoint = (oapi_endpoint or default_oapi_endpoint(app.openapi_endpoint)).rstrip(
            "/"
        )
        self.retry = retry or RetrySettings()
        self.budget_settings = budget or ApiBudgetSettings()
        self._budgets: dict[str, TokenBucket] = {}

    def budget(self, api: str) -> TokenBucket:
        """The call budget of ``api`` ("METHOD /path") for this app."""
        bucket = self._budgets.get(api)
        if bucket is None:
            bucket = self._budgets[api] = self.budget_settings.bucket()
        return bucket

    def set_budget(self, api: str, bucket: TokenBucket) -> None:
        """Give ``api`` its own budget (AI card streaming has a dedicated one)."""
        self._budgets[api] = bucket

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        what: str,
        priority: bool = False,
        acquire: bool = True,
        retry: RetrySettings | None = None,
        on_qps: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Call ``method path`` with ``body`` as JSON; returns the decoded JSON answer.

        ``what`` names the call in errors and logs ("reply to msgXYZ"). ``priority`` puts the call
        ahead of others waiting for the API's budget; ``acquire=False`` means the caller already
        took a token for the first attempt. ``retry`` overrides the retry settings. ``on_qps`` is
        told about every QpsLimit answer. Raises ``OpenApiError`` (``TokenError`` when no token can
        be had).
        """
        api = f"{method} {path}"
        bucket = self.budget(api)
        retrying = Retrying(retry or self.retry, trio.current_time)
        url = self.app.openapi_endpoint + path
        refreshed = False
        while True:
            if acquire:
                await bucket.acquire(priority=priority)
            acquire = True
            token = await self.tokens.get()
            error = await self._attempt(method, url, body, token, what)
            if isinstance(error, dict):
                bucket.on_accepted()
                return error
            kind = classify(error.status, error.code)
            if kind == "auth" and not refreshed:
                refreshed = True
                self.tokens.invalidate(token)
                continue
            if kind == "qps":
                bucket.on_rejected()
                if on_qps is not None:
                    on_qps()
            if kind == "permanent" or kind == "auth":
                raise error
            delay = retrying.next_delay(qps=kind == "qps")
            if delay is None:
                raise error
            logger.info("dingtalk {}: {}; retrying in {:.2f}s", api, error.detail, delay)
            await trio.sleep(delay)

    async def _attempt(
        self, method: str, url: str, body: dict[str, Any] | None, token: str, what: str
    ) -> dict[str, Any] | OpenApiError:
        headers = {"x-acs-dingtalk-access-token": token, "Accept": "application/json"}
        try:
            response = await self.http.request(
                method, url, json=body, headers=headers, timeout=self.retry.timeout
            )
        except httpx.TimeoutException:
            return OpenApiError(
                f"{what}: DingTalk did not answer within {self.retry.timeout}s", transient=True
            )
        except httpx.HTTPError as exc:
            return OpenApiError(f"{what}: network error {type(exc).__name__}", transient=True)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        data = payload if isinstance(payload, dict) else {}
        header_id = response.headers.get("x-acs-request-id")
        request_id = data.get("requestid") or data.get("request_id") or header_id
        request_id = request_id if isinstance(request_id, str) else None
        if 200 <= response.status_code < 300:
            if not isinstance(payload, dict):
                return OpenApiError(f"{what}: DingTalk answered with a body that is not a JSON object",
                                    status=response.status_code, request_id=request_id, transient=True)  # fmt: skip
            return payload
        code = data.get("code")
        code = code if isinstance(code, str) else None
        message = data.get("message")
        text = f" {message}" if isinstance(message, str) and message else ""
        kind = classify(response.status_code, code)
        return OpenApiError(
            f"{what}: DingTalk answered HTTP {response.status_code} {code or ''}{text}".rstrip()
            + _hint(code),
            status=response.status_code,
            code=code,
            request_id=request_id,
            transient=kind in ("qps", "transient"),
        )

    # -- robot messages ------------------------------------------------------------------------------

    async def send_to_user(
        self, user_id: str, msg_key: str, msg_param: dict[str, Any], *, what: str
    ) -> str:
        """Send into the 1:1 chat of ``user_id`` (a staffId); returns DingTalk's processQueryKey."""
        body = {
            "robotCode": self.app.robot_code,
            "userIds": [user_id],
            "msgKey": msg_key,
            "msgParam": json.dumps(msg_param, ensure_ascii=False),
        }
        answer = await self.call("POST", BATCH_SEND, body, what=what)
        if user_id in (answer.get("invalidStaffIdList") or []):
            raise OpenApiError(f"{what}: DingTalk says user {user_id} is not a valid recipient of this robot",
                               status=200, code="invalidStaffId")  # fmt: skip
        if user_id in (answer.get("flowControlledStaffIdList") or []):
            raise OpenApiError(f"{what}: DingTalk flow-controlled the message to user {user_id}",
                               status=200, code="flowControlled", transient=True)  # fmt: skip
        return str(answer.get("processQueryKey") or "")

    async def send_to_group(
        self, conversation_id: str, msg_key: str, msg_param: dict[str, Any], *, what: str
    ) -> str:
        """Send into the group ``conversation_id`` (its openConversationId); returns processQueryKey."""
        body = {
            "robotCode": self.app.robot_code,
            "openConversationId": conversation_id,
            "msgKey": msg_key,
            "msgParam": json.dumps(msg_param, ensure_ascii=False),
        }
        answer = await self.call("POST", GROUP_SEND, body, what=what)
        return str(answer.get("processQueryKey") or "")


def _hint(code: str | None) -> str:
    """A pointer to the fix for errors an operator must act on."""
    if code == "Forbidden.AccessDenied.AccessTokenPermissionDenied":
        return " (the app lacks this API's permission: request it in the developer console)"
    if code == "Forbidden.AccessDenied.IpNotInWhiteList":
        return " (add this server's outbound IP to the app's IP allow-list)"
    if code == "Forbidden.AccessDenied.ApiCountLimitForOrg":
        return " (the organisation's monthly API quota is used up)"
    return ""
