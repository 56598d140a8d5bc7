"""A small HTTP/1.1 ASGI server (h11 on trio) for the session-webhook host.

DingTalk serves session webhooks on its own host (``https://oapi.dingtalk.com/robot/sendBySession``),
apart from the OpenAPIs (``api.dingtalk.com``); the emulator does the same on a port of its own
(``Emulator.webhook_url``), serving the very same Starlette app as the main port. The reason for a
server of its own: every answered message is one webhook POST, and hypercorn spends ~1.1 ms of CPU
per request on the 2-vCPU development machine (a task and timers per request, headers and body
written separately), more than all the rest of the emulator's reply path; this loop costs a fraction
of that (``benchmarks/e2e_reply.py``, ``benchmarks/emulator_bench.py``).

What it does: HTTP/1.1 with keep-alive (h11 does the protocol: parsing, framing, ``Connection:
close``, ``Expect: 100-continue``), one request at a time per connection, the ASGI 3 HTTP scope
(``http.request`` with the whole body, ``http.response.start``/``body``, ``http.disconnect`` once the
answer is sent), the answer written in one ``send``. A request body over ``max_body_bytes`` gets 413,
a malformed request 400, an app exception 500 (logged); idle connections close after
``keepalive_timeout``. No WebSocket, no HTTP/2, no lifespan (the emulator's app has none).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote

import h11
import trio

from host.logs import logger

__all__ = ["serve_h11"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_RECEIVE_SIZE = 65536
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def serve_h11(
    app: AsgiApp,
    host: str,
    port: int,
    *,
    direct: Mapping[tuple[str, str], AsgiApp] | None = None,
    max_body_bytes: int = 32 << 20,
    keepalive_timeout: float = 75.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (0 = any free port) until cancelled; reports the bound port.

    ``direct`` maps ``(method, path)`` to the ASGI app of that one route (a Starlette ``Route.app``):
    such requests skip the application's middleware and route matching, which do nothing for them.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    shortcuts = dict(direct or {})

    async def handle(stream: trio.SocketStream) -> None:
        await _Connection(app, shortcuts, stream, max_body_bytes, keepalive_timeout).serve()

    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


class _Connection:
    """One client connection: requests in order, each through the ASGI app."""

    def __init__(
        self,
        app: AsgiApp,
        direct: dict[tuple[str, str], AsgiApp],
        stream: trio.SocketStream,
        max_body_bytes: int,
        keepalive_timeout: float,
    ) -> None:
        self.app = app
        self.direct = direct
        self.stream = stream
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.h11 = h11.Connection(h11.SERVER)
        sockname = stream.socket.getsockname()
        peername = stream.socket.getpeername()
        self.server = (sockname[0], sockname[1])
        self.client = (peername[0], peername[1])

    async def serve(self) -> None:
        try:
            while True:
                try:
                    request = await self._next_request()
                except _BadRequest as bad:
                    await self._send_simple(bad.status, str(bad))
                    return
                if request is None:
                    return
                scope, body = request
                if not await self._run_app(scope, body):
                    return
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return  # "Connection: close" on either side, or an unfinished exchange
                self.h11.start_next_cycle()
        except _CONNECTION_ERRORS:
            pass  # the client went away
        except h11.LocalProtocolError as exc:  # e.g. a header the app set that HTTP forbids
            logger.error("emulator: could not write an HTTP answer: {!r}", exc)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)

    async def _receive_data(self) -> None:
        data = await self.stream.receive_some(_RECEIVE_SIZE)
        self.h11.receive_data(data)  # b"" = EOF, which h11 turns into ConnectionClosed or an error

    async def _next_request(self) -> tuple[Scope, bytes] | None:
        """The next request's scope and whole body; ``None`` when the client is done."""
        protocol = self.h11
        request: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        idle = True
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                if idle and protocol.their_state is h11.IDLE:
                    return None  # garbage or EOF between requests: just close
                raise _BadRequest(exc.error_status_hint, f"malformed request: {exc}") from None
            if event is h11.NEED_DATA:
                if idle:
                    # Between requests: close a connection left idle too long.
                    with trio.move_on_after(self.keepalive_timeout):
                        await self._receive_data()
                        continue
                    return None
                await self._receive_data()
                continue
            if isinstance(event, h11.Request):
                idle = False
                request = event
                if protocol.client_is_waiting_for_100_continue:
                    await self.stream.send_all(
                        protocol.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    raise _BadRequest(413, f"request body over {self.max_body_bytes} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return self._scope(request), b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    def _scope(self, request: h11.Request) -> Scope:
        target = request.target
        raw_path, _, query = target.partition(b"?")
        return {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),  # h11 gives lower-case names, as ASGI wants
            "client": self.client,
            "server": self.server,
        }

    async def _run_app(self, scope: Scope, body: bytes) -> bool:
        """Run the app for one request and send its answer; ``False`` if the connection must end."""
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        parts: list[bytes] = []
        complete = False
        answered = trio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await answered.wait()  # nothing more comes in: the client is "gone" once answered
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status, headers, complete
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
            elif kind == "http.response.body" and not complete:
                parts.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    complete = True
                    answered.set()

        app = (
            self.direct.get((scope["method"], scope["path"]), self.app) if self.direct else self.app
        )
        failed = False
        try:
            await app(scope, receive, send)
        except Exception as exc:
            logger.opt(exception=exc).error(
                "emulator: {} {} failed: {!r}", scope["method"], scope["path"], exc
            )
            # Starlette's error middleware sends its 500 answer and then re-raises: send that one.
            if not complete:
                if not status:
                    await self._send_simple(500, "Internal Server Error")
                return False  # an answer that had started cannot be finished: close
            failed = True
        if not status:
            await self._send_simple(500, "the app sent no answer")
            return False
        protocol = self.h11
        payload = b"".join(parts)
        if scope["method"] == "HEAD":
            payload = b""  # the headers describe the body a GET would get; none is sent
        elif not any(name.lower() == b"content-length" for name, _ in headers):
            headers.append((b"content-length", str(len(payload)).encode()))
        out = protocol.send(h11.Response(status_code=status, headers=headers)) or b""
        if payload:
            out += protocol.send(h11.Data(data=payload)) or b""
        out += protocol.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)
        answered.set()
        return not failed

    async def _send_simple(self, status: int, text: str) -> None:
        """A plain-text answer, after which the connection closes."""
        protocol = self.h11
        if protocol.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        try:
            out = (protocol.send(h11.Response(status_code=status, headers=headers)) or b"") + (
                protocol.send(h11.Data(data=body)) or b""
            )
            out += protocol.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            return
        await self.stream.send_all(out)
