"""The lean keep-alive HTTP/1.1 client of session-webhook replies (``http11.KeepAliveHttp``).

Real servers on 127.0.0.1 (plain trio sockets speaking HTTP/1.1 through h11, and TLS with a
throw-away CA from trustme); real clock, short timeouts only where a timeout is the point.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trustme
from host_dingtalk_connector.errors import HttpTransportError
from host_dingtalk_connector.http11 import KeepAliveHttp

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
async def test_a_reused_connection_dropped_without_an_answer_is_retried_once_on_a_new_one() -> None:
    # Request 2 arrives on the kept connection, which the server then drops without answering (the
    # race of a server closing an idle connection as we reuse it): it is sent again on a new one.
    def drop_second(n: int, request: h11.Request, body: bytes) -> Any:
        return None if n == 2 else (200, [], body)

    with trio.fail_after(LIMIT):
        async with serving(Server(drop_second)) as server:
            http = KeepAliveHttp(client_context(), timeout=5)
            url = f"http://127.0.0.1:{server.port}/x"
            assert (await http.post_json(url, b"one")).body == b"one"
            assert (await http.post_json(url, b"two")).body == b"two"
            assert server.connections == 2 and [b for _, b in server.requests] == [
                b"one",
                b"two",
                b"two",
            ]
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
