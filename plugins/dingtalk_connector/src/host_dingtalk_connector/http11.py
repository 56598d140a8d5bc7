"""``KeepAliveHttp``: small JSON POSTs over kept-alive HTTP/1.1 connections (h11 on trio).

The session-webhook reply is one small JSON POST per answered message: the hottest outbound call of
the connector. Through ``httpx.AsyncClient.post`` it cost ~1.9 ms of CPU on the 2-vCPU development
machine (request building, auth and redirect machinery, and httpcore's pool scanning every pooled
connection on each request): half of the host's CPU per answered message at 200 msg/s
(``benchmarks/e2e_reply.py``). Here the same request costs ~0.3 ms: HTTP/1.1 itself is ``h11``'s (the
sans-I/O protocol library httpcore also uses), and this module only

* keeps connections per origin (scheme, host, port): the most recently used idle one is reused, one
  that the server closed (readable while idle) or idle longer than ``keepalive_expiry`` is dropped;
  a request that could not be *sent* whole on a reused connection (the server closed it as we reused
  it) is sent once more on a new connection. One that was sent whole is never sent again, even if
  the connection then closed without an answer: the server may have processed it, and a
  session-webhook POST has no idempotency key (a resend could post the reply twice). That failure
  is an ``HttpTransportError`` like any other; whether to try again is the caller's decision;
* bounds each request by one deadline (connect, TLS handshake, send, answer), and the connections
  open at once by ``max_connections``;
* verifies TLS with the caller's context through ``host.tls.open_tls_stream`` (the host's TLS policy;
  a refused certificate is named in the error at once);
* reads the whole answer (bounded by ``max_answer_bytes``).

It does not do proxies, redirects, cookies, compression or HTTP/2: ``uses_proxy(url)`` tells the
caller when the environment asks for a proxy (``HTTPS_PROXY``/``ALL_PROXY`` without a ``NO_PROXY``
match, as httpx reads them); the caller then keeps using httpx for that URL.
"""

from __future__ import annotations

import re
import ssl
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import h11
import trio

from host.tls import TlsHandshakeError, open_tls_stream
from host_dingtalk_connector.errors import HttpTransportError

__all__ = ["HttpAnswer", "KeepAliveHttp"]

_USER_AGENT = "host-dingtalk-connector"
_RECEIVE_SIZE = 65536
#: What HTTP/1.1 allows in a request target and the Host header (h11 checks the same).
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+").fullmatch
#: Errors that mean "this connection is unusable" (the server closed it, reset it, sent garbage).
_CONNECTION_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
)


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP answer: status and the whole body."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    #: The Host header value.
    authority: str


class _Connection:
    """One open HTTP/1.1 connection and its h11 state."""

    __slots__ = ("h11", "idle_since", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, socket: Any) -> None:
        self.stream = stream
        self.socket = socket
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def close(self) -> None:
        # Closing the socket is enough (and synchronous): HTTPS peers do not need close_notify
        # (https_compatible), and nothing else waits on this connection any more.
        self.socket.close()


