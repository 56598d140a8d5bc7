"""``open_emulator()`` and the ``Emulator`` facade tests and the demo use.

One emulator = an HTTP server (hypercorn on trio serving the Starlette app: OpenAPIs, webhooks,
control API, chat page, ``/connect``), the session-webhook host (the same app behind the lean
``h11_server``: the URLs in ``sessionWebhook``) and the gateway front (the WebSocket ``endpoint``
handed out by ``connections/open``), all on 127.0.0.1 by default, inside the caller's trio run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import hypercorn.trio
import trio
from hypercorn.config import Config
from starlette.routing import Route

from host.logs import logger

# Imported at module level (not lazily in _start): a hot reload of the connector plugin drops these
# modules from sys.modules, and a lazy import would then mix two generations of the error classes.
from .app import build_app
from .cards import CardService
from .clock import EmulatorClock
from .errors import EmulatorError, NotFound
from .faults import Faults
from .frames import FrameRecord
from .front import GatewayFront
from .gateway import BOT_TOPIC, Gateway
from .h11_server import serve_h11
from .ids import IdFactory
from .messages import MSGTYPES, build_message, decode_file_spec
from .openapi import OpenApi
from .settings import EmulatorSettings
from .state import EmulatorState, UserMessage
from .webhook import SessionWebhook

__all__ = ["Emulator", "open_emulator"]

T = TypeVar("T")
_CONVERSATION_TYPES = {"single": "1", "1": "1", "group": "2", "2": "2"}


class Emulator:
    """A running DingTalk emulator. Create it with ``open_emulator()``.

    Attributes: ``base_url`` (``http://127.0.0.1:PORT``: OpenAPIs, webhooks, control API, chat
    page), ``webhook_url`` (the session webhooks' host: the same app on a port of its own, like
    DingTalk's ``oapi.dingtalk.com``), ``gateway_url`` (``ws://127.0.0.1:PORT/connect``),
    ``settings``, ``faults`` (see ``faults.Faults``) and ``state`` (the raw records, for anything
    the methods do not cover).
    """

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.random_seed)
        self.state = EmulatorState(settings, EmulatorClock(), IdFactory(self.rng))
        self.faults = Faults(self)
        self.front = GatewayFront(settings.host, settings.gateway_port)
        self.gateway = Gateway(self.state, self.front, self.faults.switches, self.rng)
        self.openapi = OpenApi(self.state, lambda: self.faults.switches)
        self.webhook = SessionWebhook(self.state)
        self.cards = CardService(self)
        self.gateway.on_card_ack = self.cards.on_card_ack
        self.gateway.on_redelivery = self._on_redelivery
        self.events: list[dict[str, Any]] = []
        self._user_messages: dict[str, UserMessage] = {}
        self.base_url = ""
        self.gateway_url = ""
        self.webhook_url = ""

    # --- lifecycle ----------------------------------------------------------------------------
    async def _start(self, nursery: trio.Nursery) -> None:
        settings = self.settings
        config = Config()
        config.bind = [f"[{settings.host}]:{settings.port}" if ":" in settings.host
                       else f"{settings.host}:{settings.port}"]
        config.accesslog = None
        http_log = logging.getLogger("host_dingtalk_connector.emulator.http")
        http_log.setLevel(logging.WARNING)  # hypercorn's "Running on ..." repeats our own startup line
        config.errorlog = http_log
        config.websocket_max_message_size = settings.max_inbound_message_bytes
        config.graceful_timeout = 0.5
        app = build_app(self)
        # Starlette is an ASGI app; hypercorn's annotation spells the ASGI callable differently.
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))  # type: ignore[arg-type]
        port = int(binds[0].rsplit(":", 1)[1])
        public_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(
            settings.host, f"[{settings.host}]" if ":" in settings.host else settings.host)
        self.base_url = f"http://{public_host}:{port}"
        self.state.base_url = self.base_url
        # The session-webhook host: the same app behind a lean HTTP/1.1 server (see h11_server); its
        # one hot route, the webhook itself, goes straight to its endpoint.
        direct = {("POST", route.path): route.app for route in app.routes
                  if isinstance(route, Route) and route.path == "/robot/sendBySession"}
        webhook_port = await nursery.start(partial(serve_h11, app, settings.host, settings.webhook_port,
                                                   direct=direct))
        self.webhook_url = f"http://{public_host}:{webhook_port}"
        self.state.webhook_base_url = self.webhook_url
        gateway_port = await nursery.start(self.front.run)
        self.gateway_url = f"ws://{public_host}:{gateway_port}/connect"
        self.gateway.nursery = nursery
        logger.info("emulator: DingTalk emulator at {} (gateway {})", self.base_url, self.gateway_url)

    # --- acting as DingTalk users ---------------------------------------------------------------
    def prepare_user_message(
        self, text: str, *, msgtype: str, conversation_type: str, sender_staff_id: str | None,
        sender_nick: str | None, conversation_id: str | None, conversation_title: str | None,
        at_bot: bool, at_users: list[str] | tuple[str, ...], content: dict[str, Any] | None,
        rich_text: list[dict[str, Any]] | None, file: dict[str, Any] | None, fields: dict[str, Any],
    ) -> tuple[dict[str, Any], UserMessage]:
        """Build a user's message payload and put it in its conversation, without pushing it.

        Shared by the Stream push (``send_user_message``) and the webhook-mode driver (callbacks).
        """
        state, settings = self.state, self.settings
        kind = _CONVERSATION_TYPES.get(conversation_type)
        if kind is None:
            raise EmulatorError(f"conversation_type must be 'single' or 'group', not {conversation_type!r}")
        if not isinstance(text, str):
            raise EmulatorError("text must be a string")
        if msgtype not in MSGTYPES and content is None:
            raise EmulatorError(f"msgtype must be one of {', '.join(MSGTYPES)} (or give content=...)")
        staff_id = sender_staff_id or next(iter(settings.users), "user0001")
        sender = state.user(staff_id, sender_nick or settings.users.get(staff_id))
        if kind == "1":
            conv = state.single_chat(sender)
            if conversation_id is not None and conversation_id != conv.id:
                raise EmulatorError(f"{staff_id}'s 1:1 chat with the robot is {conv.id}, not {conversation_id}")
        else:
            conv = state.group(conversation_id or state.default_group.id, conversation_title)
            if staff_id not in conv.members:
                conv.members.append(staff_id)
        msg_id = state.ids.msg_id()
        created_ms = state.clock.epoch_ms()
        session = state.new_session(conv.id, staff_id)
        payload, readable = build_message(
            state, conversation=conv, sender=sender, session=session, msg_id=msg_id,
            created_ms=created_ms, msgtype=msgtype, text=text, at_bot=at_bot,
            at_users=list(at_users), content=content, rich_text=rich_text,
            file=decode_file_spec(file), fields=fields)
        record = UserMessage(seq=state.next_seq(), conversation_id=conv.id, msg_id=msg_id,
                             msgtype=msgtype, text=readable, sender=sender, created_ms=created_ms,
                             payload=payload)
        conv.timeline.append(record)
        return payload, record

    async def send_user_message(
        self,
        text: str = "hello",
        *,
        msgtype: str = "text",
        conversation_type: str = "single",
        sender_staff_id: str | None = None,
        sender_nick: str | None = None,
        conversation_id: str | None = None,
        conversation_title: str | None = None,
        at_bot: bool = True,
        at_users: list[str] | tuple[str, ...] = (),
        content: dict[str, Any] | None = None,
        rich_text: list[dict[str, Any]] | None = None,
        file: dict[str, Any] | None = None,
        topic: str = BOT_TOPIC,
        **fields: Any,
    ) -> dict[str, Any]:
        """A user sends the robot a message; it is pushed to one Stream connection.

        ``conversation_type`` is "single" (1:1 with the robot; one conversation per sender) or
        "group" (``conversation_id`` None = the default group; an unknown id creates a group).
        In groups only messages with ``at_bot`` are delivered (DingTalk's rule); audio/video/file
        only exist in 1:1 chats. ``file`` ({name, content: bytes|base64, mime}) backs the
        downloadCode of picture/audio/video/file messages (a small real sample otherwise);
        ``rich_text`` gives richText segments ({"text"} / {"type": "picture"}); ``content`` is merged
        into the payload's ``content``; other ``fields`` are set on the payload (None removes one,
        e.g. ``senderStaffId=None`` for an external user).

        Returns ``msgId``, ``conversationId``, ``messageId`` (the frame's, None if undelivered),
        ``connectionId``, ``delivered``, ``note``, ``sessionWebhook`` and the ``payload``.
        """
        allow_oversized = bool(fields.pop("_allow_oversized", False))
        payload, record = self.prepare_user_message(
            text, msgtype=msgtype, conversation_type=conversation_type, sender_staff_id=sender_staff_id,
            sender_nick=sender_nick, conversation_id=conversation_id, conversation_title=conversation_title,
            at_bot=at_bot, at_users=at_users, content=content, rich_text=rich_text, file=file, fields=fields,
        )  # fmt: skip
        state, msg_id, kind = self.state, record.msg_id, _CONVERSATION_TYPES[conversation_type]
        self._user_messages[msg_id] = record
        frame: FrameRecord | None = None
        if kind == "2" and not at_bot:
            record.note = "not delivered: in groups DingTalk only pushes messages that @ the robot"
        else:
            frame = self.gateway.deliver("CALLBACK", topic, "bot_message", payload,
                                         delivery_key=msg_id, allow_oversized=allow_oversized)
            if frame is None:
                record.note = f"not delivered: no open Stream connection subscribes to {topic}"
            else:
                record.delivered = True
                record.message_ids.append(frame.message_id)
        state.notifier.notify()
        return {"msgId": msg_id, "conversationId": record.conversation_id,
                "messageId": None if frame is None else frame.message_id,
                "connectionId": None if frame is None else frame.connection_id,
                "delivered": frame is not None, "note": record.note,
                "sessionWebhook": payload.get("sessionWebhook"), "payload": payload}

    def _on_redelivery(self, frame: FrameRecord) -> None:
        record = self._user_messages.get(frame.delivery_key)
        if record is not None:
            record.message_ids.append(frame.message_id)

    async def send_event(self, event_type: str, payload: dict[str, Any] | None = None, *,
                         event_id: str | None = None, corp_id: str | None = None,
                         born_time_ms: int | None = None) -> dict[str, Any]:
        """Push an EVENT of any type (``payload`` becomes the frame's ``data``).

        Returns ``eventId``, ``messageId`` (None if undelivered), ``connectionId``, ``delivered``.
        """
        if not event_type or not isinstance(event_type, str):
            raise EmulatorError("event_type must be a non-empty string, e.g. chat_update_title")
        state = self.state
        event_id = event_id or state.ids.event_id()
        born = born_time_ms or state.clock.epoch_ms()
        headers = {"eventType": event_type, "eventId": event_id,
                   "eventCorpId": corp_id or self.settings.corp_id, "eventBornTime": str(born),
                   "eventUnifiedAppId": self.settings.unified_app_id}
        frame = self.gateway.deliver("EVENT", "*", "event", payload or {}, headers=headers,
                                     delivery_key=event_id)
        result = {"eventId": event_id, "eventType": event_type,
                  "messageId": None if frame is None else frame.message_id,
                  "connectionId": None if frame is None else frame.connection_id,
                  "delivered": frame is not None}
        self.events.append({**result, "payload": payload or {}})
        state.notifier.notify()
        return result

    async def send_callback(self, topic: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Push a CALLBACK on any topic (e.g. ``/v1.0/graph/api/invoke``)."""
        frame = self.gateway.deliver("CALLBACK", topic, "callback", payload, delivery_key=topic)
        return {"messageId": None if frame is None else frame.message_id,
                "connectionId": None if frame is None else frame.connection_id,
                "delivered": frame is not None}

    async def click_card(self, out_track_id: str, *, user_id: str | None = None,
                         action_ids: list[str] | None = None, params: dict[str, Any] | None = None,
                         wait: bool = True) -> dict[str, Any]:
        """A user clicks a callback button on a delivered card (STREAM: pushed on
        ``/v1.0/card/instances/callback`` and, if ACKed within 2 s, the answer updates the card;
        HTTP: POSTed to the registered route). Returns ``messageId``, ``verdict``, ``applied``, ``card``."""
        return await self.cards.click(out_track_id, user_id=user_id, action_ids=action_ids,
                                      params=params, wait=wait)

    async def ping(self, connection_id: str | None = None) -> list[dict[str, Any]]:
        """Send SYSTEM ping (``{"opaque": uuid}``) on one or every open connection."""
        return [f.to_dict() for f in await self.gateway.ping(connection_id)]

    async def disconnect(self, connection_id: str | None = None,
                         reason: str = "connection is expired") -> list[dict[str, Any]]:
        """Send SYSTEM disconnect; nothing more is pushed there; TCP closes ``disconnect_grace`` later."""
        return [f.to_dict() for f in await self.gateway.disconnect(connection_id, reason)]

    def add_file(self, content: bytes, name: str = "file.bin",
                 mime: str = "application/octet-stream") -> dict[str, Any]:
        """Store a file and return its record (with the ``downloadCode`` a message can carry)."""
        return self.state.add_file(content, name, mime).to_dict()

    def issue_access_token(self) -> str:
        """The app's current access token (what ``/v1.0/oauth2/accessToken`` would return)."""
        return self.state.issue_token(self.settings.client_id).value

    # --- inspection -----------------------------------------------------------------------------
    def bot_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        """What the bot sent into a conversation, in order (cards with current text and state)."""
        return [m.to_dict() for m in self.state.conversation(conversation_id).bot_messages()]

    def timeline(self, conversation_id: str) -> list[dict[str, Any]]:
        """User and bot messages of a conversation, in order."""
        return [m.to_dict() for m in self.state.conversation(conversation_id).timeline]

    def conversations(self) -> list[dict[str, Any]]:
        return [c.summary() for c in self.state.conversations.values()]

    def connections(self, *, with_frames: bool = True) -> list[dict[str, Any]]:
        """Every Stream connection ever accepted: state, close code, frames sent, ACKs (latency,
        verdict) and inbound problems."""
        return [c.to_dict(with_frames=with_frames) for c in self.gateway.connections.values()]

    def connection(self, connection_id: str) -> dict[str, Any]:
        conn = self.gateway.connections.get(connection_id)
        if conn is None:
            raise NotFound(f"no connection {connection_id!r}")
        return conn.to_dict()

    def frame(self, message_id: str) -> dict[str, Any]:
        frame = self.gateway.find_frame(message_id)
        if frame is None:
            raise NotFound(f"no frame with messageId {message_id!r}")
        return frame.to_dict()

    def deliveries(self, delivery_key: str) -> list[dict[str, Any]]:
        """Every frame pushed for one msgId / eventId / outTrackId (redeliveries, duplicates)."""
        return [f.to_dict() for c in self.gateway.connections.values() for f in c.frames
                if f.delivery_key == delivery_key]

    def registrations(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.state.registrations]

    def rejected_handshakes(self) -> list[dict[str, Any]]:
        return list(self.gateway.rejected_handshakes)

    def calls(self, api: str | None = None) -> list[dict[str, Any]]:
        """Every API call (``api`` like "PUT /v1.0/card/streaming" filters), with status and code."""
        return [c.to_dict() for c in self.state.calls if api is None or c.api == api]

    def card(self, out_track_id: str) -> dict[str, Any]:
        return self.cards.get(out_track_id).to_dict()

    def all_cards(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.cards.cards.values()]

    def files(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.state.files.values()]

    # --- waiting (no sleeps in tests) -------------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], T | None]) -> T:
        """Wait until ``predicate()`` returns something other than None (re-checked on every change)."""
        return await self.state.notifier.wait_until(predicate)

    async def wait_for_connection(self, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th Stream connection ever accepted; returns it."""

        def check() -> dict[str, Any] | None:
            conns = list(self.gateway.connections.values())
            return conns[count - 1].to_dict(with_frames=False) if len(conns) >= count else None

        return await self.wait_until(check)

    async def wait_for_connection_closed(self, connection_id: str) -> dict[str, Any]:
        conn = self.gateway.connections.get(connection_id)
        if conn is None:
            raise NotFound(f"no connection {connection_id!r}")
        await conn.closed.wait()
        return conn.to_dict(with_frames=False)

    async def wait_for_registration(self, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th ``connections/open`` call (whatever its outcome)."""
        return await self.wait_until(
            lambda: self.state.registrations[count - 1].to_dict()
            if len(self.state.registrations) >= count and self.state.registrations[count - 1].status
            else None)

    async def wait_for_ack(self, message_id: str) -> dict[str, Any]:
        """Wait until the frame ``message_id`` is ACKed; returns the ACK (code, data, latency, verdict)."""

        def check() -> dict[str, Any] | None:
            frame = self.gateway.find_frame(message_id)
            return frame.ack.to_dict() if frame is not None and frame.ack is not None else None

        return await self.wait_until(check)

    async def wait_for_bot_message(self, conversation_id: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait until the bot has sent ``count`` messages into the conversation; returns them all."""

        def check() -> list[dict[str, Any]] | None:
            conv = self.state.conversations.get(conversation_id)
            if conv is None or len(conv.bot_messages()) < count:
                return None
            return [m.to_dict() for m in conv.bot_messages()]

        return await self.wait_until(check)

    async def wait_for_card(self, out_track_id: str | None = None, *, conversation_id: str | None = None,
                            state: str | tuple[str, ...] = ("FINISHED", "FAILED")) -> dict[str, Any]:
        """Wait until a card (by id, or the latest card in ``conversation_id``) is in ``state``."""
        states = (state,) if isinstance(state, str) else state

        def check() -> dict[str, Any] | None:
            card = None
            if out_track_id is not None:
                card = self.cards.cards.get(out_track_id)
            elif conversation_id is not None and conversation_id in self.state.conversations:
                cards = [m.card for m in self.state.conversations[conversation_id].bot_messages() if m.card]
                card = cards[-1] if cards else None
            return card.to_dict() if card is not None and card.state in states else None

        return await self.wait_until(check)

    async def wait_for_deliveries(self, delivery_key: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` frames were pushed for a msgId / eventId (redelivery tests)."""
        return await self.wait_until(
            lambda: d if len(d := self.deliveries(delivery_key)) >= count else None)

    async def wait_for_calls(self, api: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait until ``api`` (e.g. "POST /robot/sendBySession") was called ``count`` times."""
        return await self.wait_until(lambda: c if len(c := self.calls(api)) >= count else None)


@asynccontextmanager
async def open_emulator(settings: EmulatorSettings | None = None, **overrides: Any) -> AsyncIterator[Emulator]:
    """Run a DingTalk emulator for the duration of the ``async with`` block (trio).

    ``overrides`` are ``EmulatorSettings`` fields, applied on top of ``settings``::

        async with open_emulator(push_policy="round_robin") as emu:
            ...  # point the connector at emu.base_url with emu.settings.client_id / client_secret
    """
    settings = settings or EmulatorSettings()
    if overrides:
        settings = settings.replace(**overrides)
    emulator = Emulator(settings)
    try:
        async with trio.open_nursery() as nursery:
            await emulator._start(nursery)
            try:
                yield emulator
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception comes back wrapped by our nursery; hand it back as it was.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise
