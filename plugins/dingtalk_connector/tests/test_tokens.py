"""Access tokens per app: cached, refreshed before expiry, single flight, reset on auth errors.

Against the emulator's real ``/v1.0/oauth2/accessToken`` (and, for the cancelled-leader case, a raw
trio TCP server that hangs on the first request). Real clock: these tests wait on sockets.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.errors import TokenError
from host_dingtalk_connector.metrics import OutboundMetrics
from host_dingtalk_connector.retry import RetrySettings
from host_dingtalk_connector.tokens import TOKEN_PATH, AccessTokens
from outkit import FAST_RETRY, app_for, calls, metric, open_outbound

from host.config import Secret
from host.metrics import Metrics

LIMIT = 30
TOKEN_API = f"POST {TOKEN_PATH}"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


@pytest.mark.anyio
async def test_one_request_for_many_concurrent_callers_then_cached() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            metrics = Metrics()
            tokens = AccessTokens(app_for(emu), http, OutboundMetrics(metrics), retry=FAST_RETRY)
            values: list[str] = []

            async def get() -> None:
                values.append(await tokens.get())

            async with trio.open_nursery() as nursery:
                for _ in range(25):
                    nursery.start_soon(get)
            assert len(values) == 25 and len(set(values)) == 1
            assert await tokens.get() == values[0]
            assert len(calls(emu, TOKEN_API)) == 1
            assert tokens.statistics()["requests"] == 1
            assert (
                metric(metrics, "host_dingtalk_token_refreshes_total", app="default", outcome="ok")
                == 1
            )
            # The token is a secret: masked wherever it would be logged, absent from the repr.
            assert values[0] not in repr(tokens)


@pytest.mark.anyio
async def test_refreshed_before_it_expires() -> None:
    with trio.fail_after(LIMIT):
        # A 2 s token: the cache refreshes it from half its lifetime on (at most refresh_margin early).
        async with (
            open_emulator(token_ttl=2.0, token_refresh_extends=False) as emu,
            httpx.AsyncClient() as http,
        ):
            tokens = AccessTokens(app_for(emu), http, OutboundMetrics(Metrics()), retry=FAST_RETRY)
            first = await tokens.get()
            assert await tokens.get() == first
            await trio.sleep(1.1)
            # Still valid at DingTalk for ~0.9 s, but inside the margin: a new request is made.
            second = await tokens.get()
            assert len(calls(emu, TOKEN_API)) == 2
            # The emulator hands out the same token while it is valid (like DingTalk).
            assert second == first


@pytest.mark.anyio
async def test_auth_error_resets_the_token_and_the_call_succeeds_with_a_new_one() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            client = outbound.clients["default"]
            group = emu.state.default_group.id
            await client.send_to_group(group, "sampleText", {"content": "one"}, what="test")
            emu.faults.expire_tokens()  # DingTalk now answers 400 InvalidAuthentication
            await client.send_to_group(group, "sampleText", {"content": "two"}, what="test")
            sends = calls(emu, "POST /v1.0/robot/groupMessages/send")
            assert [c["code"] for c in sends] == ["", "InvalidAuthentication", ""]
            assert len(calls(emu, TOKEN_API)) == 2
            assert [m["text"] for m in emu.bot_messages(group)] == ["one", "two"]


@pytest.mark.anyio
async def test_invalidate_keeps_a_token_newer_than_the_refused_one() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            tokens = AccessTokens(app_for(emu), http, OutboundMetrics(Metrics()), retry=FAST_RETRY)
            current = await tokens.get()
            tokens.invalidate("an-older-token-someone-else-saw-refused")
            assert tokens.statistics()["cached"]
            tokens.invalidate(current)
            assert not tokens.statistics()["cached"]
            await tokens.get()
            assert len(calls(emu, TOKEN_API)) == 2


@pytest.mark.anyio
async def test_refused_credentials_fail_fast_with_the_code_and_request_id(host_logs: Any) -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            metrics = Metrics()
            wrong = "wrong-secret-value-1234"
            app = app_for(emu, client_secret=Secret(wrong))
            tokens = AccessTokens(
                app, http, OutboundMetrics(metrics), retry=FAST_RETRY, failure_cooldown=60
            )
            with pytest.raises(TokenError) as caught:
                await tokens.get()
            error = caught.value
            assert error.code == "invalidClientIdOrSecret" and error.status == 400
            assert error.request_id and error.request_id in str(error)
            assert not error.transient
            assert "client_secret" in str(error) and wrong not in str(error)
            # Within the cooldown, no new request: the token API is not hammered by every reply.
            with pytest.raises(TokenError):
                await tokens.get()
            assert len(calls(emu, TOKEN_API)) == 1
            assert (
                metric(
                    metrics, "host_dingtalk_token_refreshes_total", app="default", outcome="refused"
                )
                == 1
            )
    assert wrong not in host_logs.text()


@pytest.mark.anyio
async def test_network_failures_are_retried_then_reported_as_transient() -> None:
    with trio.fail_after(LIMIT):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there: connection refused
        async with httpx.AsyncClient() as http:
            metrics = Metrics()
            app = app_for_port(port)
            tokens = AccessTokens(app, http, OutboundMetrics(metrics), retry=FAST_RETRY)
            with pytest.raises(TokenError) as caught:
                await tokens.get()
            assert caught.value.transient
            assert tokens.requests == FAST_RETRY.attempts
            assert (
                metric(
                    metrics, "host_dingtalk_token_refreshes_total", app="default", outcome="error"
                )
                == 1
            )


def app_for_port(port: int) -> Any:
    from host_dingtalk_connector.config import AppConfig

    return AppConfig(
        name="default",
        client_id="dingnobody",
        client_secret=Secret("nobody-secret-0000"),
        robot_code="dingnobody",
        openapi_endpoint=f"http://127.0.0.1:{port}",
    )


@pytest.mark.anyio
async def test_a_waiter_takes_over_when_the_leader_is_cancelled() -> None:
    """The first request hangs and its caller gives up; the next caller makes a fresh request."""
    connections = 0
    first_arrived = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        number = connections
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        if number == 1:
            first_arrived.set()
            await trio.sleep_forever()
        body = b'{"accessToken":"tok-from-second-request","expireIn":7200}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, serve, 0)
            port = listeners[0].socket.getsockname()[1]
            async with httpx.AsyncClient() as http:
                tokens = AccessTokens(
                    app_for_port(port),
                    http,
                    OutboundMetrics(Metrics()),
                    retry=RetrySettings(attempts=1, timeout=60),
                )
                results: list[str] = []
                leader_scope = trio.CancelScope()

                async def leader() -> None:
                    with leader_scope:
                        await tokens.get()

                async def waiter() -> None:
                    results.append(await tokens.get())

                async with trio.open_nursery() as inner:
                    inner.start_soon(leader)
                    await first_arrived.wait()
                    inner.start_soon(waiter)
                    await trio.sleep(0.05)
                    leader_scope.cancel()
                assert results == ["tok-from-second-request"]
                assert connections == 2
            nursery.cancel_scope.cancel()