class _FailedBeforeAnswer(Exception):
    """The request could not be sent whole: the server cannot have processed it (it may be sent
    again once)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class KeepAliveHttp:
    """JSON POSTs over a pool of kept-alive HTTP/1.1 connections. ``ssl_context`` verifies HTTPS;
    ``timeout`` bounds each request as a whole (connect, TLS, send, answer), in seconds."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        *,
        timeout: float = 10.0,
        max_connections: int = 200,
        max_idle_per_origin: int = 50,
        keepalive_expiry: float = 5.0,
        max_answer_bytes: int = 1 << 20,
    ) -> None:
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_expiry = keepalive_expiry
        self.max_answer_bytes = max_answer_bytes
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._origins: dict[str, tuple[_Origin, bool]] = {}
        self._proxies = urllib.request.getproxies_environment()
        self._last: tuple[str, tuple[tuple[_Origin, bool], str]] | None = None
        self.is_closed = False

    # -- routing ------------------------------------------------------------------------------------

    def uses_proxy(self, url: str) -> bool:
        """Whether the environment routes ``url`` through a proxy (then use httpx for it).

        ``False`` for a URL this client cannot use at all: ``post_json`` then says why."""
        try:
            return self._origin(url)[0][1]
        except HttpTransportError:
            return False

    def _origin(self, url: str) -> tuple[tuple[_Origin, bool], str]:
        """``((origin, proxied), request target)`` of ``url``; raises ``HttpTransportError``."""
        last = self._last
        if last is not None and last[0] == url:
            return last[1]  # uses_proxy(url) then post_json(url): parse it once
        try:
            parts = urlsplit(url)
        except ValueError:  # its message may quote the URL (a credential)
            raise HttpTransportError("not a usable URL (malformed host)") from None
        key = f"{parts.scheme}://{parts.netloc}"
        known = self._origins.get(key)
        if known is None:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise HttpTransportError(f"not an http(s) URL: scheme {parts.scheme!r}")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise HttpTransportError("not a usable URL (bad port)") from None
            if not _VISIBLE_ASCII(parts.netloc):
                raise HttpTransportError("not a usable URL (host not in ASCII)")
            origin = _Origin(parts.scheme, parts.hostname, port, parts.netloc.rpartition("@")[2])
            known = self._origins[key] = (origin, self._proxied(parts.scheme, parts.hostname))
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not _VISIBLE_ASCII(target):  # h11 would refuse it with an error of its own
            raise HttpTransportError(
                "not a usable URL (spaces, control or non-ASCII characters in its path or query)"
            )
        self._last = (url, (known, target))
        return known, target

    def _proxied(self, scheme: str, hostname: str) -> bool:
        proxy = self._proxies.get(scheme) or self._proxies.get("all")
        if not proxy:
            return False
        return not _proxy_bypass(hostname, self._proxies)

    # -- requests -----------------------------------------------------------------------------------

    async def post_json(self, url: str, body: bytes) -> HttpAnswer:
        """POST ``body`` (JSON bytes) to ``url``; the whole answer within ``self.timeout`` seconds.

        Raises ``HttpTransportError`` (``timeout`` set when the deadline passed) for anything that
        kept the request from getting an answer. Never has the URL in its message (session-webhook
        URLs carry a credential).
        """
        if self.is_closed:
            raise HttpTransportError("the HTTP client is closed")
        (origin, _), target = self._origin(url)
        timeout = self.timeout
        with trio.move_on_after(timeout):
            async with self._slots:
                connection = self._checkout(origin)
                if connection is not None:
                    try:
                        return await self._exchange(connection, origin, target, body)
                    except _FailedBeforeAnswer:
                        pass  # closed by the server as we reused it: once more on a new connection
                try:
                    connection = await self._connect(origin)
                except (OSError, trio.BrokenResourceError) as exc:
                    raise HttpTransportError(
                        f"could not connect to {origin.authority}: {_describe(exc)}"
                    ) from None
                try:
                    return await self._exchange(connection, origin, target, body)
                except _FailedBeforeAnswer as failed:
                    raise HttpTransportError(
                        f"{origin.authority} closed the connection before taking the request ({_describe(failed.cause)})"
                    ) from None
        raise HttpTransportError(
            f"{origin.authority} did not answer within {timeout}s", timeout=True
        )

    async def _exchange(
        self, connection: _Connection, origin: _Origin, target: str, body: bytes
    ) -> HttpAnswer:
        """One request/answer on ``connection``; it goes back to the pool only if still usable."""
        reusable = False
        sent = answered = False
        try:
            protocol = connection.h11
            request = h11.Request(
                method="POST",
                target=target,
                headers=[
                    ("Host", origin.authority),
                    ("User-Agent", _USER_AGENT),
                    ("Accept", "application/json"),
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ],
            )
            data = b"".join(
                protocol.send(event) or b""
                for event in (request, h11.Data(data=body), h11.EndOfMessage())
            )
            try:
                await connection.stream.send_all(data)
                sent = True  # from here on the server may process it: never sent again
                status, chunks, size = 0, [], 0
                while True:
                    event = protocol.next_event()
                    if event is h11.NEED_DATA:
                        received = await connection.stream.receive_some(_RECEIVE_SIZE)
                        answered = answered or bool(received)
                        protocol.receive_data(cast(bytes, received))  # h11 takes bytearray too
                        continue
                    if isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > self.max_answer_bytes:
                            raise HttpTransportError(
                                f"{origin.authority} answered with more than {self.max_answer_bytes} bytes"
                            )
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise h11.RemoteProtocolError("connection closed before the answer ended")
            except _CONNECTION_ERRORS as exc:
                if not sent:
                    raise _FailedBeforeAnswer(exc) from None
                if not answered:
                    raise HttpTransportError(
                        f"{origin.authority} closed the connection without answering ({_describe(exc)})"
                    ) from None
                raise HttpTransportError(
                    f"{origin.authority} broke the connection: {_describe(exc)}"
                ) from None
            if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
                protocol.start_next_cycle()
                reusable = True
            return HttpAnswer(status, b"".join(chunks))
        finally:
            # Any other ending (error, cancellation, "Connection: close") leaves it unusable.
            if reusable and not self.is_closed:
                self._checkin(origin, connection)
            else:
                connection.close()

    # -- the pool -----------------------------------------------------------------------------------

    def _checkout(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        expired_before = trio.current_time() - self.keepalive_expiry
        while idle:
            connection = idle.pop()
            # Readable while idle: the server closed it (or sent something unasked): not reusable.
            if connection.idle_since < expired_before or connection.socket.is_readable():
                connection.close()
                continue
            return connection
        return None

    def _checkin(self, origin: _Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle_per_origin:
            connection.close()
            return
        connection.idle_since = trio.current_time()
        idle.append(connection)

    async def _connect(self, origin: _Origin) -> _Connection:
        if origin.scheme == "https":
            try:
                tls_stream = await open_tls_stream(
                    origin.host, origin.port, ssl_context=self.ssl_context
                )
            except TlsHandshakeError as exc:  # names the refused certificate or protocol
                raise HttpTransportError(str(exc)) from None
            transport = tls_stream.transport_stream
            return _Connection(tls_stream, transport.socket)
        stream = await trio.open_tcp_stream(origin.host, origin.port)
        return _Connection(stream, stream.socket)

    async def aclose(self) -> None:
        """Close every idle connection; requests in flight close theirs when they end. Idempotent."""
        self.is_closed = True
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, int]:
        """Idle connections kept, over every origin."""
        return {"idle_connections": sum(len(idle) for idle in self._idle.values())}


#: urllib's NO_PROXY matching (what ``requests`` uses too); public but missing from typeshed.
_proxy_bypass: Callable[[str, dict[str, str]], bool] = getattr(  # noqa: B009
    urllib.request, "proxy_bypass_environment"
)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
