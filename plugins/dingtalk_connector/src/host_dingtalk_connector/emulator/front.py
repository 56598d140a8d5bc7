"""The gateway's TCP front door: a byte relay in front of the app server's ``/connect``.

DingTalk hands out a WebSocket ``endpoint`` on a separate host; the emulator hands out this relay's
port. Relaying the raw TCP stream is what makes the TCP-level faults possible, which an ASGI app
cannot do on its own:

* ``zombie``: the TCP connection stays open but nothing passes any more in either direction (no
  frames, no pongs to the client's pings), like a NAT that silently dropped the flow;
* ``abort``: the connection is reset (RST) without a WebSocket close frame (client sees 1006);
* ``close_tcp``: FIN without a close frame (what DingTalk does ~10 s after a ``disconnect``).

The relay also reads the client's WebSocket framing (headers only) to learn the close code and
reason the client sent, and how many pings it sent: the app server does not report them.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import trio

from host.logs import logger

__all__ = ["ClientFrameScanner", "GatewayFront", "Link"]

_MAX_HANDSHAKE = 64 * 1024


class ClientFrameScanner:
    """Follows a client->server WebSocket byte stream and notes close frames and pings.

    Only frame headers are parsed (payloads are skipped, except the <= 125-byte close payload), so
    permessage-deflate does not matter: control frames are never compressed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_handshake = True
        self._skip = 0
        self.broken = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.saw_close = False
        self.pings = 0
        self.frames = 0

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self._buf += data
        if self._in_handshake:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HANDSHAKE:
                    self.broken = True
                return
            del self._buf[: end + 4]
            self._in_handshake = False
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        while True:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return
            if len(buf) < 2:
                return
            opcode = buf[0] & 0x0F
            masked = bool(buf[1] & 0x80)
            length = buf[1] & 0x7F
            header = 2
            if length == 126:
                header += 2
            elif length == 127:
                header += 8
            if masked:
                header += 4
            if len(buf) < header:
                return
            if length == 126:
                length = struct.unpack_from("!H", buf, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", buf, 2)[0]
            self.frames += 1
            if opcode == 0x8 and length <= 125:
                if len(buf) < header + length:
                    self.frames -= 1  # counted again once complete
                    return
                payload = bytearray(buf[header : header + length])
                if masked:
                    mask = buf[header - 4 : header]
                    for i in range(len(payload)):
                        payload[i] ^= mask[i % 4]
                self.saw_close = True
                if len(payload) >= 2:
                    self.close_code = struct.unpack_from("!H", payload)[0]
                    self.close_reason = bytes(payload[2:]).decode("utf-8", "replace")
                else:
                    self.close_code = 1005  # "no status received"
                del buf[: header + length]
                continue
            if opcode == 0x9:
                self.pings += 1
            del buf[:header]
            self._skip = length


@dataclass
class Link:
    """One relayed client connection."""

    id: int
    peer: tuple[Any, ...]
    upstream_port: int
    downstream: trio.SocketStream
    upstream: trio.SocketStream
    scanner: ClientFrameScanner = field(default_factory=ClientFrameScanner)
    zombie: bool = False
    ended: str = ""  # how the relay ended: client_eof | server_eof | abort | close_tcp | error
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    bytes_up: int = 0
    bytes_down: int = 0
    done: trio.Event = field(default_factory=trio.Event)

    def make_zombie(self) -> None:
        """Stop relaying in both directions; the TCP connection stays open."""
        self.zombie = True

    def abort(self) -> None:
        """Reset the client's TCP connection (RST, no close frame)."""
        if not self.ended:
            self.ended = "abort"
            # Linger 0 turns close() into a reset instead of an orderly FIN.
            self.downstream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                              struct.pack("ii", 1, 0))
        self.cancel_scope.cancel()

    def close_tcp(self) -> None:
        """Close the client's TCP connection with a FIN but no WebSocket close frame."""
        if not self.ended:
            self.ended = "close_tcp"
        self.cancel_scope.cancel()


class GatewayFront:
    """Listens on the gateway port and relays every connection to the app server."""

    def __init__(self, host: str, port: int, upstream_host: str) -> None:
        self.host = host
        self.port = port
        self.upstream_host = upstream_host
        self.upstream_port = 0  # set once the app server is bound
        self.links: dict[int, Link] = {}  # by the relay's local port towards the app server
        self._next_id = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def link_for(self, client_port: int | None) -> Link | None:
        """The relayed connection whose upstream side has local port ``client_port``."""
        return None if client_port is None else self.links.get(client_port)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        try:
            peer = downstream.socket.getpeername()
            upstream = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
        except OSError as exc:
            logger.warning("gateway front: cannot reach the app server: {}", exc)
            await trio.aclose_forcefully(downstream)
            return
        self._next_id += 1
        local_port = upstream.socket.getsockname()[1]
        link = Link(self._next_id, tuple(peer), local_port, downstream, upstream)
        self.links[local_port] = link
        try:
            with link.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, downstream, upstream, True)
                    nursery.start_soon(self._pump, link, upstream, downstream, False)
        finally:
            # Synchronous closes: an awaited close could be cut short by a surrounding
            # cancellation and leave the other socket open.
            downstream.socket.close()
            upstream.socket.close()
            link.done.set()
            # The app server looked the link up when it accepted the WebSocket (and keeps it).
            if self.links.get(local_port) is link:
                del self.links[local_port]

    async def _pump(self, link: Link, src: trio.SocketStream, dst: trio.SocketStream,
                    client_to_server: bool) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    if not link.ended:
                        link.ended = "client_eof" if client_to_server else "server_eof"
                    break
                if client_to_server:
                    link.bytes_up += len(data)
                    if not link.zombie:
                        link.scanner.feed(data)
                else:
                    link.bytes_down += len(data)
                if link.zombie:
                    continue  # swallowed: the flow is dead but the sockets stay open
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if not link.ended:
                link.ended = "error"
        link.cancel_scope.cancel()
