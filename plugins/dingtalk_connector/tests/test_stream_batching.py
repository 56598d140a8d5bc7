"""Throughput plumbing of the Stream path: the emulator's gateway endpoint (a WebSocket server of its
own, with batched writes) and the connector's ACK writer (ACKs queued together leave in one write).

Real sockets on 127.0.0.1 (emulator tests: virtual time that only jumps after 50 ms of real
idleness; connector tests: the real clock), an absolute ``trio.fail_after`` around each test.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from emulator_support import ack_frame, socket_clock, stream_client
from host_dingtalk_connector.acks import AckWriter, HoldableStream
from host_dingtalk_connector.emulator import BOT_TOPIC, open_emulator
from streamkit import Recorder, acks, dingtalk_config, inbound_problems, open_host
from trio_websocket import ConnectionClosed, wrap_client_stream, wrap_server_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

pytestmark = pytest.mark.anyio

LIMIT = 30  # seconds


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


# --- the emulator's gateway endpoint --------------------------------------------------------------


async def test_gateway_endpoint_answers_only_websocket_upgrades_to_connect() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            base = emu.gateway_url.replace("ws://", "http://").removesuffix("/connect")
            plain = await http.get(f"{base}/connect?ticket=x")
            assert plain.status_code == 400 and plain.json()["code"] == "InvalidRequest"
            assert "Stream gateway" in plain.json()["message"]
            elsewhere = await http.get(f"{base}/v1.0/gateway/connections/open", headers={
                "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            assert elsewhere.status_code == 404 and elsewhere.json()["code"] == "NotFound"
            assert emu.connections() == [] and emu.rejected_handshakes() == []


async def test_pushes_queued_together_leave_in_one_write() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, stream_client(emu) as client:
            conn_id = (await emu.wait_for_connection())["connectionId"]
            link = emu.gateway.connections[conn_id].link
            assert link is not None and link.writes == 0
            # send_user_message never yields: all 20 frames are queued before the writer runs.
            sent = [await emu.send_user_message(f"m{i}") for i in range(20)]
            frames = [await client.receive() for _ in sent]
            assert [json.loads(f["data"])["msgId"] for f in frames] == [s["msgId"] for s in sent]
            assert link.writes == 1
            for frame in frames:
                await client.ack(frame)
            for s in sent:
                assert (await emu.wait_for_ack(s["messageId"]))["verdict"] == "ok"


async def test_an_inbound_message_over_the_limit_closes_with_1009() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator(max_inbound_message_bytes=1000) as emu, stream_client(emu) as client:
            conn_id = (await emu.wait_for_connection())["connectionId"]
            assert client.ws is not None
            await client.ws.send_message("x" * 1001)
            with pytest.raises(ConnectionClosed) as closed:
                await client.receive()
            assert closed.value.reason.code == 1009
            await emu.wait_for_connection_closed(conn_id)
            info = emu.connection(conn_id)
            assert (info["closedBy"], info["closeCode"]) == ("server", 1009)
            assert info["acksReceived"] == 0 and info["inboundProblems"] == []


async def test_a_message_split_in_fragments_is_reassembled() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            info = (await http.post("/v1.0/gateway/connections/open", json={
                "clientId": emu.settings.client_id, "clientSecret": emu.settings.client_secret,
                "subscriptions": [{"type": "CALLBACK", "topic": BOT_TOPIC}]})).json()
            url = httpx.URL(f"{info['endpoint']}?ticket={info['ticket']}")
            # A bare wsproto client: trio-websocket has no API to send a message in fragments.
            stream = await trio.open_tcp_stream(url.host, url.port or 80)
            try:
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(ws.send(Request(host=f"{url.host}:{url.port}",
                                                      target=url.raw_path.decode())))
                events: list[Any] = []
                while not any(isinstance(e, AcceptConnection) for e in events):
                    ws.receive_data(await stream.receive_some())
                    events.extend(ws.events())
                conn_id = (await emu.wait_for_connection())["connectionId"]
                sent = await emu.send_user_message("fragmented ack")
                texts: list[str] = [e.data for e in events if isinstance(e, TextMessage)]
                while not texts:
                    ws.receive_data(await stream.receive_some())
                    texts.extend(e.data for e in ws.events() if isinstance(e, TextMessage))
                text = ack_frame(json.loads(texts[0]))
                half = len(text) // 2
                await stream.send_all(ws.send(TextMessage(data=text[:half], message_finished=False)))
                await stream.send_all(ws.send(TextMessage(data=text[half:], message_finished=True)))
                ack = await emu.wait_for_ack(sent["messageId"])
                assert ack["verdict"] == "ok"
                assert emu.connection(conn_id)["inboundProblems"] == []
            finally:
                stream.socket.close()


# --- the connector's ACK writer ---------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", [("trio", {})])
async def test_acks_of_frames_received_together_leave_in_few_writes(anyio_backend: Any) -> None:
    recorder = Recorder(answer=False)
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_host(dingtalk_config(emu), ("recorder", recorder)) as running:
            stream = running.connector.streams["default"]
            (conn,) = emu.gateway.connections.values()
            assert conn.link is not None
            before, reads_before = stream.statistics()["acks"], conn.link.reads
            sent = [await emu.send_user_message(f"burst {i}") for i in range(50)]
            for s in sent:
                assert (await emu.wait_for_ack(s["messageId"]))["verdict"] == "ok"
            after = stream.statistics()["acks"]
            assert after["sent"] - before["sent"] == 50
            # Frames that arrive together are ACKed together (at least two per write on average),
            # and the emulator reads those ACKs together too.
            assert after["writes"] - before["writes"] <= 25
            assert conn.link.reads - reads_before <= 25
            assert len(acks(emu)) == 50 and not inbound_problems(emu)
            assert sorted(m.id for m in recorder.messages) == sorted(s["msgId"] for s in sent)


async def _websocket_pair(nursery: trio.Nursery, *, server_queue: int) -> tuple[Any, Any, HoldableStream]:
    """A trio-websocket client (on a ``HoldableStream``) and server over an in-memory lockstep
    stream: a write only completes when the other side reads it, like a full TCP window."""
    client_raw, server_raw = trio.testing.lockstep_stream_pair()
    holdable = HoldableStream(client_raw)
    accepted: list[Any] = []
    ready = trio.Event()

    async def serve() -> None:
        request = await wrap_server_stream(nursery, server_raw, message_queue_size=server_queue)  # type: ignore[arg-type]
        accepted.append(await request.accept())
        ready.set()

    nursery.start_soon(serve)
    client = await wrap_client_stream(nursery, holdable, "test", "/connect")  # type: ignore[arg-type]
    await ready.wait()
    return client, accepted[0], holdable


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})])
async def test_ack_writer_sends_in_order_and_waits_when_the_peer_stops_reading(anyio_backend: Any) -> None:
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            client, server, holdable = await _websocket_pair(nursery, server_queue=1)
            writer = AckWriter(client, holdable, max_queued=3)
            nursery.start_soon(writer.run)
            put_done: list[int] = []

            async def producer() -> None:
                for i in range(10):
                    assert await writer.put(f"ack {i}")
                    put_done.append(i)

            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            # The server reads nothing: its one-message queue is full, the socket write blocks,
            # and the writer's queue fills up to max_queued; then put() waits (nothing is dropped).
            assert len(put_done) < 10
            # trio-websocket writing meanwhile (a keepalive ping) waits its turn on the socket.
            pinged = trio.Event()

            async def ping() -> None:
                await client.ping(b"while a batch is being written")
                pinged.set()

            nursery.start_soon(ping)
            await trio.testing.wait_all_tasks_blocked()
            received = [await server.get_message() for _ in range(10)]
            assert received == [f"ack {i}" for i in range(10)]
            assert put_done == list(range(10))
            await pinged.wait()
            await trio.testing.wait_all_tasks_blocked()  # the last write's bookkeeping
            assert writer.stats.sent == 10 and writer.stats.writes < 10
            writer.close()
            assert await writer.put("after close") is False
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_the_gateway_closing_while_a_batch_is_held_loses_nothing_already_written(host_logs: Any) -> None:
    # A raw wsproto gateway on a real socket closes the connection while the ACK writer is holding a
    # batch. What trio-websocket wrote in the batch before the close (ACKs, and its answer to the
    # gateway's close frame) still reaches the gateway, as it would without holding; the ACKs it
    # could no longer write are counted and logged (DingTalk redelivers those frames).
    total = 5000
    with trio.fail_after(LIMIT):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            client_raw = await trio.open_tcp_stream("127.0.0.1", port)
            server_raw = await listener.accept()
            gateway = WSConnection(ConnectionType.SERVER)
            holdable = HoldableStream(client_raw)
            handshake_done = trio.Event()

            async def accept_handshake() -> None:
                while True:
                    gateway.receive_data(await server_raw.receive_some())
                    for event in gateway.events():
                        if isinstance(event, Request):
                            await server_raw.send_all(gateway.send(AcceptConnection()))
                            handshake_done.set()
                            return

            nursery.start_soon(accept_handshake)
            client = await wrap_client_stream(nursery, holdable, "test", "/connect")  # type: ignore[arg-type]
            await handshake_done.wait()
            writer = AckWriter(client, holdable, max_queued=total)
            for i in range(total):
                assert await writer.put(f"ack {i}")
            nursery.start_soon(writer.flush)
            while not holdable._held:  # until the batch is held and has its first ACK
                await trio.lowlevel.checkpoint()
            await server_raw.send_all(gateway.send(CloseConnection(code=1000, reason="bye")))
            while not writer.closed:
                await trio.sleep(0.01)
            await trio.aclose_forcefully(holdable)  # as stream.py does once the gateway closed
            received: list[str] = []
            closed_by_client = False
            while data := await server_raw.receive_some():
                gateway.receive_data(data)
                for event in gateway.events():
                    if isinstance(event, TextMessage):
                        received.append(event.data)
                    elif isinstance(event, CloseConnection):
                        closed_by_client = True
            assert 0 < len(received) < total
            assert received == [f"ack {i}" for i in range(len(received))]
            assert closed_by_client  # trio-websocket's answer to the close frame was not swallowed
            assert writer.stats.sent == len(received) and writer.stats.lost == total - len(received)
            (warning,) = [r for r in host_logs.records if r["level"] == "WARNING"]
            assert f"{total - len(received)} ACK" in warning["message"]
            assert await writer.put("after close") is False
            await server_raw.aclose()
            await listener.aclose()
            nursery.cancel_scope.cancel()
