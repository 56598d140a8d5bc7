"""Access tokens of one app (reference dingtalk-protocol.md 6.2).

``POST {openapi}/v1.0/oauth2/accessToken {"appKey", "appSecret"}`` answers
``{"accessToken", "expireIn": 7200}``; every ``api.dingtalk.com`` call then carries the token in
``x-acs-dingtalk-access-token``. DingTalk rate-limits the token API, so:

* **cached** until ``refresh_margin`` seconds before it expires (the official SDK uses 300 s), then
  refreshed by the next caller, before DingTalk would refuse it;
* **single flight**: however many calls need a token at once, one request is made and every waiter
  gets its result (or its error); if that request's caller is cancelled, a waiter takes over;
* **reset on an auth error**: ``invalidate(token)`` drops the cached token when DingTalk said it is
  invalid (``InvalidAuthentication``), unless a newer one already replaced it;
* refused credentials (``invalidClientIdOrSecret``) fail fast for ``failure_cooldown`` seconds
  instead of hammering the token API with every reply.

Transient failures (network, 5xx, QpsLimit) are retried per ``RetrySettings``. The token is a
``host.Secret``: its value is masked in every log line and never appears in errors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio

from host.config import Secret
from host.logs import logger
from host_dingtalk_connector.errors import TokenError
from host_dingtalk_connector.retry import Retrying, RetrySettings

if TYPE_CHECKING:
    from host_dingtalk_connector.config import AppConfig
    from host_dingtalk_connector.metrics import OutboundMetrics

__all__ = ["TOKEN_PATH", "AccessTokens"]

TOKEN_PATH = "/v1.0/oauth2/accessToken"
#: Codes of the token API that mean "these credentials will never work".
_REFUSED = frozenset({"invalidClientIdOrSecret", "authFailed", "InvalidAuthentication"})


@dataclass
class _Flight:
    """One token request in progress, shared by everyone waiting for it."""

    done: trio.Event = field(default_factory=trio.Event)
    token: Secret | None = None
    error: TokenError | None = None


class AccessTokens:
    """The access token cache of one app. ``await get()`` returns a valid token value."""

    def __init__(
        self,
        app: AppConfig,
        http: httpx.AsyncClient,
        metrics: OutboundMetrics,
        *,
        retry: RetrySettings | None = None,
        refresh_margin: float = 300.0,
        failure_cooldown: float = 10.0,
    ) -> None:
        self.app = app
        self._http = http
        self._metrics = metrics
        self._retry = retry or RetrySettings()
        self.refresh_margin = refresh_margin
        self.failure_cooldown = failure_cooldown
        self._token: Secret | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._flight: _Flight | None = None
        self._refused: tuple[float, TokenError] | None = None
        #: Token requests made (successful or not), for tests and statistics.
        self.requests = 0

    def __repr__(self) -> str:
        state = "cached" if self._token is not None else "empty"
        return f"AccessTokens(app={self.app.name!r}, {state})"

    def _valid(self) -> str | None:
        if self._token is not None and trio.current_time() < self._refresh_at:
            return self._token.reveal()
        return None

    async def get(self) -> str:
        """A token valid for at least ``refresh_margin`` more seconds (unless DingTalk gives less).

        Raises ``TokenError`` when DingTalk refuses the credentials or keeps failing.
        """
        while True:
            value = self._valid()
            if value is not None:
                return value
            if self._refused is not None:
                until, error = self._refused
                if trio.current_time() < until:
                    raise copy.copy(error)
                self._refused = None
            flight = self._flight
            if flight is None:
                return await self._lead()
            await flight.done.wait()
            if flight.token is not None:
                return flight.token.reveal()
            if flight.error is not None:
                raise copy.copy(flight.error)
            # The leader was cancelled before an answer: loop, and maybe lead the next request.

    async def _lead(self) -> str:
        flight = self._flight = _Flight()
        try:
            token = await self._request()
        except TokenError as exc:
            flight.error = exc
            raise
        else:
            flight.token = token
            return token.reveal()
        finally:
            self._flight = None
            flight.done.set()

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is still ``token``, when given): DingTalk refused it."""
        if self._token is None:
            return
        if token is not None and self._token.reveal() != token:
            return  # a newer token already replaced the refused one
        logger.info(
            "dingtalk app {}: access token refused by DingTalk; fetching a new one", self.app.name
        )
        self._token = None

    def statistics(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "cached": self._token is not None,
            "expires_in": max(0.0, self._expires_at - now) if self._token is not None else 0.0,
            "requests": self.requests,
        }

    async def _request(self) -> Secret:
        retrying = Retrying(self._retry, trio.current_time)
        url = self.app.openapi_endpoint + TOKEN_PATH
        body = {"appKey": self.app.client_id, "appSecret": self.app.client_secret.reveal()}
        while True:
            self.requests += 1
            error = await self._attempt(url, body)
            if isinstance(error, Secret):
                self._metrics.token_refreshes.labels(self.app.name, "ok").inc()
                return error
            if not error.transient:
                self._metrics.token_refreshes.labels(self.app.name, "refused").inc()
                self._refused = (trio.current_time() + self.failure_cooldown, error)
                logger.error("dingtalk app {}: {}", self.app.name, error)
                raise error
            delay = retrying.next_delay(qps=error.code is not None and "QpsLimit" in error.code)
            if delay is None:
                self._metrics.token_refreshes.labels(self.app.name, "error").inc()
                logger.warning("dingtalk app {}: {}", self.app.name, error)
                raise error
            logger.info("dingtalk app {}: {}; retrying in {:.2f}s", self.app.name, error, delay)
            await trio.sleep(delay)

    async def _attempt(self, url: str, body: dict[str, str]) -> Secret | TokenError:
        started = trio.current_time()
        try:
            response = await self._http.post(url, json=body, timeout=self._retry.timeout)
        except httpx.TimeoutException:
            return TokenError(
                f"access token request timed out after {self._retry.timeout}s", transient=True
            )
        except httpx.HTTPError as exc:
            return TokenError(f"access token request failed: {type(exc).__name__}", transient=True)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        data = payload if isinstance(payload, dict) else {}
        request_id = data.get("requestid") or response.headers.get("x-acs-request-id")
        code = data.get("code")
        if (
            response.status_code == 200
            and isinstance(data.get("accessToken"), str)
            and data["accessToken"]
        ):
            expire_in = data.get("expireIn")
            if (
                not isinstance(expire_in, int | float)
                or isinstance(expire_in, bool)
                or expire_in <= 0
            ):
                return TokenError(
                    "access token answer has no valid expireIn", status=200, request_id=request_id
                )
            token = Secret(data["accessToken"], source="dingtalk-access-token")
            # Judge expiry from when the request started: the answer may have taken a while.
            margin = min(self.refresh_margin, expire_in / 2)
            self._token = token
            self._expires_at = started + expire_in
            self._refresh_at = started + expire_in - margin
            return token
        transient = (
            response.status_code >= 500
            or response.status_code == 429
            or (
                isinstance(code, str)
                and ("QpsLimit" in code or code in ("system.busy", "system.error"))
            )
        )
        if isinstance(code, str) and code in _REFUSED:
            detail = (
                f"DingTalk refused the app's credentials ({code}): check client_id / client_secret"
            )
        else:
            detail = (
                f"access token request answered HTTP {response.status_code} {code or ''}".rstrip()
            )
        return TokenError(
            detail,
            status=response.status_code,
            code=code if isinstance(code, str) else None,
            request_id=request_id if isinstance(request_id, str) else None,
            transient=transient,
        )
