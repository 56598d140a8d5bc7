"""Outbound: turning host ``Reply`` values into DingTalk calls.

This module is the seam for issue 5. Today the ``Outbox`` answers through the inbound message's
``sessionWebhook`` (reference dingtalk-protocol.md 6.1: no token needed, valid ~90 min), streams are
collected and sent as one markdown message when they end, and proactive ``send`` uses the most recent
unexpired session webhook of the target conversation. Issue 5 replaces the inside of ``Outbox``
(OpenAPI fallback, access tokens per app, AI cards, media) without touching the connector or the
Stream engine: the connector only calls ``deliver``, ``open_stream``, ``send``, ``remember`` and
``aclose``.

Session webhook URLs carry a credential (the ``session`` parameter): they are never logged and
never appear in error messages.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from typing import Any

import httpx

from host.logs import logger
from host.model import Conversation, Message, Reply, now_ms
from host_dingtalk_connector.errors import ReplyError

__all__ = ["Outbox", "reply_body"]

#: Conversations whose latest session webhook is remembered for proactive sends.
_SESSIONS_MAX = 10_000
#: Do not start a webhook call that would land this close to the session's expiry (ms).
_EXPIRY_MARGIN_MS = 5_000


def _title(text: str, fallback: str = "Reply") -> str:
    """DingTalk shows a markdown message's title in notifications: the first line, short."""
    for line in text.splitlines():
        line = line.strip().lstrip("#>*-_` ").strip()
        if line:
            return line[:20]
    return fallback


def reply_body(reply: Reply, message: Message | None = None) -> dict[str, Any]:
    """The session-webhook JSON body of ``reply`` (text, markdown or actionCard).

    With ``mention_sender`` and a group ``message`` whose sender has a staffId, the sender is
    @-mentioned (``at.atUserIds`` plus ``@id`` in the text, which DingTalk needs to render it).
    """
    at: dict[str, Any] | None = None
    text = reply.text
    if reply.mention_sender and message is not None and message.conversation.type == "group":
        staff_id = message.sender.platform_ids.get("staffId")
        if staff_id:
            at = {"atUserIds": [staff_id]}
            text = f"@{staff_id} {text}"
    body: dict[str, Any]
    if reply.kind == "text":
        body = {"msgtype": "text", "text": {"content": text}}
    elif reply.kind == "markdown":
        body = {"msgtype": "markdown", "markdown": {"title": reply.title or _title(text), "text": text}}
    else:
        card: dict[str, Any] = {"title": reply.title or _title(text), "text": text}
        if len(reply.buttons) == 1:
            card["singleTitle"] = reply.buttons[0].title
            card["singleURL"] = reply.buttons[0].url
        elif reply.buttons:
            card["btnOrientation"] = "0"
            card["btns"] = [{"title": b.title, "actionURL": b.url} for b in reply.buttons]
        else:
            # An actionCard needs a button; without one, markdown says the same thing.
            return {"msgtype": "markdown", "markdown": {"title": card["title"], "text": text}, **({"at": at} if at else {})}
        body = {"msgtype": "actionCard", "actionCard": card}
    if at:
        body["at"] = at
    return body


class _CollectedStream:
    """A streamed reply collected in memory and sent as one markdown message when it ends."""

    def __init__(self, outbox: Outbox, message: Message) -> None:
        self._outbox = outbox
        self._message = message
        self._chunks: list[str] = []
        self._ended = False

    async def append(self, chunk: str) -> None:
        if self._ended:
            raise ReplyError("stream already ended")
        self._chunks.append(chunk)

    async def finish(self) -> None:
        if self._ended:
            return
        self._ended = True
        text = "".join(self._chunks)
        if not text.strip():
            logger.warning("streamed reply to {} ended empty; nothing sent", self._message.id)
            return
        await self._outbox.deliver(self._message, Reply.markdown(text))

    async def fail(self, note: str) -> None:
        if self._ended:
            return
        self._ended = True
        await self._outbox.deliver(self._message, Reply.markdown("".join(self._chunks) + note))


class Outbox:
    """Sends replies for one connector (all its apps)."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        # conversation id -> (app, webhook, expiry ms): the latest session of each conversation.
        self._sessions: OrderedDict[str, tuple[str, str, int]] = OrderedDict()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._ssl_context if self._ssl_context is not None else True,
                timeout=httpx.Timeout(self._timeout),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (called at host shutdown, after replies drained)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def remember(self, message: Message) -> None:
        """Keep the latest session webhook of ``message``'s conversation for proactive sends."""
        webhook = message.context.get("session_webhook")
        expires = message.context.get("session_webhook_expires_ms")
        if not isinstance(webhook, str) or not isinstance(expires, int):
            return
        key = message.conversation.id
        self._sessions.pop(key, None)
        self._sessions[key] = (message.app_id or "", webhook, expires)
        while len(self._sessions) > _SESSIONS_MAX:
            self._sessions.popitem(last=False)

    async def deliver(self, message: Message, reply: Reply) -> None:
        """Answer ``message`` through its session webhook. Raises ``ReplyError`` when impossible."""
        webhook = message.context.get("session_webhook")
        expires = message.context.get("session_webhook_expires_ms")
        if not isinstance(webhook, str):
            raise ReplyError(f"message {message.id} has no session webhook to answer through")
        if isinstance(expires, int) and expires - _EXPIRY_MARGIN_MS <= now_ms():
            raise ReplyError(f"the session webhook of message {message.id} has expired")
        await self._post(webhook, reply_body(reply, message), what=f"reply to {message.id}")

    async def open_stream(self, message: Message) -> _CollectedStream:
        if not isinstance(message.context.get("session_webhook"), str):
            raise ReplyError(f"message {message.id} has no session webhook to answer through")
        return _CollectedStream(self, message)

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        """Proactive message: through the conversation's latest unexpired session webhook."""
        session = self._sessions.get(target.id)
        if session is None or (app_id is not None and session[0] != app_id):
            raise ReplyError(
                f"no recent session for conversation {target.id}; proactive messages without one need the "
                "robot OpenAPI (not available in this version)"
            )
        _app, webhook, expires = session
        if expires - _EXPIRY_MARGIN_MS <= now_ms():
            raise ReplyError(f"the latest session of conversation {target.id} has expired")
        await self._post(webhook, reply_body(reply), what=f"message to {target.id}")

    async def _post(self, webhook: str, body: dict[str, Any], *, what: str) -> None:
        try:
            response = await self._http().post(webhook, json=body)
        except httpx.TimeoutException:
            raise ReplyError(f"{what}: DingTalk did not answer within {self._timeout}s") from None
        except httpx.HTTPError as exc:
            raise ReplyError(f"{what}: network error {type(exc).__name__}") from None
        if response.status_code != 200:
            raise ReplyError(f"{what}: DingTalk answered HTTP {response.status_code}")
        try:
            payload = response.json()
        except ValueError:
            raise ReplyError(f"{what}: DingTalk answered with a body that is not JSON") from None
        errcode = payload.get("errcode", 0) if isinstance(payload, dict) else None
        if errcode not in (0, None):
            raise ReplyError(f"{what}: DingTalk refused it: errcode {errcode} {payload.get('errmsg', '')}".rstrip())
