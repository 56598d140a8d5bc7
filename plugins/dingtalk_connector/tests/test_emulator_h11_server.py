"""The emulator's lean HTTP/1.1 server (``emulator.h11_server``), the session-webhook host.

A Starlette app served on 127.0.0.1; clients are raw trio sockets (to send what a well-behaved
client would not) and httpx; real clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.emulator.h11_server import serve_h11
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

LIMIT = 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {"method": request.method, "path": request.url.path, "query": request.url.query,
         "type": request.headers.get("content-type"), "size": len(body), "text": body.decode()}
    )  # fmt: skip


async def boom(request: Request) -> Response:
    raise RuntimeError("the endpoint broke")


async def via_app(request: Request) -> Response:
    return PlainTextResponse("through the app")


async def direct_app(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("direct")(scope, receive, send)


APP = Starlette(
    routes=[
        Route("/echo", echo, methods=["GET", "POST", "HEAD"]),
        Route("/boom", boom, methods=["POST"]),
        Route("/hot", via_app, methods=["POST"]),
    ]
)


@asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_h11, APP, "127.0.0.1", 0, **options))
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server sends until it closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    await stream.aclose()
    return received


@pytest.mark.anyio
async def test_requests_are_answered_through_the_app_on_one_kept_alive_connection() -> None:
    with trio.fail_after(LIMIT):
        async with (
            serving() as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            first = await client.post("/echo?session=a%20b", json={"msgtype": "text"})
            assert first.status_code == 200
            assert first.json() == {"method": "POST", "path": "/echo", "query": "session=a%20b",
                                    "type": "application/json", "size": 18, "text": '{"msgtype":"text"}'}  # fmt: skip
            second = await client.get("/echo")
            assert second.json()["method"] == "GET"
            assert (await client.post("/nowhere")).status_code == 404  # the app's own 404
            assert (await client.get("/hot")).status_code == 405
            # Two requests in one write are answered in order.
            raw = await exchange(port, b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n"
                                       b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")  # fmt: skip
            assert raw.count(b"HTTP/1.1 200") == 2 and raw.endswith(b'"size":2,"text":"hi"}')


@pytest.mark.anyio
async def test_head_expect_continue_and_chunked_bodies() -> None:
    with trio.fail_after(LIMIT):
        async with serving() as port:
            head = await exchange(
                port, b"HEAD /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
            assert head.startswith(b"HTTP/1.1 200") and head.endswith(
                b"\r\n\r\n"
            )  # headers, no body
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
            )
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            answer = await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'"text":"hello"}')
            await stream.aclose()
            chunked = await exchange(port, b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                                           b"connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")  # fmt: skip
            assert chunked.endswith(b'"size":5,"text":"abcde"}')


@pytest.mark.anyio
async def test_bad_requests_get_4xx_and_a_broken_endpoint_500_while_the_server_keeps_serving(
    host_logs: Any,
) -> None:
    with trio.fail_after(LIMIT):
        async with serving(max_body_bytes=10) as port:
            malformed = await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
            assert malformed.startswith(b"HTTP/1.1 400 ") and b"malformed request" in malformed
            big = await exchange(
                port, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n" + b"x" * 11
            )
            assert big.startswith(b"HTTP/1.1 413 ") and b"request body over 10 bytes" in big
            broken = await exchange(
                port, b"POST /boom HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
            )
            assert broken.startswith(b"HTTP/1.1 500 ")
            assert any("the endpoint broke" in line for line in host_logs.messages("ERROR"))
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://127.0.0.1:{port}/echo")).status_code == 200
            # A client that connects and leaves without a request is no problem either.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            assert (
                await exchange(port, b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            ).startswith(b"HTTP/1.1 200")


@pytest.mark.anyio
async def test_idle_connections_are_closed_after_the_keepalive_timeout() -> None:
    with trio.fail_after(LIMIT):
        async with serving(keepalive_timeout=0.2) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
            received = b""
            while chunk := await stream.receive_some(65536):  # answered, then closed once idle
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
            await stream.aclose()


@pytest.mark.anyio
async def test_direct_routes_skip_the_app() -> None:
    with trio.fail_after(LIMIT):
        async with (
            serving(direct={("POST", "/hot"): direct_app}) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            assert (await client.post("/hot")).text == "direct"
            assert (await client.get("/echo")).status_code == 200  # everything else: the app


@pytest.mark.anyio
async def test_the_emulator_hands_out_session_webhooks_on_their_own_host() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient() as client:
            assert (
                emu.webhook_url.startswith("http://127.0.0.1:") and emu.webhook_url != emu.base_url
            )
            sent = await emu.send_user_message("hi")
            assert sent["sessionWebhook"].startswith(
                emu.webhook_url + "/robot/sendBySession?session="
            )
            answer = await client.post(
                sent["sessionWebhook"], json={"msgtype": "text", "text": {"content": "yo"}}
            )
            assert answer.json() == {"errcode": 0, "errmsg": "ok"}
            refused = await client.post(sent["sessionWebhook"], json={"msgtype": "nope"})
            assert refused.json()["errcode"] == 400105
            # The webhook host is the same app: the main port still serves the webhook too.
            also = await client.post(emu.base_url + "/robot/sendBySession?session=" + sent["sessionWebhook"].rsplit("=", 1)[1],
                                     json={"msgtype": "text", "text": {"content": "again"}})  # fmt: skip
            assert also.json()["errcode"] == 0
            texts = [m["text"] for m in emu.bot_messages(sent["conversationId"])]
            assert texts == ["yo", "again"]
            calls = emu.calls("POST /robot/sendBySession")
            assert [c["status"] for c in calls] == [200, 200, 200] and calls[1]["code"] == "400105"
