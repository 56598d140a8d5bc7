"""The lean keep-alive HTTP/1.1 client of session-webhook replies (``http11.KeepAliveHttp``).

Real servers on 127.0.0.1 (plain trio sockets speaking HTTP/1.1 through h11, and TLS with a
throw-away CA from trustme); real clock, short timeouts only where a timeout is the point.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trustme
from host_dingtalk_connector.errors import HttpTransportError
from host_dingtalk_connector.http11 import HttpAnswer, KeepAliveHttp

from host.tls import client_context

LIMIT = 20
OK = b'{"errcode":0,"errmsg":"ok"}'


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


class Server:
    """An HTTP/1.1 server whose behaviour per request is a script: ``answer(n, request, body)`` returns
    ``(status, headers, body)``, or ``None`` to close the connection without answering."""

    def __init__(self, answer: Callable[[int, h11.Request, bytes], Any]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.port = 0

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, chunks = None, []
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(event, h11.ConnectionClosed):
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        chunks.append(bytes(event.data))
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                body = b"".join(chunks)
                self.requests.append((request, body))
                reply = self.answer(len(self.requests), request, body)
                if isinstance(reply, Awaitable):
                    reply = await reply
                if reply is None:
                    return  # close without answering
                status, headers, content = reply
                headers = [*headers, ("content-length", str(len(content)))]
                out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
                out += (conn.send(h11.Data(data=content)) or b"") + (
                    conn.send(h11.EndOfMessage()) or b""
                )
                await stream.send_all(out)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def serving(
    server: Server, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            listeners = await nursery.start(
                partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
            )
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, server.handle, 0, ssl_context, host="127.0.0.1")
            )
        first = listeners[0]
        server.port = (
            first.socket if ssl_context is None else first.transport_listener.socket
        ).getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """A bare TCP server on 127.0.0.1 running ``handler`` per connection; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream) -> tuple[h11.Request, bytes]:
    """One whole request from ``stream`` (a raw server's own parsing, through h11)."""
    conn = h11.Connection(h11.SERVER)
    request, chunks = None, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(chunks)
        else:
            raise AssertionError(f"unexpected {event!r}")


def always_ok(n: int, request: h11.Request, body: bytes) -> Any:
    return 200, [("content-type", "application/json")], OK


