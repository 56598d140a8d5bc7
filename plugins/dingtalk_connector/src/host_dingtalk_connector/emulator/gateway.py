"""The Stream gateway: ``POST /v1.0/gateway/connections/open``, tickets, the ``/connect``
WebSocket, pushing frames to one of the app's connections, ACK tracking and redelivery.

A connection is served the same way whichever port it came in on (``Transport``): the gateway
endpoint (``front.Link``, with TCP faults) or ``/connect`` on the HTTP port. Pushes are queued on the
connection's outbox; its writer sends everything queued in one write, and its reader records every
ACK of one read before waking waiters once.

Connection states: ``open`` -> (``disconnecting`` after a SYSTEM disconnect | ``zombie`` after the
fault) -> ``closed``. Pushes go only to ``open`` and ``zombie`` connections that subscribed to the
topic (the server cannot tell a zombie from a healthy connection), chosen per
``EmulatorSettings.push_policy``.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from host.logs import logger

from .errors import ApiError, EmulatorError, NoConnection, NotFound
from .faults import FaultSwitches
from .frames import (
    AckRecord,
    FrameRecord,
    build_frame,
    encode,
    encode_bytes,
    frame_of,
    judge_ack,
    parse_ack,
)
from .front import GatewayFront, Link, Rejection
from .openapi import credentials_match
from .state import EmulatorState, Registration, Ticket

__all__ = ["BOT_TOPIC", "CARD_CALLBACK_TOPIC", "Connection", "Gateway", "Transport"]

BOT_TOPIC = "/v1.0/im/bot/messages/get"
CARD_CALLBACK_TOPIC = "/v1.0/card/instances/callback"
_JSON_UTF8 = "application/json;charset=utf-8"
#: Reused on every push (one suppress object, not one per frame).
_IF_CLOSED = contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError)


class Transport(Protocol):
    """How a ``Connection`` talks to its client: ``front.Link`` on the gateway endpoint, or
    ``_AsgiTransport`` on ``/connect`` of the HTTP port."""

    #: ``(code, reason)`` of the client's close frame, once it sent one (None if unknown).
    client_close: tuple[int, str] | None
    #: ``(code, reason)`` of a close the transport sent on its own (message too big, protocol error).
    server_close: tuple[int, str] | None
    #: Close code recorded when the connection ended without a known client close frame.
    abnormal_close_code: int

    async def receive(self) -> list[str | bytes] | None:
        """The next inbound messages (at least one), or None once the connection is over."""
        ...

    async def send(self, items: list[tuple[Any, ...]]) -> None:
        """Write outbox items: ``("text", str)``, ``("bytes", bytes)``, ``("close", code, reason)``."""
        ...


class _AsgiTransport:
    """A Starlette WebSocket as a ``Transport`` (one message per receive, one per send)."""

    client_close: tuple[int, str] | None = None
    server_close: tuple[int, str] | None = None

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.abnormal_close_code = 1006

    async def receive(self) -> list[str | bytes] | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            self.abnormal_close_code = message.get("code", 1006)
            return None
        raw = message.get("text")
        return [raw if raw is not None else message.get("bytes") or b""]

    async def send(self, items: list[tuple[Any, ...]]) -> None:
        for item in items:
            if item[0] == "text":
                await self.websocket.send_text(item[1])
            elif item[0] == "bytes":
                await self.websocket.send_bytes(item[1])
            elif item[0] == "close":
                await self.websocket.close(item[1], item[2])
                return


@dataclass
class Connection:
    """One accepted Stream WebSocket connection."""

    id: str
    client_id: str
    ticket: str
    subscriptions: list[dict[str, Any]]
    peer: str
    opened_at: float
    opened_ms: int
    registration_seq: int
    link: Link | None  # the gateway endpoint's socket (TCP faults); None on the HTTP port
    outbox: trio.MemorySendChannel[tuple[Any, ...]]
    state: str = "open"
    swallow: bool = False  # pushes are recorded but never written (stale-channel zombie)
    frames: list[FrameRecord] = field(default_factory=list)
    by_message_id: dict[str, FrameRecord] = field(default_factory=dict)
    inbound_problems: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str = ""  # client | server | network
    closed_ms: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)

    def subscribed(self, frame_type: str, topic: str) -> bool:
        for sub in self.subscriptions:
            if sub.get("type") == frame_type and (frame_type == "EVENT" or sub.get("topic") == topic):
                return True
        return False

    @property
    def receives_pushes(self) -> bool:
        return self.state in ("open", "zombie")

    def acks(self) -> list[AckRecord]:
        out: list[AckRecord] = []
        for frame in self.frames:
            if frame.ack is not None:
                out.append(frame.ack)
            out.extend(frame.extra_acks)
        return out

    def to_dict(self, *, with_frames: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "connectionId": self.id, "clientId": self.client_id, "state": self.state,
            "peer": self.peer, "openedAt": self.opened_ms, "closedAt": self.closed_ms,
            "closeCode": self.close_code, "closeReason": self.close_reason,
            "closedBy": self.closed_by, "subscriptions": self.subscriptions,
            "registration": self.registration_seq, "framesSent": len(self.frames),
            "acksReceived": len(self.acks()),
            "clientPings": None if self.link is None else self.link.pings,
            "tcp": None if self.link is None else (self.link.ended or "open"),
        }
        if with_frames:
            data["frames"] = [f.to_dict() for f in self.frames]
            data["acks"] = [a.to_dict() for a in self.acks()]
            data["inboundProblems"] = list(self.inbound_problems)
        return data


def _api_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(ApiError(status, code, message).body(), status_code=status,
                        media_type=_JSON_UTF8)


class Gateway:
    def __init__(self, state: EmulatorState, front: GatewayFront, faults: FaultSwitches,
                 rng: random.Random) -> None:
        self.state = state
        self.settings = state.settings
        self.front = front
        self.faults_ref = faults
        self.rng = rng
        front.admit, front.serve = self._admit, self._serve_link
        front.max_message_bytes = state.settings.max_inbound_message_bytes
        self.connections: dict[str, Connection] = {}
        self.rejected_handshakes: list[dict[str, Any]] = []
        self._round_robin = 0
        self.nursery: trio.Nursery | None = None  # set by the server: redelivery timers live here
        #: Called with (frame, ack) when a card callback is ACKed in time (cards apply the answer).
        self.on_card_ack: Callable[[FrameRecord, AckRecord], None] | None = None
        #: Called with (frame) when a bot message is redelivered (to list its messageIds).
        self.on_redelivery: Callable[[FrameRecord], None] | None = None

    @property
    def faults(self) -> FaultSwitches:
        return self.faults_ref

    # --- registration -------------------------------------------------------------------------
    async def open_connection(self, request: Request) -> Response:
        """``POST /v1.0/gateway/connections/open``."""
        state = self.state
        raw = await request.body()
        body: Any = None
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            body = None
        reg = Registration(
            seq=state.next_seq(), at_ms=state.clock.epoch_ms(),
            client_id=str(body.get("clientId", "")) if isinstance(body, dict) else "",
            subscriptions=body.get("subscriptions") if isinstance(body, dict) else None,
            ua=body.get("ua") if isinstance(body, dict) else None,
            local_ip=body.get("localIp") if isinstance(body, dict) else None,
            extras=body.get("extras") if isinstance(body, dict) else None,
            user_agent=request.headers.get("user-agent", ""), status=0, outcome="")
        state.registrations.append(reg)
        response = await self._open_connection(request, body, reg)
        reg.status = response.status_code
        state.notifier.notify()
        return response

    async def _open_connection(self, request: Request, body: Any, reg: Registration) -> Response:
        settings = self.settings
        fault = self.faults.take_registration()
        if fault == "timeout":
            reg.outcome = "fault:timeout"
            release = self.faults.registration_release
            await release.wait()  # hangs like an unresponsive gateway until the fault is cleared
            fault = None
        if fault == "auth":
            reg.outcome = "fault:auth"
            return _api_error(401, "authFailed", "鉴权失败")
        if fault == "error":
            reg.outcome = "fault:error"
            status = self.faults.registration_status
            return _api_error(status, "unknownError" if status == 500 else "ServiceUnavailable",
                              "服务暂不可用，请稍后重试")
        bad = settings.registration_bad_request_status
        if not isinstance(body, dict):
            reg.outcome = "badRequest"
            return _api_error(bad, "InvalidParameter", "request body must be a JSON object")
        client_id, secret = body.get("clientId"), body.get("clientSecret")
        if not isinstance(client_id, str) or not isinstance(secret, str) or not client_id or not secret:
            reg.outcome = "badRequest"
            return _api_error(bad, "MissingParameter", "clientId and clientSecret are required")
        if not credentials_match(settings, client_id, secret):
            reg.outcome = "authFailed"
            logger.info("emulator: connections/open refused: wrong credentials for {!r}", client_id)
            return _api_error(401, "authFailed", "鉴权失败")
        subs = body.get("subscriptions")
        problem = _check_subscriptions(subs)
        if problem:
            reg.outcome = "badRequest"
            return _api_error(bad, "InvalidParameter", problem)
        ticket = Ticket(self.state.ids.uuid(), reg, self.state.clock.now())
        self.state.tickets[ticket.value] = ticket
        reg.outcome, reg.ticket = "ok", ticket.value
        host = request.url.hostname or self.settings.host
        if ":" in host:
            host = f"[{host}]"
        endpoint = f"ws://{host}:{self.front.port}/connect"
        return JSONResponse({"endpoint": endpoint, "ticket": ticket.value}, media_type=_JSON_UTF8)

    def _consume_ticket(self, value: str) -> Ticket | str:
        ticket = self.state.tickets.get(value)
        if ticket is None:
            return "unknown"
        if ticket.used:
            return "used"
        if ticket.expired_by_fault or self.state.clock.now() - ticket.issued_at > self.settings.ticket_ttl:
            return "expired"
        ticket.used = True
        return ticket

    # --- the WebSocket ------------------------------------------------------------------------
    def _admit(self, value: str) -> Ticket | Rejection:
        """Validate (and use up) the ``ticket`` of a WebSocket upgrade, before the upgrade."""
        ticket = self._consume_ticket(value)
        if not isinstance(ticket, str):
            return ticket
        messages = {"unknown": "ticket is not exist", "used": "ticket has been used",
                    "expired": "ticket is expired"}
        self.rejected_handshakes.append({"at": self.state.clock.epoch_ms(), "reason": ticket,
                                         "ticket": value})
        logger.info("emulator: WebSocket handshake rejected: {} ticket", ticket)
        status = self.settings.ticket_reject_status
        self.state.notifier.notify()
        return Rejection(status, ApiError(status, f"ticket.{ticket}", messages[ticket]).body())

    async def websocket_endpoint(self, websocket: WebSocket) -> None:
        """``GET /connect?ticket=...`` on the HTTP port: validate the ticket before the upgrade,
        then serve (no TCP faults there: the gateway endpoint of ``front.py`` has them)."""
        ticket = self._admit(websocket.query_params.get("ticket", ""))
        if isinstance(ticket, Rejection):
            await websocket.send_denial_response(
                JSONResponse(ticket.body, status_code=ticket.status, media_type=_JSON_UTF8))
            return
        await websocket.accept()
        client = websocket.client
        await self._serve(_AsgiTransport(websocket), ticket, link=None,
                          peer=f"{client.host}:{client.port}" if client else "")

    async def _serve_link(self, link: Link, ticket: Ticket) -> None:
        """A connection accepted on the gateway endpoint (``GatewayFront``)."""
        await self._serve(link, ticket, link=link, peer=f"{link.peer[0]}:{link.peer[1]}")

    async def _serve(self, transport: Transport, ticket: Ticket, *, link: Link | None, peer: str) -> None:
        send, receive = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        reg = ticket.registration
        conn = Connection(
            id=self.state.ids.uuid(), client_id=reg.client_id, ticket=ticket.value,
            subscriptions=list(reg.subscriptions or []), peer=peer,
            opened_at=self.state.clock.now(), opened_ms=self.state.clock.epoch_ms(),
            registration_seq=reg.seq, link=link, outbox=send)
        self.connections[conn.id] = conn
        logger.info("emulator: Stream connection {} opened ({} subscriptions)", conn.id,
                    len(conn.subscriptions))
        self.state.notifier.notify()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, transport, conn, receive)
                if self.settings.server_ping_interval:
                    nursery.start_soon(self._pinger, conn)
                if self.settings.max_connection_lifetime:
                    nursery.start_soon(self._lifetime, conn)
                await self._reader(transport, conn)
                nursery.cancel_scope.cancel()
        finally:
            self._mark_closed(conn)

    async def _reader(self, transport: Transport, conn: Connection) -> None:
        notify = self.state.notifier.notify
        while True:
            messages = await transport.receive()
            if messages is None:
                if not conn.closed_by:
                    client_close, server_close = transport.client_close, transport.server_close
                    if client_close is not None:
                        conn.closed_by = "client"
                        conn.close_code, conn.close_reason = client_close
                    elif server_close is not None:
                        conn.closed_by = "server"
                        conn.close_code, conn.close_reason = server_close
                    else:
                        conn.closed_by = "network"
                        conn.close_code = transport.abnormal_close_code
                return
            if conn.state == "zombie":
                continue
            for raw in messages:
                self._on_inbound(conn, raw)
            notify()  # once per batch of ACKs

    async def _writer(self, transport: Transport, conn: Connection,
                      receive: trio.MemoryReceiveChannel[tuple[Any, ...]]) -> None:
        while True:
            try:
                batch = [await receive.receive()]
                # Everything queued meanwhile goes out in the same write.
                while True:
                    batch.append(receive.receive_nowait())
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                return
            closing = next((item for item in batch if item[0] == "close"), None)
            if closing is not None:
                conn.closed_by, conn.close_code, conn.close_reason = "server", closing[1], closing[2]
            await transport.send(batch)
            if closing is not None:
                return

    def _mark_closed(self, conn: Connection) -> None:
        if conn.state != "closed":
            conn.state = "closed"
            conn.closed_ms = self.state.clock.epoch_ms()
            conn.closed.set()
            conn.outbox.close()
            logger.info("emulator: Stream connection {} closed by {} (code {})", conn.id,
                        conn.closed_by or "?", conn.close_code)
            self.state.notifier.notify()

    def _on_inbound(self, conn: Connection, raw: str | bytes) -> None:
        """Record one client message (an ACK, or a problem); the reader notifies waiters."""
        state = self.state
        ack, problem = parse_ack(raw)
        text = raw if isinstance(raw, str) else repr(raw[:200])
        if ack is None:
            conn.inbound_problems.append({"at": state.clock.epoch_ms(), "problem": problem,
                                          "raw": text[:2000]})
            return
        if self.faults.take_lost_ack():
            conn.inbound_problems.append({"at": state.clock.epoch_ms(), "raw": text[:2000],
                                          "problem": "ACK lost on the way (lost_acks fault)"})
            return
        frame = conn.by_message_id.get(ack["headers"]["messageId"])
        if frame is None:
            conn.inbound_problems.append({"at": state.clock.epoch_ms(), "raw": text[:2000],
                                          "problem": "ACK for a messageId never sent on this connection"})
            return
        record = judge_ack(frame, ack, now=state.clock.now(), now_ms=state.clock.epoch_ms(),
                           card_callback_timeout=self.settings.card_callback_timeout, raw=text)
        if frame.ack is not None:
            record.verdict = "duplicate"
            frame.extra_acks.append(record)
        else:
            frame.record_ack(record)
            if frame.kind == "card_callback" and record.verdict == "ok" and self.on_card_ack:
                self.on_card_ack(frame, record)

    async def _pinger(self, conn: Connection) -> None:
        interval = self.settings.server_ping_interval
        assert interval is not None
        while conn.state in ("open", "zombie"):
            await trio.sleep(interval)
            if conn.state not in ("open", "zombie"):
                return
            frame = self.push_to(conn, "SYSTEM", "ping", "ping", {"opaque": self.state.ids.opaque()})
            timeout = self.settings.server_ping_timeout
            if timeout:
                with trio.move_on_after(timeout):
                    await frame.acked.wait()
                if frame.ack is None or frame.ack.verdict != "ok":
                    logger.info("emulator: connection {} missed a SYSTEM ping; closing it", conn.id)
                    self._close_tcp(conn)
                    return

    async def _lifetime(self, conn: Connection) -> None:
        assert self.settings.max_connection_lifetime is not None
        await trio.sleep(self.settings.max_connection_lifetime)
        if conn.state == "open":
            await self.disconnect(conn.id, "persistent connection is timeout")

    # --- pushing ------------------------------------------------------------------------------
    def push_to(self, conn: Connection, frame_type: str, topic: str, kind: str, payload: Any, *,
                headers: dict[str, str] | None = None, delivery_key: str = "", attempt: int = 0,
                message_id: str | None = None, expect_ack: bool = True,
                allow_oversized: bool = False) -> FrameRecord:
        """Send one frame on ``conn`` and record it."""
        clock = self.state.clock
        now_ms = clock.epoch_ms()
        mid = message_id or self.state.ids.message_id(now_ms)
        if frame_type == "CALLBACK":
            hdrs = {"appId": self.settings.unified_app_id, "connectionId": conn.id,
                    "contentType": "application/json", "messageId": mid, "time": str(now_ms),
                    "topic": topic}
        elif frame_type == "EVENT":
            hdrs = {"topic": "*", "messageId": mid, "contentType": "application/json",
                    "time": str(now_ms)}
        else:
            hdrs = {"contentType": "application/json", "messageId": mid, "time": str(now_ms),
                    "topic": topic}
        if headers:
            assert all(isinstance(v, str) for v in headers.values()), "header values must be strings"
            hdrs.update(headers)
        frame = frame_of(frame_type, hdrs, payload)
        wire = encode_bytes(frame)
        size = len(wire)
        if size > self.settings.max_frame_bytes and not allow_oversized:
            raise EmulatorError(f"frame would be {size} bytes, over max_frame_bytes "
                                f"({self.settings.max_frame_bytes}); use the oversized fault on purpose")
        record = FrameRecord(
            message_id=mid, frame_type=frame_type, topic=topic, kind=kind, connection_id=conn.id,
            sent_at=clock.now(), sent_ms=now_ms, size=size, frame=frame, payload=payload,
            delivery_key=delivery_key, attempt=attempt, expect_ack=expect_ack,
            opaque=payload.get("opaque", "") if isinstance(payload, dict) else "")
        conn.frames.append(record)
        conn.by_message_id.setdefault(mid, record)
        if not conn.swallow:
            self._send(conn, ("text", wire.decode()))
        self.state.notifier.notify()
        return record

    def _send(self, conn: Connection, item: tuple[Any, ...]) -> None:
        # If it just closed, the frame stays recorded as sent and is lost, like on DingTalk.
        with _IF_CLOSED:
            conn.outbox.send_nowait(item)

    def _candidates(self, frame_type: str, topic: str) -> list[Connection]:
        return [c for c in self.connections.values()
                if c.receives_pushes and c.client_id == self.settings.client_id
                and c.subscribed(frame_type, topic)]

    def choose(self, frame_type: str, topic: str) -> Connection | None:
        """The connection that gets the next push of (type, topic), per the push policy."""
        candidates = self._candidates(frame_type, topic)
        if not candidates:
            return None
        policy = self.settings.push_policy
        if policy == "newest":
            return candidates[-1]
        if policy == "round_robin":
            self._round_robin += 1
            return candidates[(self._round_robin - 1) % len(candidates)]
        return self.rng.choice(candidates)

    def deliver(self, frame_type: str, topic: str, kind: str, payload: Any, *,
                headers: dict[str, str] | None = None, delivery_key: str = "", attempt: int = 0,
                allow_oversized: bool = False) -> FrameRecord | None:
        """Push to one chosen connection, apply the duplicate fault and schedule redelivery.

        Returns the frame record, or None when no connection subscribes to the topic.
        """
        conn = self.choose(frame_type, topic)
        if conn is None:
            return None
        record = self.push_to(conn, frame_type, topic, kind, payload, headers=headers,
                              delivery_key=delivery_key, attempt=attempt,
                              allow_oversized=allow_oversized)
        if self.faults.take_duplicate():
            same = self.faults.duplicate_same_message_id
            self.push_to(conn, frame_type, topic, kind, payload, headers=headers,
                         delivery_key=delivery_key, attempt=attempt,
                         message_id=record.message_id if same else None,
                         allow_oversized=allow_oversized)
        delay, limit = None, 0
        if kind == "event":
            delay, limit = self.settings.event_redelivery_delay, self.settings.event_max_redeliveries
        elif kind == "bot_message":
            delay, limit = self.settings.bot_redelivery_delay, self.settings.bot_max_redeliveries
        if delay is not None and attempt < limit and self.nursery is not None:
            self.nursery.start_soon(self._redeliver_later, record, delay, headers, allow_oversized)
        return record

    async def _redeliver_later(self, record: FrameRecord, delay: float,
                               headers: dict[str, str] | None, allow_oversized: bool) -> None:
        deadline = trio.current_time() + delay
        with trio.move_on_at(deadline):
            await record.acked.wait()
            if record.ack is not None and record.ack.verdict == "ok":
                return
        await trio.sleep_until(deadline)  # a LATER / error answer is retried after the same delay
        if record.ack is not None and record.ack.verdict == "ok":
            return
        limit = (self.settings.event_max_redeliveries if record.kind == "event"
                 else self.settings.bot_max_redeliveries)
        attempt = record.attempt + 1
        # No connection to push to right now (the client is reconnecting): like DingTalk, keep the
        # frame and try again after the same delay (each try counts) rather than drop it for good.
        while not self._candidates(record.frame_type, record.topic):
            if attempt >= limit:
                return
            attempt += 1
            await trio.sleep(delay)
        hdrs = dict(headers or {})
        if not self.settings.redelivery_new_message_id:
            conn = self.choose(record.frame_type, record.topic)
            if conn is None:
                return
            new = self.push_to(conn, record.frame_type, record.topic, record.kind, record.payload,
                               headers=hdrs, delivery_key=record.delivery_key,
                               attempt=attempt, message_id=record.message_id,
                               allow_oversized=allow_oversized)
            # The same messageId on the same connection: the new ACK must land on the new record.
            conn.by_message_id[new.message_id] = new
            if new.attempt < limit and self.nursery is not None:
                self.nursery.start_soon(self._redeliver_later, new, delay, headers, allow_oversized)
        else:
            new_record = self.deliver(record.frame_type, record.topic, record.kind, record.payload,
                                      headers=hdrs, delivery_key=record.delivery_key,
                                      attempt=attempt, allow_oversized=allow_oversized)
            if new_record is None:
                return
            new = new_record
        logger.info("emulator: redelivered {} {} (attempt {})", record.kind, record.delivery_key,
                    new.attempt)
        if self.on_redelivery:
            self.on_redelivery(new)

    # --- SYSTEM frames and faults --------------------------------------------------------------
    def select(self, connection_id: str | None, *, states: tuple[str, ...] = ("open", "zombie",
                                                                            "disconnecting")) -> list[Connection]:
        if connection_id is not None:
            conn = self.connections.get(connection_id)
            if conn is None:
                raise NotFound(f"no connection {connection_id!r}")
            if conn.state == "closed":
                raise EmulatorError(f"connection {connection_id!r} is already closed")
            return [conn]
        conns = [c for c in self.connections.values() if c.state in states]
        if not conns:
            raise NoConnection("no open Stream connection")
        return conns

    async def ping(self, connection_id: str | None = None) -> list[FrameRecord]:
        return [self.push_to(c, "SYSTEM", "ping", "ping", {"opaque": self.state.ids.opaque()})
                for c in self.select(connection_id, states=("open", "zombie"))]

    async def disconnect(self, connection_id: str | None = None,
                         reason: str = "connection is expired") -> list[FrameRecord]:
        """SYSTEM disconnect: nothing more is pushed there; TCP closes ``disconnect_grace`` later."""
        frames = []
        for conn in self.select(connection_id, states=("open", "zombie")):
            frames.append(self.push_to(conn, "SYSTEM", "disconnect", "disconnect",
                                       {"reason": reason}, expect_ack=False))
            conn.state = "disconnecting"
            if self.nursery is not None:
                self.nursery.start_soon(self._close_after_grace, conn)
        self.state.notifier.notify()
        return frames

    async def _close_after_grace(self, conn: Connection) -> None:
        with trio.move_on_after(self.settings.disconnect_grace):
            await conn.closed.wait()
            return
        if conn.state != "closed":
            logger.info("emulator: closing connection {} {} s after disconnect", conn.id,
                        self.settings.disconnect_grace)
            self._close_tcp(conn)

    def _close_tcp(self, conn: Connection) -> None:
        conn.closed_by = conn.closed_by or "server"
        if conn.link is not None:
            conn.close_code = None
            conn.link.close_tcp()
        else:  # not relayed (client used /connect on the HTTP port): a close frame is all we have
            self._send(conn, ("close", 1000, ""))

    def make_zombie(self, connection_id: str | None, *, pongs: bool = False) -> list[Connection]:
        conns = self.select(connection_id, states=("open",))
        for conn in conns:
            if conn.link is None and not pongs:
                raise EmulatorError(f"connection {conn.id} does not go through the gateway endpoint; "
                                    "TCP faults need it")
            conn.state = "zombie"
            if pongs:
                conn.swallow = True
            else:
                assert conn.link is not None
                conn.link.make_zombie()
        self.state.notifier.notify()
        return conns

    async def drop(self, connection_id: str | None) -> list[Connection]:
        conns = self.select(connection_id)
        for conn in conns:
            if conn.link is None:
                raise EmulatorError(f"connection {conn.id} does not go through the gateway endpoint; "
                                    "TCP faults need it")
            conn.closed_by, conn.close_code = "server", None
            conn.close_reason = "TCP reset"
            conn.link.abort()
        return conns

    async def close(self, connection_id: str | None, code: int, reason: str) -> list[Connection]:
        if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
                or 3000 <= code <= 4999):
            raise EmulatorError(f"close code {code} cannot be sent on the wire")
        conns = self.select(connection_id)
        for conn in conns:
            self._send(conn, ("close", code, reason))
        return conns

    async def send_malformed(self, connection_id: str | None, kind: str) -> list[FrameRecord]:
        records = []
        for conn in self.select(connection_id, states=("open",)):
            now_ms = self.state.clock.epoch_ms()
            mid = self.state.ids.message_id(now_ms)
            good = build_frame("CALLBACK", {"appId": self.settings.unified_app_id,
                                            "connectionId": conn.id, "contentType": "application/json",
                                            "messageId": mid, "time": str(now_ms), "topic": BOT_TOPIC},
                               {"msgtype": "text", "text": {"content": "malformed"}})
            item: tuple[Any, ...]
            frame: Any = good
            if kind == "not_json":
                item = ("text", "{this is not json")
            elif kind == "binary":
                item = ("bytes", encode(good).encode())
            elif kind == "not_object":
                item = ("text", encode([good]))
            elif kind == "data_object":
                frame = dict(good, data={"msgtype": "text", "text": {"content": "malformed"}})
                item = ("text", encode(frame))
            elif kind == "numeric_time":
                frame = dict(good, headers=dict(good["headers"], time=now_ms))
                item = ("text", encode(frame))
            elif kind == "missing_message_id":
                frame = dict(good, headers={k: v for k, v in good["headers"].items() if k != "messageId"})
                item = ("text", encode(frame))
            elif kind == "unknown_type":
                frame = dict(good, type="BOGUS")
                item = ("text", encode(frame))
            elif kind == "truncated":
                item = ("text", encode(good)[:40])
            else:
                raise EmulatorError(f"unknown malformed kind {kind!r}")
            record = FrameRecord(message_id=mid, frame_type="RAW", topic=BOT_TOPIC, kind="malformed",
                                 connection_id=conn.id, sent_at=self.state.clock.now(), sent_ms=now_ms,
                                 size=len(item[1]), frame=frame if isinstance(frame, dict) else None,
                                 payload={"malformed": kind}, expect_ack=False)
            conn.frames.append(record)
            self._send(conn, item)
            records.append(record)
        self.state.notifier.notify()
        return records

    # --- waiting ------------------------------------------------------------------------------
    def open_connections(self) -> list[Connection]:
        return [c for c in self.connections.values() if c.state == "open"]

    def find_frame(self, message_id: str) -> FrameRecord | None:
        for conn in self.connections.values():
            frame = conn.by_message_id.get(message_id)
            if frame is not None:
                return frame
        return None

    async def wait(self, predicate: Callable[[], Any]) -> Any:
        return await self.state.notifier.wait_until(predicate)


def _check_subscriptions(subs: Any) -> str:
    if not isinstance(subs, list):
        return "subscriptions must be a list of {type, topic}"
    if not subs:
        return "subscriptions is empty"
    for i, sub in enumerate(subs):
        if not isinstance(sub, dict) or not isinstance(sub.get("type"), str) or not isinstance(
                sub.get("topic"), str):
            return f"subscriptions[{i}] must be an object with string type and topic"
        if sub["type"] not in ("EVENT", "CALLBACK", "SYSTEM"):
            return f"subscriptions[{i}].type must be EVENT, CALLBACK or SYSTEM"
        if sub["type"] == "EVENT" and sub["topic"] != "*":
            return f"subscriptions[{i}]: EVENT subscriptions only support topic '*'"
    return ""


