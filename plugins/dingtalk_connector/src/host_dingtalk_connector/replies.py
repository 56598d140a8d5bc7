"""Whole replies and proactive messages: session webhook first, the robot OpenAPI when it cannot.

Answering a message (``ReplySender.deliver``):

1. through the message's ``sessionWebhook`` (reference 6.1: no token, valid ~90 min) while it is
   valid for at least ``webhook_expiry_margin`` more seconds. Network errors, HTTP 5xx and errcode
   ``-1`` (busy) are retried ``webhook_attempts`` times;
2. when the session has expired, DingTalk refuses it (``session已过期``/``session不存在``, or any other
   errcode: the real codes are [UNCONFIRMED]), or it keeps failing: through the robot OpenAPI
   (``oToMessages/batchSend`` to the sender in a 1:1 chat, ``groupMessages/send`` in a group). The
   plugin never notices which route carried its reply.

Proactive messages (``send``, no inbound message) always use the OpenAPI. Every attempt is counted
in ``dingtalk_deliveries_total{app, route, outcome}``; when every route failed, an ``OpenApiError``
(a host ``DeliveryError``) names DingTalk's code and request id, and the host logs and counts it.

@-mentions (group chats, ``Reply.mention_sender`` or ``[dingtalk.replies] mention_sender``): the
webhook body gets ``at.atUserIds`` and ``@<staffId>`` in the text (DingTalk renders the mention only
with both). The OpenAPI cannot @ anyone (a DingTalk limitation): a fallback reply has no mention.

Texts longer than ``message_max_bytes`` are split into several messages, in order. Markdown images
given as ``![alt](file:///path/to/image.png)`` are uploaded (``media.MediaUploader``) and replaced by
their DingTalk media id. Session webhook URLs carry a credential: they are never logged.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import httpx
import msgspec
import trio

from host.logs import logger
from host.model import Conversation, Message, Reply, now_ms
from host_dingtalk_connector.errors import HttpTransportError, MediaError, OpenApiError, ReplyError
from host_dingtalk_connector.openapi import OpenApiClient, robot_message, title_of
from host_dingtalk_connector.retry import Retrying, RetrySettings
from host_dingtalk_connector.sizing import split_text

if TYPE_CHECKING:
    from host_dingtalk_connector.http11 import KeepAliveHttp
    from host_dingtalk_connector.media import MediaUploader
    from host_dingtalk_connector.metrics import OutboundMetrics

__all__ = ["ReplySender", "ReplySettings", "webhook_body"]

#: Conversations remembered for proactive sends (their app and, for 1:1 chats, the user).
_CONVERSATIONS_MAX = 10_000
_LOCAL_IMAGE = re.compile(r"!\[([^\]]*)\]\(file://([^)\s]+)\)")
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


class ReplySettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.replies]``: how replies are sent."""

    #: @-mention the sender in every group reply (a plugin can also ask per reply with
    #: ``Reply.mention_sender``).
    mention_sender: bool = False
    #: Seconds before a session webhook's expiry from which it is no longer used.
    webhook_expiry_margin: float = 5.0
    #: Attempts of a session webhook call that fails transiently before falling back to the OpenAPI.
    webhook_attempts: int = 2
    #: Longer replies are split into several messages (group sends accept at most 15 000 bytes).
    message_max_bytes: int = 15_000
    #: Sent (or shown on the card) when a streamed answer ended without any text.
    empty_text: str = "(The answer was empty.)"
    #: HTTP client of the session-webhook POSTs: ``lean`` (keep-alive HTTP/1.1 on h11, ``http11.py``,
    #: a sixth of httpx's CPU per reply) or ``httpx`` (the escape hatch if a network between the bot
    #: and DingTalk needs what only httpx does; a proxy from the environment switches to it anyway).
    webhook_client: Literal["lean", "httpx"] = "lean"

    def __post_init__(self) -> None:
        if self.webhook_expiry_margin < 0:
            raise ValueError("webhook_expiry_margin: must be >= 0")
        if self.webhook_attempts < 1:
            raise ValueError("webhook_attempts: must be at least 1")
        if not 100 <= self.message_max_bytes <= 15_000:
            raise ValueError("message_max_bytes: must be between 100 and 15000")


