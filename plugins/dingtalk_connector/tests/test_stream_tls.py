"""TLS: wss:// gateways are opened with a verifying TLS 1.2+ context; bad certificates are refused.

Real TLS servers on 127.0.0.1 with certificates from a throw-away CA (trustme); real clock.
"""

from __future__ import annotations

import contextlib
import ssl
import warnings
from functools import partial
from typing import Any

import pytest
import trio
import trustme
from host_dingtalk_connector.config import AppConfig, StreamSettings
from host_dingtalk_connector.dedup import DedupCache
from host_dingtalk_connector.errors import HandshakeFailed
from host_dingtalk_connector.identity import NullResolver
from host_dingtalk_connector.metrics import ConnectorMetrics
from host_dingtalk_connector.router import FrameRouter
from host_dingtalk_connector.stream import AppStream, _Connection, _first_error, make_ssl_context
from trio_websocket import WebSocketRequest, serve_websocket

from host.config import Secret
from host.metrics import Metrics

LIMIT = 20


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


class NoIntake:
    closed = False

    def offer(self, message: Any) -> bool:
        return False

    async def wait_for_room(self) -> None:
        return None

    async def submit_event(self, event: Any) -> bool:
        return True


def engine(context: ssl.SSLContext) -> AppStream:
    app = AppConfig("tls", "dingtls", Secret("tls-secret-value"), "dingtls", "https://127.0.0.1:1")
    settings = StreamSettings(connect_timeout=5.0)
    metrics = ConnectorMetrics(Metrics())
    router = FrameRouter(
        app=app, connector_name="dingtalk", settings=settings, intake=NoIntake(), resolver=NullResolver(),
        dedup=DedupCache(), metrics=metrics,
    )  # fmt: skip
    return AppStream(app, settings, router, metrics, ssl_context=context)


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    await ws.send_message('{"specVersion":"1.0","type":"SYSTEM","headers":{"messageId":"p1","topic":"ping"},"data":"{\\"opaque\\":\\"o\\"}"}')
    await ws.get_message()  # the ACK


async def open_once(stream: AppStream, url: str) -> str:
    """Open one connection, let it answer the server's ping, close it; return the ACK'd state."""
    connection = _Connection(stream, 1)
    try:
        async with trio.open_nursery() as nursery:
            tcp, ws = await connection._open(nursery, url)
            raw = await ws.get_message()
            await ws.send_message('{"code":200,"headers":{"messageId":"p1"},"message":"OK","data":""}')
            await ws.aclose()
            await trio.aclose_forcefully(tcp)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = _first_error(group)
        assert error is not None
        raise error from None
    assert isinstance(raw, str)
    return raw


def test_client_context_is_strict() -> None:
    context = make_ssl_context()
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.anyio
async def test_wss_gateway_with_trusted_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = make_ssl_context()
    ca.configure_trust(client_context)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, server_context)
            url = f"wss://127.0.0.1:{server.port}/connect?ticket=t1"
            raw = await open_once(engine(client_context), url)
            assert '"topic":"ping"' in raw
            # The default context (system CAs) does not trust the throw-away CA: refused.
            with pytest.raises(HandshakeFailed, match="TLS handshake"):
                await open_once(engine(make_ssl_context()), url)
            nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_tls_1_1_only_gateway_is_refused() -> None:
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
            server_context.minimum_version = ssl.TLSVersion.TLSv1
            server_context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):  # pragma: no cover - OpenSSL built without TLS 1.1
        pytest.skip("this OpenSSL cannot serve TLS 1.1")
        server_context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL actually speak TLS 1.1
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = make_ssl_context()
    ca.configure_trust(client_context)

    async def tls_only(stream: trio.SSLStream[trio.SocketStream]) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.do_handshake()
        await trio.aclose_forcefully(stream)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(
                partial(trio.serve_ssl_over_tcp, tls_only, 0, server_context, host="127.0.0.1")
            )
            port = listener.transport_listener.socket.getsockname()[1]
            with pytest.raises(HandshakeFailed, match="TLS handshake"):
                await open_once(engine(client_context), f"wss://127.0.0.1:{port}/connect?ticket=t1")
            nursery.cancel_scope.cancel()
