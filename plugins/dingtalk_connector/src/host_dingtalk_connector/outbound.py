"""``Outbound``: everything the connector sends, for every app, behind one object.

::

    Outbound
    ├── http             one httpx client (TLS 1.2+, pooled) for every app and API
    ├── webhook_http     the lean keep-alive client (``http11``) for session-webhook replies
    ├── clients[app]     OpenApiClient: access token cache, per-API budgets, retries, errors
    ├── replies          ReplySender: session webhook first, OpenAPI fallback, proactive sends
    ├── cards            CardService: AI card streaming (a service: ``run``), or collected replies
    ├── downloader       MediaDownloader: inbound files (host middleware fills ``Media.path``)
    └── uploader         MediaUploader: ``/media/upload`` for images and files the bot sends

The connector calls ``remember`` (on the reader, for every accepted message: cheap, never raises),
``deliver``, ``open_stream``, ``send``. The plugin ``attach``-es its ``TaskRunner`` (a host service
running the cards' update loops) and calls ``aclose`` at host shutdown (after the host drained its
replies), or ``retire`` when the plugin is reloaded (streams still open finish first).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from host.connector import ReplyStream
from host.logs import logger
from host.metrics import Metrics
from host.model import Conversation, Message, Reply
from host.tls import client_context
from host_dingtalk_connector.cards import CardService, CardSettings
from host_dingtalk_connector.errors import OpenApiError, ReplyError
from host_dingtalk_connector.http11 import KeepAliveHttp
from host_dingtalk_connector.media import MediaDownloader, MediaSettings, MediaUploader
from host_dingtalk_connector.metrics import OutboundMetrics
from host_dingtalk_connector.openapi import ApiBudgetSettings, OpenApiClient
from host_dingtalk_connector.replies import ReplySender, ReplySettings
from host_dingtalk_connector.retry import RetrySettings
from host_dingtalk_connector.tasks import TaskRunner
from host_dingtalk_connector.tokens import AccessTokens

if TYPE_CHECKING:
    from host_dingtalk_connector.config import AppConfig

__all__ = ["MEDIA_MESSAGES", "Outbound"]

#: msgKey used for each uploaded media kind sent as a message.
MEDIA_MESSAGES = {"image": "sampleImageMsg", "file": "sampleFile"}

Middleware = Callable[[Message, Callable[[Message], Awaitable[None]]], Awaitable[None]]


class Outbound:
    """Replies, cards, proactive messages and media of one connector (all its apps)."""

    def __init__(
        self,
        apps: Sequence[AppConfig],
        *,
        connector_name: str = "dingtalk",
        metrics: Metrics | None = None,
        replies: ReplySettings | None = None,
        cards: CardSettings | None = None,
        media: MediaSettings | None = None,
        retry: RetrySettings | None = None,
        budget: ApiBudgetSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        templates: Mapping[str, str] | None = None,
        oapi_endpoints: Mapping[str, str] | None = None,
    ) -> None:
        self.connector_name = connector_name
        self.metrics = OutboundMetrics(metrics or Metrics())
        self.retry = retry or RetrySettings()
        self.media_settings = media or MediaSettings()
        replies = replies or ReplySettings()
        cards = cards or CardSettings()
        self.http = httpx.AsyncClient(
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(self.retry.timeout),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        # One reply per answered message goes to a session webhook: the hot path gets the client
        # that costs a sixth of httpx's CPU per request (see http11.py).
        self.webhook_http: KeepAliveHttp | None = None
        if replies.webhook_client == "lean":
            self.webhook_http = KeepAliveHttp(
                ssl_context if ssl_context is not None else client_context(), timeout=self.retry.timeout
            )
        self.clients: dict[str, OpenApiClient] = {}
        for app in apps:
            tokens = AccessTokens(app, self.http, self.metrics, retry=self.retry)
            self.clients[app.name] = OpenApiClient(
                app,
                self.http,
                tokens,
                retry=self.retry,
                budget=budget,
                oapi_endpoint=(oapi_endpoints or {}).get(app.name),
            )
        self.uploader = MediaUploader(self.http, self.metrics)
        self.downloader = MediaDownloader(self.media_settings, self.http, self.metrics)
        self.replies = ReplySender(
            self.clients,
            self.http,
            replies,
            self.metrics,
            retry=self.retry,
            uploader=self.uploader if self.media_settings.upload_local_images else None,
            webhook_http=self.webhook_http,
        )
        own_templates = dict(templates or {})
        self.cards = CardService(
            cards,
            self.metrics,
            mention_for=self.replies.mention_for,
            template_for=lambda app: own_templates.get(app) or cards.template_id,
            empty_text=replies.empty_text,
        )

    # -- lifecycle -----------------------------------------------------------------------------------

    def attach(self, runner: TaskRunner) -> None:
        """Run the AI cards' update loops in ``runner`` (the plugin's host service)."""
        self.cards.attach(runner)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a private ``TaskRunner`` for the cards until cancelled (for embedding and tests)."""
        runner = TaskRunner()
        self.attach(runner)
        await runner.run(task_status=task_status)

    async def aclose(self) -> None:
        """Host shutdown: end cards still open, then close the HTTP clients. Safe to call twice."""
        await self.cards.end_all()
        await self._close_http()

    async def retire(self) -> None:
        """Plugin reload: streams already open finish normally; the HTTP clients close after them."""
        self.cards.when_idle(self._close_http)
        await self.cards.check_idle()

    async def _close_http(self) -> None:
        if self.webhook_http is not None:
            await self.webhook_http.aclose()
        await self.http.aclose()

    # -- what the connector calls --------------------------------------------------------------------

    def remember(self, message: Message) -> None:
        """An accepted message (on the connection's reader: cheap, never raises)."""
        try:
            self.replies.remember(message)
        except Exception as exc:  # the reader must never see an exception from here
            logger.error("could not remember the conversation of {}: {!r}", message.id, exc)

    async def deliver(self, message: Message, reply: Reply) -> None:
        """Answer ``message``: session webhook, else OpenAPI. Raises ``ReplyError`` on failure."""
        await self.replies.deliver(message, reply)

    async def open_stream(self, message: Message) -> ReplyStream:
        """A streamed answer: an AI card when a template is configured, else one message at the end."""
        client = self.replies.client_for(message.app_id, message.conversation.id)

        async def deliver(reply: Reply) -> None:
            await self.replies.deliver(message, reply)

        return await self.cards.open(client, message, deliver=deliver)

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        """A proactive message through the OpenAPI. Raises ``ReplyError`` on failure."""
        await self.replies.send(target, reply, app_id=app_id)

    # -- media ---------------------------------------------------------------------------------------

    def media_middleware(self) -> Middleware:
        """Host middleware filling ``Media.path`` of this connector's messages (see ``media``)."""
        return self.downloader.middleware(self.connector_name, self._client_or_first)

    def _client_or_first(self, app_id: str | None) -> OpenApiClient:
        client = self.clients.get(app_id or "")
        return client if client is not None else next(iter(self.clients.values()))

    async def download_media(self, message: Message, directory: str | os.PathLike[str]) -> int:
        """Download every file of ``message`` into ``directory`` (which must exist); returns how many."""
        return await self.downloader.fill(
            self._client_or_first(message.app_id), message, Path(directory)
        )

    async def upload_media(
        self, path: str | os.PathLike[str], *, kind: str = "image", app_id: str | None = None
    ) -> str:
        """Upload a local file (kind image, voice, video or file); returns its DingTalk media id."""
        return await self.uploader.upload_file(self.replies.client_for(app_id), path, kind=kind)

    async def send_media(
        self,
        to: Message | Conversation,
        path: str | os.PathLike[str],
        *,
        kind: str = "image",
        app_id: str | None = None,
    ) -> None:
        """Upload ``path`` and send it as an image or file message (OpenAPI) into ``to``'s chat."""
        if kind not in MEDIA_MESSAGES:
            raise ReplyError(
                f"send_media: kind must be one of {', '.join(MEDIA_MESSAGES)}, not {kind!r}"
            )
        if isinstance(to, Message):
            conversation, app_id = to.conversation, app_id or to.app_id
            partner = (
                to.sender.platform_ids.get("staffId") if to.conversation.type == "single" else None
            )
        else:
            conversation, partner = to, None
        client = self.replies.client_for(app_id, conversation.id)
        media_id = await self.uploader.upload_file(client, path, kind=kind)
        name = Path(path).name
        param: dict[str, Any]
        if kind == "image":
            param = {"photoURL": media_id}
        else:
            param = {
                "mediaId": media_id,
                "fileName": name,
                "fileType": Path(name).suffix.lstrip(".") or "file",
            }
        what = f"{kind} to {conversation.id}"
        try:
            if conversation.type == "group":
                await client.send_to_group(conversation.id, MEDIA_MESSAGES[kind], param, what=what)
            else:
                user = partner or self.replies.partner_of(conversation.id) or conversation.id
                await client.send_to_user(user, MEDIA_MESSAGES[kind], param, what=what)
        except OpenApiError:
            self.metrics.deliveries.labels(client.app.name, "openapi", "error").inc()
            raise
        self.metrics.deliveries.labels(client.app.name, "openapi", "ok").inc()

    def statistics(self) -> dict[str, Any]:
        return {
            "tokens": {name: c.tokens.statistics() for name, c in self.clients.items()},
            "cards": self.cards.statistics(),
        }