def webhook_body(reply: Reply, mention: str | None = None) -> dict[str, Any]:
    """The session-webhook JSON body of ``reply``; ``mention`` is a staffId to @-mention."""
    text = f"@{mention} {reply.text}" if mention else reply.text
    at = {"at": {"atUserIds": [mention]}} if mention else {}
    if reply.kind == "text":
        return {"msgtype": "text", "text": {"content": text}, **at}
    title = reply.title or title_of(reply.text)
    if reply.kind == "markdown" or not reply.buttons:
        return {"msgtype": "markdown", "markdown": {"title": title, "text": text}, **at}
    card: dict[str, Any] = {"title": title, "text": text}
    if len(reply.buttons) == 1:
        card["singleTitle"] = reply.buttons[0].title
        card["singleURL"] = reply.buttons[0].url
    else:
        card["btnOrientation"] = "0"
        card["btns"] = [{"title": b.title, "actionURL": b.url} for b in reply.buttons]
    return {"msgtype": "actionCard", "actionCard": card, **at}


def _json_len(text: str) -> int:
    """UTF-8 bytes of ``text`` inside a JSON string (DingTalk measures ``msgParam``, a JSON string)."""
    return len(_encode_json(text)) - 2


def _json_pieces(text: str, budget: int, raw_budget: int) -> list[str]:
    """``split_text`` by JSON-escaped size: newlines and quotes take two bytes once escaped, so a
    code answer cut by raw bytes alone went over DingTalk's 15 000-byte limit and was refused."""
    pieces: list[str] = []
    for piece in split_text(text, raw_budget):
        size = _json_len(piece)
        if size <= budget:
            pieces.append(piece)
        else:  # cut this piece finer (raw_budget strictly shrinks; 4 bytes always fit)
            pieces.extend(_json_pieces(piece, budget, max(4, raw_budget * budget // size)))
    return pieces


class _WebhookFailed(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome  # refused | error


class ReplySender:
    """Sends whole replies for every app of a connector. ``clients`` maps app name -> client."""

    def __init__(
        self,
        clients: Mapping[str, OpenApiClient],
        http: httpx.AsyncClient,
        settings: ReplySettings,
        metrics: OutboundMetrics,
        *,
        retry: RetrySettings | None = None,
        uploader: MediaUploader | None = None,
        webhook_http: KeepAliveHttp | None = None,
    ) -> None:
        self.clients = clients
        self.http = http
        #: The lean keep-alive client for session-webhook POSTs (``http11``); httpx when ``None``
        #: or when a proxy is configured for the webhook's URL.
        self.webhook_http = webhook_http
        self.settings = settings
        self.retry = retry or RetrySettings()
        self.metrics = metrics
        self.uploader = uploader
        # conversation id -> (app name, staffId of the 1:1 partner or None), most recent last.
        self._conversations: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    # -- bookkeeping ---------------------------------------------------------------------------------

    def remember(self, message: Message) -> None:
        """Note the app (and 1:1 partner) of ``message``'s conversation, for proactive sends."""
        key = message.conversation.id
        partner = (
            message.sender.platform_ids.get("staffId")
            if message.conversation.type == "single"
            else None
        )
        self._conversations.pop(key, None)
        self._conversations[key] = (message.app_id or "", partner)
        while len(self._conversations) > _CONVERSATIONS_MAX:
            self._conversations.popitem(last=False)

    def partner_of(self, conversation_id: str) -> str | None:
        """The staffId of the user in 1:1 chat ``conversation_id``, if that chat was seen."""
        known = self._conversations.get(conversation_id)
        return known[1] if known is not None else None

    def client_for(self, app_id: str | None, conversation_id: str | None = None) -> OpenApiClient:
        """The app client by configured name or client id; else the conversation's; else the only one."""
        if app_id:
            client = self.clients.get(app_id)
            if client is None:
                client = next((c for c in self.clients.values() if c.app.client_id == app_id), None)
            if client is None:
                raise ReplyError(
                    f"no DingTalk app named {app_id!r} (configured: {', '.join(sorted(self.clients))})"
                )
            return client
        if conversation_id is not None and conversation_id in self._conversations:
            known = self._conversations[conversation_id][0]
            if known in self.clients:
                return self.clients[known]
        if len(self.clients) == 1:
            return next(iter(self.clients.values()))
        raise ReplyError(
            f"several DingTalk apps are configured and conversation {conversation_id} was not seen yet: pass app_id"
        )

    def mention_for(self, message: Message, reply: Reply | None = None) -> str | None:
        """The staffId to @-mention when answering ``message``, or ``None``."""
        wanted = self.settings.mention_sender or (reply is not None and reply.mention_sender)
        if not wanted or message.conversation.type != "group":
            return None
        return message.sender.platform_ids.get("staffId")

    # -- answering -----------------------------------------------------------------------------------

    async def deliver(self, message: Message, reply: Reply) -> None:
        """Answer ``message``; raises ``ReplyError`` when neither route could deliver it."""
        client = self.client_for(message.app_id, message.conversation.id)
        reply = await self._prepare(client, reply)
        for part in self._parts(reply):
            await self._deliver_one(client, message, part)

    async def _deliver_one(self, client: OpenApiClient, message: Message, reply: Reply) -> None:
        app = client.app.name
        webhook = message.context.get("session_webhook")
        expires = message.context.get("session_webhook_expires_ms")
        what = f"reply to {message.id}"
        if isinstance(webhook, str):
            margin_ms = self.settings.webhook_expiry_margin * 1000
            if isinstance(expires, int) and expires - margin_ms <= now_ms():
                self.metrics.deliveries.labels(app, "session_webhook", "expired").inc()
                logger.info("{}: session webhook expired; sending through the OpenAPI", what)
            else:
                try:
                    await self._post_webhook(
                        webhook, webhook_body(reply, self.mention_for(message, reply)), what
                    )
                except _WebhookFailed as exc:
                    self.metrics.deliveries.labels(app, "session_webhook", exc.outcome).inc()
                    logger.info("{}: {}; sending through the OpenAPI", what, exc)
                else:
                    self.metrics.deliveries.labels(app, "session_webhook", "ok").inc()
                    return
        await self._send_openapi(client, message.conversation, reply, self._partner(message), what)

    @staticmethod
    def _partner(message: Message) -> str | None:
        if message.conversation.type != "single":
            return None
        return message.sender.platform_ids.get("staffId")

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        """A proactive message into ``target`` through the OpenAPI.

        For a group, ``target.id`` is its conversation id (openConversationId). For a 1:1 chat it is
        the conversation id of a chat seen since the start, or the user's staffId.
        """
        client = self.client_for(app_id, target.id)
        reply = await self._prepare(client, reply)
        partner: str | None = None
        if target.type != "group":
            partner = self.partner_of(target.id) or target.id
        for part in self._parts(reply):
            await self._send_openapi(client, target, part, partner, f"message to {target.id}")

    async def _send_openapi(
        self,
        client: OpenApiClient,
        conversation: Conversation,
        reply: Reply,
        partner: str | None,
        what: str,
    ) -> None:
        app = client.app.name
        msg_key, msg_param = robot_message(reply)
        try:
            if conversation.type == "group":
                await client.send_to_group(conversation.id, msg_key, msg_param, what=what)
            elif partner:
                await client.send_to_user(partner, msg_key, msg_param, what=what)
            else:
                raise OpenApiError(
                    f"{what}: the sender has no staffId (an external user?), so the OpenAPI cannot reach them"
                )
        except OpenApiError:
            self.metrics.deliveries.labels(app, "openapi", "error").inc()
            raise
        self.metrics.deliveries.labels(app, "openapi", "ok").inc()

    # -- helpers -------------------------------------------------------------------------------------

    def _parts(self, reply: Reply) -> list[Reply]:
        """``reply`` split into messages of at most ``message_max_bytes`` (buttons on the last one)."""
        # Leave room for the title, an @-mention and the JSON around msgParam (at most half of a
        # small limit: a fixed 600 made every reply fail below message_max_bytes=600).
        limit = self.settings.message_max_bytes
        budget = limit - min(600, limit // 2)
        if _json_len(reply.text) <= budget:
            return [reply]
        pieces = _json_pieces(reply.text, budget, budget)
        parts = []
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            parts.append(
                Reply(
                    kind=reply.kind if last else ("text" if reply.kind == "text" else "markdown"),
                    text=piece,
                    title=reply.title,
                    buttons=reply.buttons if last else [],
                    mention_sender=reply.mention_sender and i == 0,
                )
            )
        return parts

    async def _prepare(self, client: OpenApiClient, reply: Reply) -> Reply:
        """Upload local images named in markdown (``![alt](file:///path)``) and use their media ids."""
        if reply.kind == "text" or self.uploader is None or "file://" not in reply.text:
            return reply
        text = reply.text
        for match in list(_LOCAL_IMAGE.finditer(text)):
            alt, path = match.group(1), match.group(2)
            try:
                media_id = await self.uploader.upload_file(client, path, kind="image")
            except MediaError as exc:
                logger.warning("could not upload image {} of a reply: {}", path, exc)
                replacement = f"[{alt or 'image'}: not available]"
            else:
                replacement = f"![{alt}]({media_id})"
            text = text.replace(match.group(0), replacement, 1)
        return Reply(kind=reply.kind, text=text, title=reply.title, buttons=reply.buttons,
                     mention_sender=reply.mention_sender)  # fmt: skip

    async def _post_webhook(self, url: str, body: dict[str, Any], what: str) -> None:
        """POST to a session webhook; raises ``_WebhookFailed`` (never with the URL in it)."""
        started = trio.current_time()
        retrying: Retrying | None = None  # made on the first failure (almost every POST succeeds)
        attempts = 0
        while True:
            attempts += 1
            failure = await self._webhook_attempt(url, body)
            if failure is None:
                return
            transient, detail = failure
            if not transient:
                raise _WebhookFailed("refused", f"session webhook refused: {detail}")
            if retrying is None:
                retrying = Retrying(self.retry, trio.current_time)
                retrying.started = started  # the retry deadline counts from the first attempt
            delay = retrying.next_delay() if attempts < self.settings.webhook_attempts else None
            if delay is None:
                raise _WebhookFailed("error", f"session webhook failed: {detail}")
            await trio.sleep(delay)

    async def _webhook_attempt(self, url: str, body: dict[str, Any]) -> tuple[bool, str] | None:
        """One POST; ``None`` when DingTalk took the message, else ``(transient, what went wrong)``."""
        timeout = self.retry.timeout
        lean = self.webhook_http
        if lean is not None and not lean.uses_proxy(url):
            try:
                answer = await lean.post_json(url, _encode_json(body))
            except HttpTransportError as exc:
                return (
                    True,
                    f"no answer within {timeout}s"
                    if exc.timeout
                    else f"network error: {exc.detail}",
                )
            status, content = answer.status, answer.body
        else:  # a proxy is configured for this URL: httpx knows how to use it
            try:
                response = await self.http.post(url, json=body, timeout=timeout)
            except httpx.TimeoutException:
                return True, f"no answer within {timeout}s"
            except httpx.HTTPError as exc:
                return True, f"network error {type(exc).__name__}"
            status, content = response.status_code, response.content
        if status >= 500 or status == 429:
            return True, f"HTTP {status}"
        if status != 200:
            return False, f"HTTP {status}"
        try:
            payload = _decode_json(content)
        except msgspec.DecodeError:
            return False, "an answer that is not JSON"
        if not isinstance(payload, dict):
            return False, "an answer that is not a JSON object"
        errcode = payload.get("errcode", 0)
        if errcode in (0, None):
            return None
        errmsg = payload.get("errmsg", "")
        return errcode == -1, f"errcode {errcode} {errmsg}".rstrip()
