"""The gateway's WebSocket endpoint: the ``endpoint`` handed out by ``connections/open``.

DingTalk serves the Stream WebSocket on a host of its own; the emulator serves it on a port of its
own, speaking WebSocket itself (wsproto, the sans-I/O protocol library hypercorn and trio-websocket
are built on) over plain trio sockets rather than through the HTTP server, because:

* TCP-level faults need the socket, which an ASGI app never sees:
  ``zombie`` (the connection stays open but nothing passes either way, no frames and no pongs, like
  a NAT that silently dropped the flow), ``abort`` (reset, no close frame: the client sees 1006) and
  ``close_tcp`` (FIN without a close frame, what DingTalk does ~10 s after a ``disconnect``);
* the client's close code and reason and its pings are seen first hand;
* speed: frames queued together leave in one ``send`` and ACKs that arrive together are handled in
  one wake-up, so the emulator is not what limits a Stream benchmark.

Only ``GET /connect`` WebSocket upgrades are served here; anything else gets a 404 (another path) or
400 (not a WebSocket upgrade) with a JSON error. The handshake accepts ``permessage-deflate`` when
offered (as the HTTP server's WebSocket route does).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsProtoConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from host.logs import logger

__all__ = ["GatewayFront", "Link", "Rejection"]

#: Largest HTTP upgrade request head accepted, and how long a client has to send it.
_MAX_HANDSHAKE = 64 * 1024
_HANDSHAKE_TIMEOUT = 30.0
#: Bytes read per ``receive_some``: a burst of ACKs costs one wake-up.
_RECEIVE_BUFFER = 256 * 1024
_JSON_UTF8 = b"application/json;charset=utf-8"


@dataclass
class Rejection:
    """A refused upgrade: the HTTP status and JSON body answered instead of ``101``."""

    status: int
    body: dict[str, Any]


class Link:
    """One client's WebSocket connection on the gateway port (the transport of a ``Connection``).

    ``receive`` returns the next complete inbound messages (``str`` text, ``bytes`` binary) in one
    batch, or ``None`` once the connection is over; ``send`` writes a batch of outbox items in one
    ``send``. Pings are answered here (``pings`` counts them); a close frame from the client is
    answered and recorded in ``client_close``.
    """

    def __init__(self, number: int, peer: tuple[Any, ...], stream: trio.SocketStream,
                 ws: WsProtoConnection, *, max_message_bytes: int) -> None:
        self.id = number
        self.peer = peer
        self.stream = stream
        self.ws = ws
        self.max_message_bytes = max_message_bytes
        self.zombie = False
        #: How the TCP connection ended: "" (open), client_eof, server_eof, abort, close_tcp, error.
        self.ended = ""
        self.pings = 0
        #: Writes to the socket and reads from it that carried messages (how well batching works).
        self.writes = 0
        self.reads = 0
        #: ``(code, reason)`` of the close frame the client sent, if it sent one.
        self.client_close: tuple[int, str] | None = None
        #: ``(code, reason)`` of a close this link sent on its own (1009, protocol errors).
        self.server_close: tuple[int, str] | None = None
        #: Without a close frame the client sees an abnormal closure.
        self.abnormal_close_code = 1006
        self.cancel_scope = trio.CancelScope()
        self.done = trio.Event()
        # The reader (pongs, close replies) and the writer (pushes) share the socket.
        self._send_lock = trio.StrictFIFOLock()
        self._partial: list[str | bytes] = []
        self._partial_size = 0
        self._too_big = False
        self._over = False  # the close handshake is complete: nothing more to read

    # -- faults ------------------------------------------------------------------------------
    def make_zombie(self) -> None:
        """Stop passing anything in either direction; the TCP connection stays open."""
        self.zombie = True

    def abort(self) -> None:
        """Reset the client's TCP connection (RST, no close frame)."""
        if not self.ended:
            self.ended = "abort"
            # Linger 0 turns close() into a reset instead of an orderly FIN.
            self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.cancel_scope.cancel()

    def close_tcp(self) -> None:
        """Close the client's TCP connection with a FIN but no WebSocket close frame."""
        if not self.ended:
            self.ended = "close_tcp"
        self.cancel_scope.cancel()

    # -- I/O -------------------------------------------------------------------------------------
    async def _write(self, data: bytes) -> bool:
        if self.zombie or not data:
            return not self.ended
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.ended = self.ended or "error"
            return False
        self.writes += 1
        return True

    async def send(self, items: list[tuple[Any, ...]]) -> None:
        """Write outbox items (``("text", str)``, ``("bytes", bytes)``, ``("close", code, reason)``)
        in one ``send``; nothing after a close."""
        ws = self.ws
        chunks: list[bytes] = []
        try:
            for item in items:
                kind = item[0]
                if kind == "text":
                    chunks.append(ws.send(TextMessage(data=item[1])))
                elif kind == "bytes":
                    chunks.append(ws.send(BytesMessage(data=item[1])))
                elif kind == "close":
                    chunks.append(ws.send(CloseConnection(code=item[1], reason=item[2])))
                    break
        except LocalProtocolError:
            pass  # the connection is already closing: what could still be sent is sent
        await self._write(b"".join(chunks))

    async def receive(self) -> list[str | bytes] | None:
        """The next inbound messages (at least one), or ``None`` once the connection is over."""
        ws = self.ws
        while not self._over:
            try:
                data = await self.stream.receive_some(_RECEIVE_BUFFER)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.ended = self.ended or "error"
                return None
            if not data:
                self.ended = self.ended or "client_eof"
                return None
            if self.zombie:
                continue  # swallowed: the flow is dead but the socket stays open
            ws.receive_data(data)
            messages: list[str | bytes] = []
            replies: list[bytes] = []
            over = False
            for event in ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    message = self._assemble(event)
                    if message is not None:
                        messages.append(message)
                    elif self._too_big and ws.state is ConnectionState.OPEN:
                        # Like the HTTP server's WebSocket route: 1009 and no more messages.
                        self.server_close = (1009, "")
                        replies.append(ws.send(CloseConnection(code=1009)))
                elif isinstance(event, Ping):
                    self.pings += 1
                    if ws.state is ConnectionState.OPEN:
                        replies.append(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer
                        self.client_close = (event.code, event.reason or "")
                        replies.append(ws.send(event.response()))
                    elif ws.state is ConnectionState.OPEN:  # wsproto found a protocol error
                        self.server_close = (event.code, event.reason or "")
                        replies.append(ws.send(CloseConnection(code=event.code, reason=event.reason)))
                    # (otherwise the client answered our close)
                    over = True
            if replies:
                await self._write(b"".join(replies))
            if over:
                self._over = True
                self.ended = self.ended or "server_eof"  # we close TCP right after the handshake
            if messages:
                self.reads += 1
                return messages
            if over:
                return None
        return None

    def _assemble(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        """A complete message once its last fragment arrived (bounded by ``max_message_bytes``)."""
        if self._too_big:
            return None
        data: str | bytes = event.data if isinstance(event.data, str) else bytes(event.data)
        if event.message_finished and not self._partial:
            if len(data) <= self.max_message_bytes:
                return data
            self._too_big = True
            return None
        self._partial.append(data)
        self._partial_size += len(data)
        if self._partial_size > self.max_message_bytes:
            self._too_big = True
            self._partial.clear()
            return None
        if not event.message_finished:
            return None
        parts, self._partial, self._partial_size = self._partial, [], 0
        return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)  # type: ignore[arg-type]


#: ``admit(ticket) -> Rejection | accepted`` and ``serve(link, accepted)`` (the Gateway's).
Admit = Callable[[str], Any]
Serve = Callable[[Link, Any], Awaitable[None]]


@dataclass
class GatewayFront:
    """Listens on the gateway port and serves each Stream WebSocket with ``serve``."""

    host: str
    port: int
    #: Validates the ticket before the upgrade: a ``Rejection``, or what ``serve`` needs.
    admit: Admit | None = None
    serve: Serve | None = None
    max_message_bytes: int = 1024 * 1024
    links: dict[int, Link] = field(default_factory=dict)
    _next_id: int = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = tuple(stream.socket.getpeername())
            # Pushes are small frames that must leave at once (trio sets this; be explicit).
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            opened = None
            with trio.move_on_after(_HANDSHAKE_TIMEOUT):
                opened = await self._handshake(stream, peer)
            if opened is None:
                return
            link, accepted = opened
            self.links[link.id] = link
            try:
                with link.cancel_scope:
                    assert self.serve is not None
                    await self.serve(link, accepted)
            finally:
                del self.links[link.id]
                link.ended = link.ended or "server_eof"
                link.done.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("gateway front: connection from a client failed: {!r}", exc)
        except Exception as exc:  # a bug serving one client must not take the emulator down
            logger.opt(exception=exc).error("gateway front: serving a connection failed: {!r}", exc)
        finally:
            # Synchronous close: an awaited one could be cut short by a surrounding cancellation.
            stream.socket.close()

    async def _handshake(self, stream: trio.SocketStream, peer: tuple[Any, ...]) -> tuple[Link, Any] | None:
        """Read the upgrade request; answer 101 (returning the link and what ``admit`` accepted) or
        an HTTP error (None)."""
        ws = WSConnection(ConnectionType.SERVER)
        request: Request | None = None
        received = 0
        while request is None:
            data = await stream.receive_some(_MAX_HANDSHAKE)
            if not data:
                return None
            received += len(data)
            try:
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        request = event
                        break
            except RemoteProtocolError as exc:
                # Not a WebSocket upgrade (plain HTTP, wrong method, missing headers).
                await self._reject(stream, ws, Rejection(exc.event_hint.status_code
                                                         if isinstance(exc.event_hint, RejectConnection) else 400,
                                                         {"code": "InvalidRequest",
                                                          "message": f"this is the Stream gateway: {exc}"}))
                return None
            if request is None and received > _MAX_HANDSHAKE:
                await self._reject(stream, ws, Rejection(431, {"code": "InvalidRequest",
                                                               "message": "request head too large"}))
                return None
        path, _, query = request.target.partition("?")
        if path != "/connect":
            await self._reject(stream, ws, Rejection(404, {"code": "NotFound",
                                                           "message": f"no WebSocket endpoint at {path}"}))
            return None
        ticket = (parse_qs(query).get("ticket") or [""])[0]
        assert self.admit is not None
        accepted = self.admit(ticket)
        if isinstance(accepted, Rejection):
            await self._reject(stream, ws, accepted)
            return None
        await stream.send_all(ws.send(AcceptConnection(extensions=[PerMessageDeflate()])))
        assert ws.connection is not None
        self._next_id += 1
        return Link(self._next_id, peer, stream, ws.connection, max_message_bytes=self.max_message_bytes), accepted

    async def _reject(self, stream: trio.SocketStream, ws: WSConnection, rejection: Rejection) -> None:
        body = msgspec.json.encode(rejection.body)
        headers = [(b"content-type", _JSON_UTF8), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            data = ws.send(RejectConnection(status_code=rejection.status, headers=headers, has_body=True))
            data += ws.send(RejectData(data=body, body_finished=True))
        except LocalProtocolError:  # the request was too broken for an HTTP answer
            return
        await stream.send_all(data)
