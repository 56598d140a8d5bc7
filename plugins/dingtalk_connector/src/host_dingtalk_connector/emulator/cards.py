"""Interactive / AI cards (reference §7): the card store, create / deliver / update / streaming
APIs with DingTalk's validation, the AI card state machine, and user clicks (card callbacks).

State machine: ``PROCESSING`` after creation -> ``INPUTING`` on the first streaming call ->
``FINISHED`` (``isFinalize``) or ``FAILED`` (``isError``). The public AI card templates also show a
state through the string variable ``flowStatus`` ("1" processing, "2" inputing, "3" finished,
"4" executing, "5" failed) that SDKs set with ``PUT /v1.0/card/instances``; the emulator follows it
too, so both ways of driving a card end in the state a user would see.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import trio

from host.logs import logger

from .errors import ApiError, EmulatorError, NotFound
from .frames import AckRecord, FrameRecord, encode
from .gateway import CARD_CALLBACK_TOPIC
from .openapi import Call
from .state import BotMessage, Conversation, EmulatorState

if TYPE_CHECKING:
    from .server import Emulator

__all__ = ["FLOW_STATUS", "SPACE_TYPES", "TERMINAL_STATES", "Card", "CardService", "parse_open_space_id"]

FLOW_STATUS = {"1": "PROCESSING", "2": "INPUTING", "3": "FINISHED", "4": "EXECUTING", "5": "FAILED"}
TERMINAL_STATES = ("FINISHED", "FAILED")
SPACE_TYPES = ("IM_GROUP", "IM_ROBOT", "IM_SINGLE", "ONE_BOX")
_DELIVER_MODELS = {"IM_GROUP": "imGroupOpenDeliverModel", "IM_ROBOT": "imRobotOpenDeliverModel",
                   "IM_SINGLE": "imSingleOpenDeliverModel", "ONE_BOX": "oneBoxOpenDeliverModel"}
_TEXT_KEYS = ("msgContent", "content", "markdown", "text")


@dataclass
class Card:
    out_track_id: str
    template_id: str
    params: dict[str, str]
    private: dict[str, dict[str, str]]
    callback_type: str
    callback_route_key: str
    user_id_type: int
    created_ms: int
    state: str = "PROCESSING"
    spaces: list[dict[str, Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    guids: set[str] = field(default_factory=set)
    stream_key: str | None = None
    messages: list[BotMessage] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def text(self) -> str:
        """What the card shows as its main text: the streamed variable, else a known text key."""
        if self.stream_key is not None:
            return self.params.get(self.stream_key, "")
        for key in _TEXT_KEYS:
            if self.params.get(key):
                return self.params[key]
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "outTrackId": self.out_track_id, "cardTemplateId": self.template_id,
            "state": self.state, "text": self.text(), "flowStatus": self.params.get("flowStatus"),
            "cardParamMap": dict(self.params), "privateData": {k: dict(v) for k, v in self.private.items()},
            "callbackType": self.callback_type, "callbackRouteKey": self.callback_route_key,
            "userIdType": self.user_id_type, "createdAt": self.created_ms,
            "spaces": list(self.spaces), "streamingKey": self.stream_key,
            "streams": list(self.streams), "updates": list(self.updates),
            "callbacks": list(self.callbacks),
        }


def parse_open_space_id(value: Any) -> list[tuple[str, str]]:
    """``dtv1.card//IM_GROUP.cid...;IM_ROBOT.user`` -> [(space type, space id), ...]."""
    if not isinstance(value, str) or not value.startswith("dtv1.card//"):
        raise ApiError(400, "param.openSpaceIdInvalid", f"openSpaceId {value!r} 不合法")
    spaces = []
    for part in value[len("dtv1.card//"):].split(";"):
        space_type, dot, space_id = part.partition(".")
        if not dot or space_type not in SPACE_TYPES or not space_id:
            raise ApiError(400, "param.openSpaceIdInvalid", f"openSpaceId part {part!r} 不合法")
        spaces.append((space_type, space_id))
    return spaces


def _param_map(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "param.cardParamMapInvalid", f"{path} must be an object of strings")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, str):
            out[key] = item
        elif isinstance(item, bool | int | float):
            out[key] = encode(item)  # DingTalk's Map<String,String> coerces scalars
        else:
            raise ApiError(400, "param.cardParamMapInvalid",
                           f"{path}.{key} must be a string (JSON-encode objects, or use sys_full_json_obj)")
    return out


