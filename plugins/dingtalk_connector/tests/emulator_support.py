"""Test support for the emulator's own tests: a bare-bones Stream client built only from the
protocol reference (httpx + trio-websocket), so the emulator is checked against the wire format and
not against our connector. ``MiniBot`` is a scripted bot on top of it (auto-ACK, replies).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio.testing
from host_dingtalk_connector.emulator import BOT_TOPIC, CARD_CALLBACK_TOPIC, Emulator
from trio_websocket import WebSocketConnection, wrap_client_stream

ALL_SUBSCRIPTIONS = [
    {"type": "EVENT", "topic": "*"},
    {"type": "CALLBACK", "topic": BOT_TOPIC},
    {"type": "CALLBACK", "topic": CARD_CALLBACK_TOPIC},
]


def socket_clock() -> tuple[str, dict[str, Any]]:
    """anyio backend for tests with real sockets: virtual time that only jumps after 50 ms of
    real idleness (so in-flight socket I/O never fires timeouts; see the common brief)."""
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0.05)})


def ack_frame(frame: dict[str, Any], *, code: int = 200, data: Any = None, message: str = "OK") -> str:
    payload = {"response": None} if data is None else data
    return json.dumps({"code": code, "headers": {"contentType": "application/json",
                                                  "messageId": frame["headers"]["messageId"]},
                       "message": message, "data": json.dumps(payload)})


class StreamClient:
    """One app connection to the emulator, driven step by step by a test."""

    def __init__(self, emu: Emulator, http: httpx.AsyncClient) -> None:
        self.emu = emu
        self.http = http
        self.ws: WebSocketConnection | None = None

    async def register(self, subscriptions: list[dict[str, str]] | None = None, **body: Any) -> httpx.Response:
        payload = {"clientId": self.emu.settings.client_id, "clientSecret": self.emu.settings.client_secret,
                   "subscriptions": ALL_SUBSCRIPTIONS if subscriptions is None else subscriptions,
                   "ua": "emulator-tests/1.0", "localIp": "192.0.2.7", **body}
        return await self.http.post("/v1.0/gateway/connections/open", json=payload)

    async def receive(self) -> dict[str, Any]:
        assert self.ws is not None
        return json.loads(await self.ws.get_message())

    async def ack(self, frame: dict[str, Any], **kw: Any) -> None:
        assert self.ws is not None
        await self.ws.send_message(ack_frame(frame, **kw))

    async def token(self) -> str:
        r = await self.http.post("/v1.0/oauth2/accessToken", json={
            "appKey": self.emu.settings.client_id, "appSecret": self.emu.settings.client_secret})
        assert r.status_code == 200, r.text
        return str(r.json()["accessToken"])


@asynccontextmanager
async def open_ws(url: str) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection whose socket is always closed afterwards.

    (trio-websocket's own ``open_websocket_url`` leaves the socket open when the server drops the
    TCP connection or rejects the handshake, which ``filterwarnings = error`` turns into failures.)
    """
    parsed = httpx.URL(url)
    resource = parsed.raw_path.decode()
    stream = await trio.open_tcp_stream(parsed.host, parsed.port or 80)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"{parsed.host}:{parsed.port}", resource)
            try:
                yield ws
            finally:
                with trio.move_on_after(5) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        stream.socket.close()


@asynccontextmanager
async def stream_client(emu: Emulator, subscriptions: list[dict[str, str]] | None = None
                        ) -> AsyncIterator[StreamClient]:
    """Register and connect; yields a client whose ``ws`` is open."""
    async with httpx.AsyncClient(base_url=emu.base_url) as http:
        client = StreamClient(emu, http)
        r = await client.register(subscriptions)
        assert r.status_code == 200, r.text
        info = r.json()
        async with open_ws(f"{info['endpoint']}?ticket={info['ticket']}") as ws:
            client.ws = ws
            yield client


async def rejected_handshake(url: str) -> httpx.Response:
    """Attempt a WebSocket upgrade that the server is expected to refuse; returns the HTTP answer.

    (trio-websocket leaks its socket when a handshake is rejected, so rejections are probed with a
    plain HTTP upgrade request instead.)
    """
    async with httpx.AsyncClient() as http:
        response = await http.get(url.replace("ws://", "http://", 1), headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert response.status_code != 101, "the handshake was accepted"
    return response


def data_of(frame: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(frame["data"])
    assert isinstance(value, dict)
    return value


class MiniBot:
    """Answers every bot message: ACK, then ``text`` replies "echo: <text>" through the session
    webhook, or for texts starting with "card" an AI card streamed in three steps."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with stream_client(self.emu) as client:
            token = await client.token()
            task_status.started()
            while True:
                frame = await client.receive()
                if frame["type"] == "SYSTEM":
                    await client.ack(frame, data=data_of(frame))
                    continue
                await client.ack(frame)
                if frame["headers"]["topic"] != BOT_TOPIC:
                    continue
                msg = data_of(frame)
                text = msg.get("text", {}).get("content", "").strip()
                if text.startswith("card"):
                    await self._card(client, token, msg, text)
                else:
                    r = await client.http.post(msg["sessionWebhook"], json={
                        "msgtype": "text", "text": {"content": f"echo: {text}"}})
                    assert r.json()["errcode"] == 0, r.text

    async def _card(self, client: StreamClient, token: str, msg: dict[str, Any], text: str) -> None:
        headers = {"x-acs-dingtalk-access-token": token}
        out_track_id = "card-" + msg["msgId"].strip("=").replace("+", "").replace("/", "")
        group = msg["conversationType"] == "2"
        space = (f"dtv1.card//IM_GROUP.{msg['conversationId']}" if group
                 else f"dtv1.card//IM_ROBOT.{msg['senderStaffId']}")
        body: dict[str, Any] = {
            "cardTemplateId": "382e4302-551d-4880-bf29-a30acfab2e71.schema", "outTrackId": out_track_id,
            "cardData": {"cardParamMap": {"msgContent": ""}}, "callbackType": "STREAM",
            "openSpaceId": space,
            ("imGroupOpenDeliverModel" if group else "imRobotOpenDeliverModel"):
                {"robotCode": self.emu.settings.client_id, "spaceType": "IM_ROBOT"},
        }
        r = await client.http.post("/v1.0/card/instances/createAndDeliver", json=body, headers=headers)
        assert r.status_code == 200, r.text
        answer = f"Streaming answer to: {text}"
        for i, end in enumerate((8, 20, len(answer))):
            r = await client.http.put("/v1.0/card/streaming", headers=headers, json={
                "outTrackId": out_track_id, "guid": f"{out_track_id}-{i}", "key": "msgContent",
                "content": answer[:end], "isFull": True, "isFinalize": end == len(answer), "isError": False})
            assert r.status_code == 200, r.text
            await trio.sleep(0.05)
