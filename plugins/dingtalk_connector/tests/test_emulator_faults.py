"""Emulator: every fault - registration refused, zombie, abrupt drop, close codes, malformed and
oversized frames, duplicates, expiries and the clock.

Same rules as test_emulator_gateway.py (real sockets, MockClock jumping after 50 ms of real idleness).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from emulator_support import (
    StreamClient,
    data_of,
    open_ws,
    rejected_handshake,
    socket_clock,
    stream_client,
)
from host_dingtalk_connector.emulator import MALFORMED_KINDS, EmulatorError, open_emulator
from trio_websocket import ConnectionClosed

pytestmark = pytest.mark.anyio
VIRTUAL_BUDGET = 3600


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


async def test_registration_can_be_refused_with_401_5xx_or_no_answer() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            client = StreamClient(emu, http)
            emu.faults.refuse_registration("auth", count=1)
            r = await client.register()
            assert r.status_code == 401 and r.json()["code"] == "authFailed"
            assert (await client.register()).status_code == 200  # count=1 used up
            emu.faults.refuse_registration("error", status=502)
            assert [(await client.register()).status_code for _ in range(2)] == [502, 502]
            emu.faults.clear_registration()
            assert (await client.register()).status_code == 200

            emu.faults.refuse_registration("timeout")
            with pytest.raises(httpx.ReadTimeout):  # no answer at all (httpx gives up after 5 s)
                await client.register()

            async def clear_later() -> None:
                await trio.sleep(1)
                emu.faults.clear_registration()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(clear_later)
                released = await client.register()
            assert released.status_code == 200
            outcomes = [r["outcome"] for r in emu.registrations()]
            # Hung calls are answered normally once the fault is cleared (the first one to nobody).
            assert outcomes == ["fault:auth", "ok", "fault:error", "fault:error", "ok", "ok", "ok"]
            with pytest.raises(EmulatorError):
                emu.faults.refuse_registration("error", status=404)


async def test_zombie_connection_passes_nothing_not_even_pongs() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            conn = await emu.wait_for_connection()
            assert client.ws is not None
            await client.ws.ping(b"alive?")  # answered while healthy
            assert emu.faults.zombie() == [conn["connectionId"]]
            sent = await emu.send_user_message("into the void")
            assert sent["delivered"] is True  # the server cannot tell
            with trio.move_on_after(20) as no_frame:
                await client.receive()
            assert no_frame.cancelled_caught
            with trio.move_on_after(20) as no_pong:
                await client.ws.ping(b"still there?")
            assert no_pong.cancelled_caught
            info = emu.connection(conn["connectionId"])
            assert info["state"] == "zombie" and info["tcp"] == "open" and info["frames"][0]["ack"] is None


async def test_stale_zombie_answers_pings_but_loses_pushes() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            emu.faults.zombie(pongs=True)
            await emu.send_user_message("lost")
            assert client.ws is not None
            await client.ws.ping(b"pong please")  # still answered
            with trio.move_on_after(20) as no_frame:
                await client.receive()
            assert no_frame.cancelled_caught


async def test_drop_resets_the_tcp_connection_without_a_close_frame() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            conn = await emu.wait_for_connection()
            await emu.faults.drop()
            with pytest.raises(ConnectionClosed) as closed:
                await client.receive()
            assert closed.value.reason.code == 1006  # abnormal: no close frame
            info = await emu.wait_for_connection_closed(conn["connectionId"])
            assert info["closedBy"] == "server" and info["tcp"] == "abort"


@pytest.mark.parametrize(("code", "reason"), [(1000, ""), (1001, "going away"), (1011, "internal error"),
                                              (4000, "custom")])
async def test_close_with_a_given_code(code: int, reason: str) -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            conn = await emu.wait_for_connection()
            await emu.faults.close(code=code, reason=reason)
            with pytest.raises(ConnectionClosed) as closed:
                await client.receive()
            assert (closed.value.reason.code, closed.value.reason.reason or "") == (code, reason)
            info = await emu.wait_for_connection_closed(conn["connectionId"])
            assert (info["closedBy"], info["closeCode"]) == ("server", code)
            with pytest.raises(EmulatorError):
                await emu.faults.close(code=1006)


async def test_malformed_frames_of_every_kind() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            assert client.ws is not None
            seen = {}
            for kind in MALFORMED_KINDS:
                (record,) = await emu.faults.malformed(kind=kind)
                assert record["kind"] == "malformed" and record["expectAck"] is False
                seen[kind] = await client.ws.get_message()
            assert isinstance(seen["binary"], bytes)
            with pytest.raises(json.JSONDecodeError):
                json.loads(seen["not_json"])
            with pytest.raises(json.JSONDecodeError):
                json.loads(seen["truncated"])
            assert isinstance(json.loads(seen["not_object"]), list)
            assert isinstance(json.loads(seen["data_object"])["data"], dict)
            assert isinstance(json.loads(seen["numeric_time"])["headers"]["time"], int)
            assert "messageId" not in json.loads(seen["missing_message_id"])["headers"]
            assert json.loads(seen["unknown_type"])["type"] == "BOGUS"
            with pytest.raises(EmulatorError):
                await emu.faults.malformed(kind="nonsense")
            # The connection still works afterwards.
            sent = await emu.send_user_message("fine")
            assert data_of(await client.receive())["msgId"] == sent["msgId"]


async def test_oversized_frames_exceed_the_limit_on_purpose_only() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            with pytest.raises(EmulatorError, match="max_frame_bytes"):
                await emu.send_user_message("x" * (300 * 1024))
            assert client.ws is not None
            sent = await emu.faults.oversized()
            raw = await client.ws.get_message()
            assert len(raw.encode()) > emu.settings.max_frame_bytes
            assert data_of(json.loads(raw))["msgId"] == sent["msgId"]


@pytest.mark.parametrize("same", [True, False])
async def test_duplicate_deliveries(same: bool) -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            emu.faults.duplicates(1, same_message_id=same)
            sent = await emu.send_user_message("twice")
            first, second = await client.receive(), await client.receive()
            assert data_of(first)["msgId"] == data_of(second)["msgId"] == sent["msgId"]
            assert (first["headers"]["messageId"] == second["headers"]["messageId"]) is same
            once = await emu.send_user_message("once")
            assert data_of(await client.receive())["msgId"] == once["msgId"]
            assert len(emu.deliveries(sent["msgId"])) == 2 and len(emu.deliveries(once["msgId"])) == 1


async def test_expire_tickets_and_advance_clock() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            client = StreamClient(emu, http)
            info = (await client.register()).json()
            assert emu.faults.expire_tickets() == 1
            rejected = await rejected_handshake(f"{info['endpoint']}?ticket={info['ticket']}")
            assert rejected.json()["code"] == "ticket.expired"
            info = (await client.register()).json()
            emu.faults.advance_clock(120)
            assert (await rejected_handshake(f"{info['endpoint']}?ticket={info['ticket']}")).status_code == 401
            info = (await client.register()).json()
            async with open_ws(f"{info['endpoint']}?ticket={info['ticket']}"):
                await emu.wait_for_connection()
            token = emu.issue_access_token()
            emu.faults.advance_clock(7200)
            r = await http.post("/v1.0/robot/messageFiles/download", headers={"x-acs-dingtalk-access-token": token},
                                json={})
            assert r.json()["code"] == "InvalidAuthentication"
            assert emu.faults.to_dict()["clockOffset"] == 7320
