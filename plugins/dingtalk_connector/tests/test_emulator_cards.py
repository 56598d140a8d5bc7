"""Emulator: AI / interactive cards - create, deliver, update, streaming state machine, errors, and
user clicks answered over the Stream (2 s deadline) or over HTTP.

Same rules as test_emulator_gateway.py (real sockets, MockClock jumping after 50 ms of real idleness).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from functools import partial
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio
from emulator_support import data_of, socket_clock, stream_client
from host_dingtalk_connector.emulator import CARD_CALLBACK_TOPIC, Emulator, open_emulator
from hypercorn.config import Config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

pytestmark = pytest.mark.anyio
VIRTUAL_BUDGET = 3600
TEMPLATE = "382e4302-551d-4880-bf29-a30acfab2e71.schema"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


def error_code(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"requestid", "code", "message"}
    return str(r.json()["code"])


class Cards:
    def __init__(self, emu: Emulator, http: httpx.AsyncClient) -> None:
        self.emu, self.http = emu, http
        self.h = {"x-acs-dingtalk-access-token": emu.issue_access_token()}

    async def create_and_deliver(self, out_track_id: str, space: str, **extra: Any) -> httpx.Response:
        body = {"cardTemplateId": TEMPLATE, "outTrackId": out_track_id,
                "cardData": {"cardParamMap": {"msgContent": ""}}, "callbackType": "STREAM",
                "openSpaceId": space, "imGroupOpenDeliverModel": {"robotCode": self.emu.settings.client_id},
                "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT"}, **extra}
        return await self.http.post("/v1.0/card/instances/createAndDeliver", headers=self.h, json=body)

    async def stream(self, out_track_id: str, content: str, guid: str, **flags: Any) -> httpx.Response:
        body = {"outTrackId": out_track_id, "guid": guid, "key": "msgContent", "content": content,
                "isFull": True, "isFinalize": False, "isError": False, **flags}
        return await self.http.put("/v1.0/card/streaming", headers=self.h, json=body)


async def test_ai_card_streams_through_its_states_in_group_and_1_to_1() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            cards = Cards(emu, http)
            group = emu.state.default_group.id
            r = await cards.create_and_deliver("card-g", f"dtv1.card//IM_GROUP.{group}")
            assert r.status_code == 200, r.text
            assert r.json() == {"success": True, "result": {"outTrackId": "card-g", "deliverResults": [{
                "spaceType": "IM_GROUP", "spaceId": group, "success": True,
                "carrierId": r.json()["result"]["deliverResults"][0]["carrierId"], "errorMsg": ""}]}}
            assert emu.card("card-g")["state"] == "PROCESSING"
            assert (await cards.stream("card-g", "Hel", "g1")).json() == {"success": True, "result": True}
            assert emu.card("card-g")["state"] == "INPUTING"
            await cards.stream("card-g", "Hello wor", "g2")
            await cards.stream("card-g", "Hello wor", "g2")  # same guid: a no-op
            await cards.stream("card-g", "Hello world", "g3", isFinalize=True)
            (message,) = emu.bot_messages(group)
            assert (message["via"], message["text"], message["state"]) == ("card", "Hello world", "FINISHED")
            card = message["card"]
            assert [s["content"] for s in card["streams"]] == ["Hel", "Hello wor", "Hello world"]
            assert [s["state"] for s in card["streams"]] == ["INPUTING", "INPUTING", "FINISHED"]
            assert card["streamingKey"] == "msgContent"

            await emu.send_user_message("hi", sender_staff_id="manager1234")
            r = await cards.create_and_deliver("card-1", "dtv1.card//IM_ROBOT.manager1234")
            assert r.json()["result"]["deliverResults"][0]["success"] is True
            await cards.stream("card-1", "partial", "p1")
            await cards.stream("card-1", "sorry, failed", "p2", isError=True)
            single = emu.state.single_chat_of("manager1234")
            assert single is not None
            card_msg = emu.bot_messages(single.id)[-1]
            assert (card_msg["text"], card_msg["state"]) == ("sorry, failed", "FAILED")
            assert (await emu.wait_for_card("card-1"))["state"] == "FAILED"
            both = await cards.create_and_deliver("card-2", f"dtv1.card//IM_GROUP.{group};IM_ROBOT.manager1234")
            assert [d["spaceType"] for d in both.json()["result"]["deliverResults"]] == ["IM_GROUP", "IM_ROBOT"]
            assert len(emu.bot_messages(group)) == 2 and len(emu.bot_messages(single.id)) == 2


async def test_two_step_create_deliver_and_full_updates() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            h = Cards(emu, http).h
            r = await http.post("/v1.0/card/instances", headers=h, json={
                "cardTemplateId": TEMPLATE, "outTrackId": "two", "callbackType": "STREAM",
                "cardData": {"cardParamMap": {"flowStatus": "1", "msgContent": "", "msgTitle": "T"}}})
            assert r.json() == {"success": True, "result": "two"}
            assert emu.bot_messages(emu.state.default_group.id) == []  # created, not delivered yet
            r = await http.post("/v1.0/card/instances/deliver", headers=h, json={
                "outTrackId": "two", "openSpaceId": f"dtv1.card//IM_GROUP.{emu.state.default_group.id}",
                "imGroupOpenDeliverModel": {"robotCode": emu.settings.client_id}, "userIdType": 1})
            assert r.json()["success"] is True and r.json()["result"][0]["success"] is True
            # The official SDK's AI card: flowStatus "2" (inputing), streaming, then flowStatus "3".
            r = await http.put("/v1.0/card/instances", headers=h, json={
                "outTrackId": "two", "cardData": {"cardParamMap": {"flowStatus": "2", "msgContent": ""}}})
            assert r.json() == {"success": True, "result": True}
            card = emu.card("two")
            assert card["state"] == "INPUTING" and "msgTitle" not in card["cardParamMap"]  # replaced
            await http.put("/v1.0/card/instances", headers=h, json={
                "outTrackId": "two", "cardData": {"cardParamMap": {"msgContent": "final **answer**",
                                                                   "flowStatus": "3"}},
                "privateData": {"user0001": {"cardParamMap": {"seen": "true"}}},
                "cardUpdateOptions": {"updateCardDataByKey": True, "updatePrivateDataByKey": True}})
            card = emu.card("two")
            assert card["state"] == "FINISHED" and card["text"] == "final **answer**"
            assert card["privateData"] == {"user0001": {"seen": "true"}}
            assert len(card["updates"]) == 2


async def test_card_apis_answer_dingtalk_errors() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(streaming_max_content_bytes=1024,
                                 streaming_reject_append_on_markdown=True) as emu, \
                httpx.AsyncClient(base_url=emu.base_url) as http:
            cards = Cards(emu, http)
            h, group = cards.h, f"dtv1.card//IM_GROUP.{emu.state.default_group.id}"
            assert error_code(await cards.create_and_deliver("x", group, cardTemplateId="")) == "param.cardTemplateIdEmpty"
            assert error_code(await cards.create_and_deliver("", group)) == "param.outTrackIdEmpty"
            assert error_code(await cards.create_and_deliver("x", "IM_GROUP.cid")) == "param.openSpaceIdInvalid"
            assert error_code(await cards.create_and_deliver("x", "dtv1.card//IM_NOWHERE.1")) == "param.openSpaceIdInvalid"
            assert error_code(await cards.create_and_deliver("x", group, cardData={
                "cardParamMap": {"list": [1, 2]}})) == "param.cardParamMapInvalid"
            assert (await cards.create_and_deliver("dup", group)).status_code == 200
            assert error_code(await cards.create_and_deliver("dup", group)) == "param.cardAlreadyExist"
            assert error_code(await http.post("/v1.0/card/instances/deliver", headers=h, json={
                "outTrackId": "ghost", "openSpaceId": group})) == "param.cardNotExist"
            assert error_code(await http.put("/v1.0/card/instances", headers=h, json={
                "outTrackId": "ghost", "cardData": {"cardParamMap": {"a": "b"}}})) == "param.cardNotExist"
            assert error_code(await http.put("/v1.0/card/instances", headers=h, json={
                "outTrackId": "dup"})) == "param.cardDataAndPrivateDataBothEmpty"
            assert error_code(await cards.stream("ghost", "x", "g")) == "param.stream.outTrackId"
            assert error_code(await http.put("/v1.0/card/streaming", headers=h, json={
                "outTrackId": "dup", "guid": "g", "content": "x", "isFull": True})) == "param.stream.keyEmpty"
            assert error_code(await cards.stream("dup", "", "g")) == "param.stream.contentEmpty"
            assert error_code(await cards.stream("dup", "x", "")) == "param.stream.guidEmpty"
            assert error_code(await http.put("/v1.0/card/streaming", headers=h, json={
                "outTrackId": "dup", "guid": "g", "key": "msgContent", "content": "x"})) == "param.stream.isFull"
            assert error_code(await cards.stream("dup", "x" * 1025, "big")) == "200092"
            assert error_code(await cards.stream("dup", "more", "app", isFull=False)) == "param.stream.isFull"
            assert (await cards.stream("dup", "done", "fin", isFinalize=True)).status_code == 200
            assert error_code(await cards.stream("dup", "after", "late")) == "param.stream.statusInvalid"
            assert emu.card("dup")["text"] == "done"


async def test_append_streaming_and_delivery_failures_in_200_answers() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            cards = Cards(emu, http)
            group = f"dtv1.card//IM_GROUP.{emu.state.default_group.id}"
            await cards.create_and_deliver("app", group)
            for i, piece in enumerate(["Hel", "lo", "!"]):
                await cards.stream("app", piece, f"a{i}", isFull=False)
            assert emu.card("app")["text"] == "Hello!"
            no_model = await cards.create_and_deliver("nomodel", group, imGroupOpenDeliverModel=None)
            result = no_model.json()["result"]["deliverResults"][0]
            assert no_model.status_code == 200 and result["success"] is False
            assert "imGroupOpenDeliverModel" in result["errorMsg"]
            unknown = await cards.create_and_deliver("nowhere", "dtv1.card//IM_GROUP.cidUnknown")
            assert unknown.json()["result"]["deliverResults"][0]["success"] is False
            stranger = await cards.create_and_deliver("stranger", "dtv1.card//IM_ROBOT.nobody")
            assert stranger.json()["result"]["deliverResults"][0]["success"] is False
            emu.faults.card_delivery_failures(1, error_msg="robot not in group")
            forced = await cards.create_and_deliver("forced", group)
            assert forced.json()["result"]["deliverResults"][0] == {
                "spaceType": "IM_GROUP", "spaceId": emu.state.default_group.id, "success": False,
                "carrierId": "", "errorMsg": "robot not in group"}
            assert (await cards.create_and_deliver("fine", group)).json()["result"]["deliverResults"][0]["success"]
            assert [m["outTrackId"] for m in emu.bot_messages(emu.state.default_group.id)] == ["app", "fine"]


async def test_card_clicks_over_stream_apply_answers_acked_within_two_seconds() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            cards = Cards(emu, client.http)
            await cards.create_and_deliver("btn", f"dtv1.card//IM_GROUP.{emu.state.default_group.id}",
                                           cardData={"cardParamMap": {"status": "pending"}})

            async def answer(delay: float, response: Any) -> None:
                frame = await client.receive()
                assert frame["headers"]["topic"] == CARD_CALLBACK_TOPIC
                payload = data_of(frame)
                assert payload["type"] == "actionCallback" and payload["outTrackId"] == "btn"
                assert json.loads(payload["content"]) == {"cardPrivateData": {"actionIds": ["accept"],
                                                                              "params": {"action": "accept"}}}
                assert payload["userId"] == "user0001" and payload["spaceType"] == "IM_GROUP"
                assert isinstance(payload["extension"], str)
                await trio.sleep(delay)
                await client.ack(frame, data={"response": response})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, 0.5, {"cardData": {"cardParamMap": {"status": "accepted"}},
                                                 "userPrivateData": {"cardParamMap": {"clicked": "yes"}},
                                                 "cardUpdateOptions": {"updateCardDataByKey": True}})
                result = await emu.click_card("btn", user_id="user0001", action_ids=["accept"],
                                              params={"action": "accept"})
            assert result["verdict"] == "ok" and result["applied"] is True
            card = emu.card("btn")
            assert card["cardParamMap"]["status"] == "accepted" and card["privateData"]["user0001"] == {"clicked": "yes"}

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, 2.5, {"cardData": {"cardParamMap": {"status": "too late"}}})
                late = await emu.click_card("btn", user_id="user0001", action_ids=["accept"],
                                            params={"action": "accept"})
            assert late["verdict"] == "timeout" and late["applied"] is False
            ack = await emu.wait_for_ack(late["messageId"])
            assert ack["verdict"] == "late" and emu.card("btn")["cardParamMap"]["status"] == "accepted"


async def test_card_clicks_over_http_are_signed_posts_to_the_registered_route() -> None:
    received: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def callback(request: Request) -> JSONResponse:
        received.append((dict(request.headers), await request.json()))
        return JSONResponse({"cardData": {"cardParamMap": {"status": "done over http"}}})

    app = Starlette(routes=[Route("/card-callback", callback, methods=["POST"])])
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    with trio.fail_after(VIRTUAL_BUDGET):
        async with trio.open_nursery() as nursery:
            (bound,) = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))
            async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
                cards = Cards(emu, http)
                r = await http.post("/v1.0/card/callbacks/register", headers=cards.h, json={
                    "callbackRouteKey": "route1", "callbackUrl": f"{bound}/card-callback", "apiSecret": "s3cret"})
                assert r.json()["success"] is True
                again = await http.post("/v1.0/card/callbacks/register", headers=cards.h, json={
                    "callbackRouteKey": "route1", "callbackUrl": f"{bound}/other"})
                assert error_code(again) == "param.callbackRouteKeyExist"
                await cards.create_and_deliver("httpcard", f"dtv1.card//IM_GROUP.{emu.state.default_group.id}",
                                               callbackType="HTTP", callbackRouteKey="route1")
                result = await emu.click_card("httpcard", action_ids=["ok"])
                assert result["verdict"] == "ok" and result["applied"] is True
                assert emu.card("httpcard")["cardParamMap"]["status"] == "done over http"
            nursery.cancel_scope.cancel()
    ((headers, body),) = received
    expected = base64.b64encode(hmac.new(b"s3cret", headers["x-ddpaas-signature-timestamp"].encode(),
                                         hashlib.sha256).digest()).decode()
    assert headers["x-ddpaas-signature"] == expected and body["outTrackId"] == "httpcard"


async def test_legacy_interactive_cards_are_recorded() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            h = Cards(emu, http).h
            r = await http.post("/v1.0/im/v1.0/robot/interactiveCards/send", headers=h, json={
                "cardTemplateId": "StandardCard", "cardBizId": "biz1", "robotCode": emu.settings.client_id,
                "cardData": json.dumps({"contents": [{"type": "text", "text": "v1"}]}),
                "singleChatReceiver": json.dumps({"userId": "user0001"})})
            assert r.status_code == 200 and r.json()["success"] is True
            r = await http.put("/v1.0/im/robots/interactiveCards", headers=h, json={
                "cardBizId": "biz1", "cardData": json.dumps({"contents": [{"type": "text", "text": "v2"}]})})
            assert r.json() == {"success": True, "result": True}
            single = emu.state.single_chat_of("user0001")
            assert single is not None
            (msg,) = emu.bot_messages(single.id)
            assert msg["via"] == "interactiveCard" and "v2" in msg["text"]