def _card_data(body: dict[str, Any]) -> dict[str, str] | None:
    data = body.get("cardData")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ApiError(400, "param.cardDataInvalid", "cardData must be an object {cardParamMap}")
    return _param_map(data.get("cardParamMap"), "cardData.cardParamMap")


def _private_data(value: Any) -> dict[str, dict[str, str]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "param.privateDataInvalid", "privateData must be {userId: {cardParamMap}}")
    return {user: _param_map(item.get("cardParamMap") if isinstance(item, dict) else item,
                             f"privateData.{user}.cardParamMap") for user, item in value.items()}


class CardService:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.state: EmulatorState = emulator.state
        self.cards: dict[str, Card] = {}
        self.callback_routes: dict[str, dict[str, str]] = {}
        self.legacy: dict[str, BotMessage] = {}

    def get(self, out_track_id: str) -> Card:
        try:
            return self.cards[out_track_id]
        except KeyError:
            raise NotFound(f"no card {out_track_id!r}") from None

    def _changed(self, card: Card) -> None:
        card.changed.set()
        card.changed = trio.Event()
        self.state.notifier.notify()

    # --- create / deliver -----------------------------------------------------------------------
    def _create(self, body: dict[str, Any]) -> Card:
        template = body.get("cardTemplateId")
        if not template:
            raise ApiError(400, "param.cardTemplateIdEmpty", "cardTemplateId不能为空")
        out_track_id = body.get("outTrackId")
        if not out_track_id or not isinstance(out_track_id, str):
            raise ApiError(400, "param.outTrackIdEmpty", "outTrackId不能为空")
        if out_track_id in self.cards:
            raise ApiError(400, "param.cardAlreadyExist", f"card {out_track_id} already exists")
        callback_type = body.get("callbackType") or "STREAM"
        if callback_type not in ("STREAM", "HTTP"):
            raise ApiError(400, "param.callbackTypeInvalid", "callbackType must be STREAM or HTTP")
        route_key = body.get("callbackRouteKey") or ""
        if callback_type == "HTTP" and not route_key:
            raise ApiError(400, "param.callbackRouteKeyEmpty", "callbackType HTTP needs callbackRouteKey")
        params = _card_data(body) or {}
        card = Card(out_track_id=out_track_id, template_id=str(template), params=params,
                    private=_private_data(body.get("privateData")) or {},
                    callback_type=callback_type, callback_route_key=str(route_key),
                    user_id_type=int(body.get("userIdType") or 1),
                    created_ms=self.state.clock.epoch_ms())
        card.state = FLOW_STATUS.get(params.get("flowStatus", ""), "PROCESSING")
        self.cards[out_track_id] = card
        return card

    def _resolve(self, card: Card, space_type: str, space_id: str) -> Conversation | None:
        if space_type == "IM_ROBOT":
            user_id = space_id
            if card.user_id_type == 2:  # unionId
                user_id = next((u.staff_id for u in self.state.users.values() if u.union_id == space_id), "")
            return self.state.single_chat_of(user_id)
        conv = self.state.conversations.get(space_id)
        if conv is None:
            return None
        if space_type == "IM_SINGLE":
            return conv if conv.type == "1" else None
        return conv if conv.type == "2" else None

    def _deliver(self, card: Card, body: dict[str, Any]) -> list[dict[str, Any]]:
        spaces = parse_open_space_id(body.get("openSpaceId"))
        results = []
        for space_type, space_id in spaces:
            result = {"spaceType": space_type, "spaceId": space_id, "success": True,
                      "carrierId": "", "errorMsg": ""}
            model = body.get(_DELIVER_MODELS[space_type])
            conv = self._resolve(card, space_type, space_id)
            forced = self.emu.faults.switches.take_card_delivery()
            if forced is not None:
                result.update(success=False, errorMsg=forced)
            elif space_type != "ONE_BOX" and not isinstance(model, dict):
                result.update(success=False, errorMsg=f"{_DELIVER_MODELS[space_type]} is required for {space_type}")
            elif conv is None:
                result.update(success=False, errorMsg=f"{space_type} space {space_id} not found")
            else:
                existing = next((s for s in card.spaces if s["spaceType"] == space_type
                                 and s["spaceId"] == space_id), None)
                if existing is not None:
                    result["carrierId"] = existing["carrierId"]
                else:
                    carrier = self.state.ids.process_query_key()
                    result["carrierId"] = carrier
                    card.spaces.append({"spaceType": space_type, "spaceId": space_id,
                                        "conversationId": conv.id, "carrierId": carrier,
                                        "deliverModel": model})
                    message = BotMessage(seq=self.state.next_seq(), conversation_id=conv.id, via="card",
                                         msgtype="card", text="", created_ms=self.state.clock.epoch_ms(),
                                         body=body, process_query_key=carrier, card=card,
                                         at=(model or {}).get("atUserIds") or {})
                    card.messages.append(message)
                    self.state.add_bot_message(message)
            results.append(result)
        self._changed(card)
        return results

    async def create_instance(self, call: Call) -> Any:
        card = self._create(call.obj())
        self._changed(card)
        return {"success": True, "result": card.out_track_id}

    async def deliver(self, call: Call) -> Any:
        body = call.obj()
        out_track_id = body.get("outTrackId")
        if not out_track_id:
            raise ApiError(400, "param.outTrackIdEmpty", "outTrackId不能为空")
        card = self.cards.get(out_track_id)
        if card is None:
            raise ApiError(400, "param.cardNotExist", "card is not exist")
        if body.get("userIdType") is not None:
            card.user_id_type = int(body["userIdType"])
        return {"success": True, "result": self._deliver(card, body)}

    async def create_and_deliver(self, call: Call) -> Any:
        body = call.obj()
        parse_open_space_id(body.get("openSpaceId"))  # validate before creating anything
        card = self._create(body)
        return {"success": True, "result": {"outTrackId": card.out_track_id,
                                            "deliverResults": self._deliver(card, body)}}

    # --- updates --------------------------------------------------------------------------------
    async def update_instance(self, call: Call) -> Any:
        body = call.obj()
        out_track_id = body.get("outTrackId")
        if not out_track_id:
            raise ApiError(400, "param.outTrackIdEmpty", "outTrackId不能为空")
        card = self.cards.get(out_track_id)
        if card is None:
            raise ApiError(400, "param.cardNotExist", "card is not exist")
        params = _card_data(body)
        private = _private_data(body.get("privateData"))
        if not params and not private:
            raise ApiError(400, "param.cardDataAndPrivateDataBothEmpty", "cardData和privateData不能同时为空")
        options = body.get("cardUpdateOptions") or {}
        self._apply(card, params, private, by_key=bool(options.get("updateCardDataByKey")),
                    private_by_key=bool(options.get("updatePrivateDataByKey")))
        card.updates.append({"at": self.state.clock.epoch_ms(), "cardParamMap": params,
                             "privateData": private, "cardUpdateOptions": options})
        self._changed(card)
        return {"success": True, "result": True}

    def _apply(self, card: Card, params: dict[str, str] | None, private: dict[str, dict[str, str]] | None,
               *, by_key: bool, private_by_key: bool) -> None:
        if params:
            card.params = {**card.params, **params} if by_key else dict(params)
            status = params.get("flowStatus")
            if status in FLOW_STATUS:
                card.state = FLOW_STATUS[status]
        if private:
            for user, values in private.items():
                card.private[user] = {**card.private.get(user, {}), **values} if private_by_key else values

    async def streaming(self, call: Call) -> Any:
        body = call.obj()
        settings = self.state.settings
        card = self.cards.get(body.get("outTrackId") or "")
        if card is None:
            raise ApiError(400, "param.stream.outTrackId", "card is not exist")
        key, content, guid = body.get("key"), body.get("content"), body.get("guid")
        if not key or not isinstance(key, str):
            raise ApiError(400, "param.stream.keyEmpty", "key不能为空")
        if not isinstance(content, str) or not content:
            raise ApiError(400, "param.stream.contentEmpty", "content不能为空")
        if not guid or not isinstance(guid, str):
            raise ApiError(400, "param.stream.guidEmpty", "guid不能为空")
        is_full = body.get("isFull")
        if is_full is None and settings.streaming_require_is_full:
            raise ApiError(400, "param.stream.isFull", "isFull is null")
        if guid in card.guids:
            return {"success": True, "result": True}  # idempotent: the same guid is a no-op
        if card.state in TERMINAL_STATES and settings.streaming_reject_after_terminal:
            raise ApiError(400, "param.stream.statusInvalid",
                           f"card is already {card.state}; streaming updates are not accepted")
        size = len(content.encode())
        if settings.streaming_max_content_bytes is not None and size > settings.streaming_max_content_bytes:
            raise ApiError(400, "200092", "content is too large")
        if not is_full and key in settings.markdown_keys and settings.streaming_reject_append_on_markdown:
            raise ApiError(400, "param.stream.isFull", f"markdown variable {key!r} must be updated with isFull=true")
        card.guids.add(guid)
        card.stream_key = key
        card.params[key] = content if is_full else card.params.get(key, "") + content
        if body.get("isError"):
            card.state = "FAILED"
        elif body.get("isFinalize"):
            card.state = "FINISHED"
        else:
            card.state = "INPUTING"
        card.streams.append({"at": self.state.clock.epoch_ms(), "guid": guid, "key": key,
                             "content": content, "isFull": bool(is_full),
                             "isFinalize": bool(body.get("isFinalize")),
                             "isError": bool(body.get("isError")), "state": card.state})
        self._changed(card)
        return {"success": True, "result": True}

    async def register_callback(self, call: Call) -> Any:
        body = call.obj()
        key, url = body.get("callbackRouteKey"), body.get("callbackUrl")
        if not key or not url:
            raise ApiError(400, "param.callbackRouteKeyOrUrlEmpty", "callbackRouteKey和callbackUrl不能为空")
        if key in self.callback_routes and not body.get("forceUpdate"):
            raise ApiError(400, "param.callbackRouteKeyExist", "callbackRouteKey already registered")
        secret = body.get("apiSecret") or self.state.ids.token()
        self.callback_routes[key] = {"callbackUrl": url, "apiSecret": secret}
        return {"success": True, "result": {"callbackUrl": url, "apiSecret": secret}}

    # --- legacy interactive cards ("normal edition", §6.6) ----------------------------------------
    async def legacy_send(self, call: Call) -> Any:
        body = call.obj()
        biz_id = body.get("cardBizId")
        if not biz_id or not body.get("cardTemplateId") or not isinstance(body.get("cardData"), str):
            raise ApiError(400, "param.invalid", "cardTemplateId, cardBizId and cardData (JSON string) are required")
        conv: Conversation | None
        if body.get("openConversationId"):
            conv = self.state.conversations.get(body["openConversationId"])
        else:
            try:
                receiver = msgspec.json.decode(body.get("singleChatReceiver") or "{}")
            except msgspec.DecodeError:
                receiver = {}
            conv = self.state.single_chat_of(str(receiver.get("userId", "")))
        if conv is None:
            raise ApiError(400, "param.receiverInvalid", "openConversationId or singleChatReceiver not found")
        pqk = self.state.ids.process_query_key()
        message = self.state.add_bot_message(BotMessage(
            seq=self.state.next_seq(), conversation_id=conv.id, via="interactiveCard",
            msgtype="interactiveCard", text=body["cardData"], created_ms=self.state.clock.epoch_ms(),
            body=body, process_query_key=pqk))
        self.legacy[biz_id] = message
        return {"success": True, "result": {"processQueryKey": pqk}}

    async def legacy_update(self, call: Call) -> Any:
        body = call.obj()
        message = self.legacy.get(body.get("cardBizId") or "")
        if message is None:
            raise ApiError(400, "param.cardNotExist", "card is not exist")
        if not isinstance(body.get("cardData"), str):
            raise ApiError(400, "param.invalid", "cardData must be a JSON string")
        message.text = body["cardData"]
        message.body = {**message.body, "cardData": body["cardData"]}
        self.state.notifier.notify()
        return {"success": True, "result": True}

    # --- user actions ---------------------------------------------------------------------------
    async def click(self, out_track_id: str, *, user_id: str | None = None,
                    action_ids: list[str] | None = None, params: dict[str, Any] | None = None,
                    wait: bool = True) -> dict[str, Any]:
        """A user clicks a "callback" button on a card; returns what happened."""
        card = self.get(out_track_id)
        settings = self.state.settings
        if not card.spaces:
            raise EmulatorError(f"card {out_track_id} was never delivered, nobody can click it")
        space = card.spaces[0]
        conv = self.state.conversation(space["conversationId"])
        user = self.state.user(user_id or (conv.members[0] if conv.members else next(iter(self.state.users))))
        uid = user.union_id if card.user_id_type == 2 else user.staff_id
        content = {"cardPrivateData": {"actionIds": action_ids or ["btn"], "params": params or {}}}
        payload = {"type": "actionCallback", "outTrackId": card.out_track_id, "corpId": settings.corp_id,
                   "userId": uid, "userIdType": card.user_id_type, "spaceType": space["spaceType"],
                   "spaceId": space["spaceId"], "extension": "{}", "content": encode(content)}
        entry: dict[str, Any] = {"at": self.state.clock.epoch_ms(), "userId": uid,
                                 "actionIds": content["cardPrivateData"]["actionIds"],
                                 "params": content["cardPrivateData"]["params"],
                                 "via": card.callback_type, "messageId": None, "verdict": None,
                                 "applied": False}
        card.callbacks.append(entry)
        if card.callback_type == "HTTP":
            await self._http_callback(card, payload, entry)
        else:
            frame = self.emu.gateway.deliver("CALLBACK", CARD_CALLBACK_TOPIC, "card_callback", payload,
                                             delivery_key=card.out_track_id)
            if frame is None:
                entry["verdict"] = "undelivered"
            else:
                entry["messageId"] = frame.message_id
                if wait:
                    with trio.move_on_after(settings.card_callback_timeout):
                        await frame.acked.wait()
                    ack = frame.ack
                    entry["verdict"] = "timeout" if ack is None else ack.verdict
        self._changed(card)
        return {**entry, "delivered": entry["verdict"] != "undelivered", "card": card.to_dict()}

    def on_card_ack(self, frame: FrameRecord, ack: AckRecord) -> None:
        """Gateway hook: an in-time card-callback ACK; apply its ``response`` to the card."""
        card = self.cards.get(frame.delivery_key)
        if card is None:
            return
        entry = next((e for e in card.callbacks if e["messageId"] == frame.message_id), None)
        response = ack.parsed.get("response") if isinstance(ack.parsed, dict) else None
        applied = self._apply_callback_answer(card, response, frame.payload.get("userId", ""))
        if entry is not None:
            entry["applied"], entry["verdict"] = applied, ack.verdict
        self._changed(card)

    def _apply_callback_answer(self, card: Card, response: Any, user_id: str) -> bool:
        if isinstance(response, str):
            try:
                response = msgspec.json.decode(response)
            except msgspec.DecodeError:
                return False
        if not isinstance(response, dict):
            return False
        options = response.get("cardUpdateOptions") or {}
        try:
            params = _card_data(response)
            private_map = response.get("userPrivateData")
            private = ({user_id: _param_map(private_map.get("cardParamMap"), "userPrivateData.cardParamMap")}
                       if isinstance(private_map, dict) else _private_data(response.get("privateData")))
        except ApiError as exc:
            logger.info("emulator: card callback answer ignored: {}", exc.message)
            return False
        if not params and not private:
            return False
        self._apply(card, params, private, by_key=bool(options.get("updateCardDataByKey")),
                    private_by_key=bool(options.get("updatePrivateDataByKey")))
        return True

    async def _http_callback(self, card: Card, payload: dict[str, Any], entry: dict[str, Any]) -> None:
        route = self.callback_routes.get(card.callback_route_key)
        if route is None:
            entry["verdict"] = "undelivered"
            return
        timestamp = str(self.state.clock.epoch_ms())
        signature = base64.b64encode(hmac.new(route["apiSecret"].encode(), timestamp.encode(),
                                              hashlib.sha256).digest()).decode()
        headers = {"x-ddpaas-signature-timestamp": timestamp, "x-ddpaas-signature": signature}
        try:
            async with httpx.AsyncClient(timeout=self.state.settings.card_callback_timeout) as client:
                response = await client.post(route["callbackUrl"], json=payload, headers=headers)
        except httpx.HTTPError as exc:
            entry["verdict"] = "timeout" if isinstance(exc, httpx.TimeoutException) else "error"
            return
        entry["verdict"] = "ok" if response.status_code == 200 else "error"
        if response.status_code == 200:
            try:
                answer = response.json()
            except ValueError:
                return
            entry["applied"] = self._apply_callback_answer(card, answer, payload["userId"])