@pytest.mark.anyio
async def test_requests_share_one_kept_alive_connection() -> None:
    with trio.fail_after(LIMIT):
        async with serving(Server(always_ok)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{server.port}/robot/sendBySession?session=abc"
            for i in range(5):
                answer = await http.post_json(url, b'{"n":%d}' % i)
                assert (answer.status, answer.body) == (200, OK)
            assert server.connections == 1
            request, body = server.requests[4]
            assert (request.method, request.target, body) == (
                b"POST",
                b"/robot/sendBySession?session=abc",
                b'{"n":4}',
            )
            headers = dict(request.headers)
            assert headers[b"content-type"] == b"application/json"
            assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
            assert http.statistics() == {"idle_connections": 1}
            await http.aclose()
            assert http.statistics() == {"idle_connections": 0} and http.is_closed
            with pytest.raises(HttpTransportError, match="closed"):
                await http.post_json(url, b"{}")


@pytest.mark.anyio
async def test_concurrent_requests_open_more_connections_and_keep_them() -> None:
    async def slow(n: int, request: h11.Request, body: bytes) -> Any:
        await trio.sleep(0.05)
        return 200, [], body

    with trio.fail_after(LIMIT):
        async with serving(Server(slow)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{server.port}/x"
            answers: list[bytes] = []

            async def one(i: int) -> None:
                answers.append((await http.post_json(url, b"%d" % i)).body)

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
            assert sorted(answers) == [b"0", b"1", b"2", b"3"]
            assert server.connections == 4 and http.statistics() == {"idle_connections": 4}
            await http.post_json(url, b"again")
            assert server.connections == 4  # reused
            await http.aclose()


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_not_reused() -> None:
    # The server answers, then closes the connection (while it is idle in our pool).
    def answer_then_close(n: int, request: h11.Request, body: bytes) -> Any:
        return 200, [("connection", "close")] if n == 1 else [], OK

    with trio.fail_after(LIMIT):
        async with serving(Server(answer_then_close)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{server.port}/x"
            assert (await http.post_json(url, b"1")).status == 200
            assert http.statistics() == {"idle_connections": 0}  # "Connection: close": not kept
            assert (await http.post_json(url, b"2")).status == 200
            assert server.connections == 2
            await http.aclose()


@pytest.mark.anyio
async def test_a_request_the_server_took_whole_is_never_sent_twice() -> None:
    # Request 2 arrives whole on the kept connection; the server then drops it without answering.
    # It may have been processed (a session-webhook POST has no idempotency key): sending it again
    # could post the reply twice, so it is an error and the server sees it once.
    def drop_second(n: int, request: h11.Request, body: bytes) -> Any:
        return None if n == 2 else (200, [], body)

    with trio.fail_after(LIMIT):
        async with serving(Server(drop_second)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{server.port}/x?session=secret-session"
            assert (await http.post_json(url, b"one")).body == b"one"
            with pytest.raises(
                HttpTransportError, match="closed the connection without answering"
            ) as caught:
                await http.post_json(url, b"two")
            assert not caught.value.timeout and "secret-session" not in str(caught.value)
            assert server.connections == 1
            assert [b for _, b in server.requests] == [b"one", b"two"]
            assert (await http.post_json(url, b"three")).body == b"three"  # a new connection
            assert server.connections == 2
            await http.aclose()


@pytest.mark.anyio
async def test_a_request_that_could_not_be_sent_whole_on_a_reused_connection_goes_on_a_new_one() -> None:
    # The server answers request 1, then resets the kept connection after reading only the start of
    # request 2 (as when it closes an idle connection while we reuse it): request 2 did not reach
    # the server whole, so it cannot have been processed and is sent once more on a new connection.
    body = b'{"text":"' + b"x" * (32 << 20) + b'"}'  # more than the kernel buffers take at once
    seen: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        connection = len(seen)
        seen.append(0)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if connection == 0 and conn.their_state is h11.SEND_BODY and seen[0] == 1:
                        # The second request's head has arrived: reset (RST, unread data dropped).
                        stream.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        return
                    conn.receive_data(await stream.receive_some(1 << 20))
                elif isinstance(event, h11.EndOfMessage):
                    seen[connection] += 1
                    out = conn.send(
                        h11.Response(status_code=200, headers=[("content-length", "2")])
                    ) or b""
                    out += (conn.send(h11.Data(data=b"{}")) or b"") + (
                        conn.send(h11.EndOfMessage()) or b""
                    )
                    await stream.send_all(out)
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            stream.socket.close()

    with trio.fail_after(LIMIT):
        async with raw_server(handle) as port:
            http = KeepAliveHttp(client_context(), timeout=15)
            url = f"http://127.0.0.1:{port}/x"
            assert (await http.post_json(url, b"{}")).status == 200
            assert (await http.post_json(url, body)).status == 200
            assert seen == [1, 1]  # the first connection took request 1 only, the new one request 2
            await http.aclose()


@pytest.mark.anyio
async def test_a_new_connection_dropped_without_an_answer_is_an_error() -> None:
    def drop(n: int, request: h11.Request, body: bytes) -> Any:
        return None

    with trio.fail_after(LIMIT):
        async with serving(Server(drop)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            with pytest.raises(
                HttpTransportError, match="closed the connection without answering"
            ) as caught:
                await http.post_json(
                    f"http://127.0.0.1:{server.port}/x?session=secret-session", b"{}"
                )
            assert not caught.value.timeout
            assert "secret-session" not in str(
                caught.value
            )  # the URL (a credential) is never named
            assert server.connections == 1  # no second try: the request may have been taken
            await http.aclose()


@pytest.mark.anyio
async def test_no_answer_within_the_timeout() -> None:
    async def never(n: int, request: h11.Request, body: bytes) -> Any:
        await trio.sleep_forever()

    with trio.fail_after(LIMIT):
        async with serving(Server(never)) as server:
            http = KeepAliveHttp(client_context(), timeout=0.2)
            with pytest.raises(HttpTransportError, match=r"did not answer within 0\.2s") as caught:
                await http.post_json(f"http://127.0.0.1:{server.port}/x", b"{}")
            assert caught.value.timeout
            assert http.statistics() == {
                "idle_connections": 0
            }  # an interrupted exchange is dropped
            await http.aclose()


@pytest.mark.anyio
async def test_refused_connection_oversized_answer_and_bad_urls() -> None:
    def big(n: int, request: h11.Request, body: bytes) -> Any:
        return 200, [], b"x" * 2000

    with trio.fail_after(LIMIT):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        closed_port = listener.getsockname()[1]
        listener.close()  # nobody listens there
        http = KeepAliveHttp(client_context(), timeout=5, max_answer_bytes=1000)
        with pytest.raises(
            HttpTransportError, match=r"could not connect to 127\.0\.0\.1"
        ) as caught:
            await http.post_json(f"http://127.0.0.1:{closed_port}/x", b"{}")
        assert not caught.value.timeout
        async with serving(Server(big)) as server:
            with pytest.raises(HttpTransportError, match="more than 1000 bytes"):
                await http.post_json(f"http://127.0.0.1:{server.port}/x", b"{}")
        assert not http.uses_proxy("ftp://127.0.0.1/x")  # not usable at all: post_json says why
        with pytest.raises(HttpTransportError, match="not an http"):
            await http.post_json("ftp://127.0.0.1/x", b"{}")
        await http.aclose()


ODD_ANSWERS = {
    # name: (raw answer, whether the connection can carry the next request)
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\n{\"err\r\n16\r\ncode\":0,\"errmsg\":\"ok\"}\r\n0\r\n\r\n",
        True,
    ),
    "no length, ends at EOF": (b"HTTP/1.1 200 OK\r\n\r\n" + OK, False),
    "100 Continue first": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n" + OK,
        True,
    ),
    "Connection: close": (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 27\r\n\r\n" + OK,
        False,
    ),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 27\r\n\r\n" + OK, False),
}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", list(ODD_ANSWERS))
async def test_answers_split_in_one_byte_segments(kind: str) -> None:
    # Every answer byte in its own TCP segment (trio sets TCP_NODELAY); the UTF-8 request body
    # arrives whole with its length in bytes; the connection is kept only when HTTP allows it.
    raw, keeps = ODD_ANSWERS[kind]
    bodies: list[bytes] = []
    connections: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        try:
            while True:
                request, body = await read_request(stream)
                assert dict(request.headers)[b"content-length"] == str(len(body)).encode()
                bodies.append(body)
                for i in range(len(raw)):
                    await stream.send_all(raw[i : i + 1])
                    await trio.lowlevel.checkpoint()
                if not keeps:
                    return
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            stream.socket.close()

    body = '{"text":"你好, DingTalk ✓"}'.encode()
    with trio.fail_after(LIMIT):
        async with raw_server(handle) as port:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{port}/robot/sendBySession?session=abc"
            for _ in range(2):
                assert await http.post_json(url, body) == HttpAnswer(200, OK)
            assert bodies == [body, body]
            assert len(connections) == (1 if keeps else 2)
            await http.aclose()


@pytest.mark.anyio
async def test_an_ipv6_literal_host() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    seen: list[h11.Request] = []

    async def handle(stream: trio.SocketStream) -> None:
        request, _ = await read_request(stream)
        seen.append(request)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n" + OK)
        stream.socket.close()

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            try:
                listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="::1"))
            except OSError:
                pytest.skip("no IPv6 loopback")
            port = listeners[0].socket.getsockname()[1]
            http = KeepAliveHttp(client_context(), timeout=5)
            answer = await http.post_json(f"http://[::1]:{port}/x?session=abc", b"{}")
            assert answer == HttpAnswer(200, OK)
            assert seen[0].target == b"/x?session=abc"
            assert dict(seen[0].headers)[b"host"] == f"[::1]:{port}".encode()
            await http.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_cancelled_or_closed_mid_answer_the_connection_is_closed_not_pooled() -> None:
    # Half an answer, then the server waits: the caller gives up (cancellation, not our timeout).
    # Then a request in flight while the client is closed: answered, but its connection not kept.
    eofs: list[int] = []
    release = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await read_request(stream)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 27\r\n\r\n"
            await stream.send_all(head + OK[:10])
            await release.wait()
            await stream.send_all(OK[10:])
            while await stream.receive_some(65536):
                pass
            eofs.append(1)  # the client closed its socket
        finally:
            stream.socket.close()

    with trio.fail_after(LIMIT):
        async with raw_server(handle) as port:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{port}/x"
            with trio.move_on_after(0.2) as scope:
                await http.post_json(url, b"{}")
            assert scope.cancelled_caught
            assert http.statistics() == {"idle_connections": 0}
            release.set()
            while not eofs:
                await trio.sleep(0.01)
            release = trio.Event()
            answers: list[HttpAnswer] = []
            async with trio.open_nursery() as nursery:

                async def in_flight() -> None:
                    answers.append(await http.post_json(url, b"{}"))

                nursery.start_soon(in_flight)
                await trio.sleep(0.1)
                await http.aclose()
                release.set()
            assert answers == [HttpAnswer(200, OK)]
            assert http.statistics() == {"idle_connections": 0}
            while len(eofs) < 2:
                await trio.sleep(0.01)


@pytest.mark.anyio
async def test_a_url_http_cannot_carry_is_a_transport_error_without_the_url() -> None:
    # The caller (replies.py) falls back to the OpenAPI on HttpTransportError only: any other
    # exception would lose the reply. Nothing is sent, and the session credential is never named.
    with trio.fail_after(LIMIT):
        async with serving(Server(always_ok)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            base = f"http://127.0.0.1:{server.port}"
            for url in (
                f"{base}/robot send?session=SECRET",
                f"{base}/r\u00f6bot?session=SECRET",
                f"{base}/robot?session=SECRET\r\nX-Injected: 1",
                "http://127.0.0.1:99999/robot?session=SECRET",
                "http://127.0.0.1:port/robot?session=SECRET",
                "http://[::1/robot?session=SECRET",
            ):
                assert not http.uses_proxy(url)
                with pytest.raises(HttpTransportError) as caught:
                    await http.post_json(url, b"{}")
                assert "SECRET" not in str(caught.value) and not caught.value.timeout
            assert server.connections == 0 and server.requests == []
            await http.aclose()


@pytest.mark.anyio
async def test_https_is_verified_with_the_given_context() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    trusting = client_context()
    ca.configure_trust(trusting)
    with trio.fail_after(LIMIT):
        async with serving(Server(always_ok), server_context) as server:
            url = f"https://127.0.0.1:{server.port}/robot/sendBySession?session=abc"
            http = KeepAliveHttp(trusting, timeout=5)
            for _ in range(2):
                assert (await http.post_json(url, b"{}")).body == OK
            assert server.connections == 1
            await http.aclose()
            stranger = KeepAliveHttp(
                client_context(), timeout=5
            )  # does not trust the throw-away CA
            with pytest.raises(HttpTransportError, match="certificate") as caught:
                await stranger.post_json(url, b"{}")
            assert not caught.value.timeout
            await stranger.aclose()


def test_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    assert not KeepAliveHttp(client_context()).uses_proxy(
        "https://oapi.dingtalk.com/robot/sendBySession?session=a"
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    http = KeepAliveHttp(client_context())
    assert http.uses_proxy("https://oapi.dingtalk.com/robot/sendBySession?session=a")
    assert not http.uses_proxy(
        "http://oapi.dingtalk.com/robot/sendBySession?session=a"
    )  # no http proxy
    assert not http.uses_proxy("https://127.0.0.1:8443/robot/sendBySession?session=a")  # NO_PROXY
    monkeypatch.setenv("ALL_PROXY", "http://proxy.example:3128")
    assert KeepAliveHttp(client_context()).uses_proxy("http://oapi.dingtalk.com/x")


@pytest.mark.anyio
async def test_a_webhook_behind_a_configured_proxy_goes_through_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The "proxy" answers itself; what matters is that the webhook POST reached it in proxy form.
    import httpx
    from host_dingtalk_connector.metrics import OutboundMetrics
    from host_dingtalk_connector.replies import ReplySender, ReplySettings

    from host.metrics import Metrics

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    with trio.fail_after(LIMIT):
        async with serving(Server(always_ok)) as proxy, serving(Server(always_ok)) as direct:
            monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
            monkeypatch.setenv("NO_PROXY", "localhost")
            async with httpx.AsyncClient() as client:
                lean = KeepAliveHttp(client_context(), timeout=5)
                sender = ReplySender(
                    {}, client, ReplySettings(), OutboundMetrics(Metrics()), webhook_http=lean
                )
                url = f"http://127.0.0.1:{direct.port}/robot/sendBySession?session=abc"
                assert await sender._webhook_attempt(url, {"msgtype": "text"}) is None
                ((request, body),) = proxy.requests
                assert request.target == url.encode() and body == b'{"msgtype":"text"}'
                assert direct.requests == []
                monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # read when the clients are made
                lean = KeepAliveHttp(client_context(), timeout=5)
                sender = ReplySender(
                    {}, client, ReplySettings(), OutboundMetrics(Metrics()), webhook_http=lean
                )
                assert await sender._webhook_attempt(url, {"msgtype": "text"}) is None
                assert (
                    len(direct.requests) == 1
                    and direct.requests[0][0].target == b"/robot/sendBySession?session=abc"
                )
                await lean.aclose()
