"""The control API under ``/_emulator/``: everything a test, the demo or the chat page needs, as
HTTP + JSON (the same operations as the ``Emulator`` methods). Errors answer
``{"error": "<what is wrong>"}`` with 400 (bad input), 404 (unknown id) or 409 (no connection).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .errors import EmulatorError
from .settings import EmulatorSettings

if TYPE_CHECKING:
    from .server import Emulator

__all__ = ["FIXED_SETTINGS", "ControlApi"]

#: Settings that cannot change while the emulator runs (ports, credentials, identities).
FIXED_SETTINGS = frozenset({"host", "port", "gateway_port", "webhook_port", "client_id", "client_secret",
                            "robot_code", "corp_id", "unified_app_id", "random_seed",
                            "max_inbound_message_bytes"})

_MESSAGE_KEYS = {
    "text": "text", "msgtype": "msgtype",
    "conversation_type": "conversation_type", "conversationType": "conversation_type",
    "sender_staff_id": "sender_staff_id", "senderStaffId": "sender_staff_id",
    "sender_nick": "sender_nick", "senderNick": "sender_nick",
    "conversation_id": "conversation_id", "conversationId": "conversation_id",
    "conversation_title": "conversation_title", "conversationTitle": "conversation_title",
    "at_bot": "at_bot", "atBot": "at_bot", "at_users": "at_users", "atUsers": "at_users",
    "content": "content", "rich_text": "rich_text", "richText": "rich_text", "file": "file",
    "topic": "topic", "fields": "fields",
}
_TYPES: dict[str, type | tuple[type, ...]] = {
    "text": str, "msgtype": str, "conversation_type": str, "sender_staff_id": str, "sender_nick": str,
    "conversation_id": str, "conversation_title": str, "at_bot": bool, "at_users": list,
    "content": dict, "rich_text": list, "file": dict, "topic": str, "fields": dict,
}

Endpoint = Callable[[Request], Awaitable[Any]]


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise EmulatorError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EmulatorError("request body must be a JSON object")
    return value


def _opt(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EmulatorError(f"{key!r} must be {names}, got {type(value).__name__}")
    if kind is int and isinstance(value, bool):
        raise EmulatorError(f"{key!r} must be an integer")
    return value


class ControlApi:
    def __init__(self, emu: Emulator) -> None:
        self.emu = emu

    def routes(self) -> list[BaseRoute]:
        e = self.emu
        r = self._route
        return [
            r("GET", "/_emulator", self.info),
            r("GET", "/_emulator/", self.info),
            r("GET", "/_emulator/settings", lambda q: _json(e.settings.public_dict())),
            r("PATCH", "/_emulator/settings", self.patch_settings),
            r("POST", "/_emulator/messages", self.post_message),
            r("POST", "/_emulator/events", self.post_event),
            r("GET", "/_emulator/events", lambda q: _json(e.events)),
            r("POST", "/_emulator/callbacks", self.post_callback),
            r("POST", "/_emulator/files", self.post_file),
            r("GET", "/_emulator/files", lambda q: _json(e.files())),
            r("GET", "/_emulator/conversations", lambda q: _json(e.conversations())),
            # Conversation ids and msgIds are base64-like and may contain "/": ":path" keeps them whole.
            r("GET", "/_emulator/conversations/{cid:path}/messages",
              lambda q: _json(e.bot_messages(q.path_params["cid"]))),
            r("GET", "/_emulator/conversations/{cid:path}/timeline",
              lambda q: _json(e.timeline(q.path_params["cid"]))),
            r("GET", "/_emulator/conversations/{cid:path}",
              lambda q: _json(e.state.conversation(q.path_params["cid"]).summary())),
            r("GET", "/_emulator/connections",
              lambda q: _json(e.connections(with_frames=q.query_params.get("frames", "1") != "0"))),
            r("GET", "/_emulator/connections/{id}", lambda q: _json(e.connection(q.path_params["id"]))),
            r("POST", "/_emulator/connections/{id}/ping", self.ping),
            r("POST", "/_emulator/connections/{id}/disconnect", self.disconnect),
            r("POST", "/_emulator/ping", self.ping),
            r("POST", "/_emulator/disconnect", self.disconnect),
            r("GET", "/_emulator/frames/{mid}", lambda q: _json(e.frame(q.path_params["mid"]))),
            r("GET", "/_emulator/deliveries/{key:path}", lambda q: _json(e.deliveries(q.path_params["key"]))),
            r("GET", "/_emulator/registrations", lambda q: _json(e.registrations())),
            r("GET", "/_emulator/handshakes", lambda q: _json(e.rejected_handshakes())),
            r("GET", "/_emulator/calls", lambda q: _json(e.calls(q.query_params.get("api")))),
            r("GET", "/_emulator/cards", lambda q: _json(e.all_cards())),
            r("POST", "/_emulator/cards/{id:path}/click", self.click_card),
            r("GET", "/_emulator/cards/{id:path}", lambda q: _json(e.card(q.path_params["id"]))),
            r("GET", "/_emulator/faults", lambda q: _json(e.faults.to_dict())),
            r("DELETE", "/_emulator/faults", self.reset_faults),
            r("POST", "/_emulator/faults/registration", self.fault_registration),
            r("DELETE", "/_emulator/faults/registration", self.clear_registration),
            r("POST", "/_emulator/faults/zombie", self.fault_zombie),
            r("POST", "/_emulator/faults/drop", self.fault_drop),
            r("POST", "/_emulator/faults/close", self.fault_close),
            r("POST", "/_emulator/faults/malformed", self.fault_malformed),
            r("POST", "/_emulator/faults/oversized", self.fault_oversized),
            r("POST", "/_emulator/faults/duplicates", self.fault_duplicates),
            r("POST", "/_emulator/faults/lost_acks", self.fault_lost_acks),
            r("POST", "/_emulator/faults/qps", self.fault_qps),
            r("POST", "/_emulator/faults/card-delivery", self.fault_card_delivery),
            r("POST", "/_emulator/faults/downloads", self.fault_downloads),
            r("POST", "/_emulator/faults/expire-sessions", self.fault_expire_sessions),
            r("POST", "/_emulator/faults/expire-tokens",
              lambda q: _json({"expired": e.faults.expire_tokens()})),
            r("POST", "/_emulator/faults/expire-tickets",
              lambda q: _json({"expired": e.faults.expire_tickets()})),
            r("POST", "/_emulator/faults/clock", self.fault_clock),
            r("GET", "/_emulator/ui", self.ui_state),
            Route("/_emulator/{rest:path}", self.unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]

    async def unknown(self, request: Request) -> Response:
        return _json({"error": f"no control endpoint {request.method} {request.url.path} "
                               "(see the README's control API table)"}, 404)

    def _route(self, method: str, path: str, handler: Callable[[Request], Any]) -> Route:
        async def endpoint(request: Request) -> Response:
            await request.body()  # consumed (and cached) even by handlers that ignore it
            try:
                result = handler(request)
                if isinstance(result, Awaitable):
                    result = await result
                assert isinstance(result, Response)
                return result
            except EmulatorError as exc:
                return _json({"error": str(exc)}, exc.status)

        return Route(path, endpoint, methods=[method])

    # --- general ------------------------------------------------------------------------------
    async def info(self, request: Request) -> Response:
        e = self.emu
        return _json({
            "baseUrl": e.base_url, "gatewayUrl": e.gateway_url, "clientId": e.settings.client_id,
            "robotCode": e.settings.effective_robot_code, "corpId": e.settings.corp_id,
            "defaultGroup": e.state.default_group.id,
            "openConnections": len(e.gateway.open_connections()),
            "connections": len(e.gateway.connections), "conversations": len(e.state.conversations),
            "cards": len(e.cards.cards), "calls": len(e.state.calls),
        })

    async def patch_settings(self, request: Request) -> Response:
        changes = await _body(request)
        fixed = sorted(set(changes) & FIXED_SETTINGS)
        if fixed:
            raise EmulatorError(f"cannot change {', '.join(fixed)} while the emulator runs")
        unknown = sorted(set(changes) - EmulatorSettings.field_names())
        if unknown:
            raise EmulatorError(f"unknown settings: {', '.join(unknown)}")
        if isinstance(changes.get("markdown_keys"), list):
            changes["markdown_keys"] = tuple(changes["markdown_keys"])
        try:
            candidate = self.emu.settings.replace(**changes)
        except (TypeError, ValueError) as exc:
            raise EmulatorError(str(exc)) from None
        for f in dataclasses.fields(candidate):
            if f.name in changes:
                setattr(self.emu.settings, f.name, getattr(candidate, f.name))
        return _json(self.emu.settings.public_dict())

    # --- acting as users ------------------------------------------------------------------------
    @staticmethod
    def _message_kwargs(body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(k for k in body if k not in _MESSAGE_KEYS)
        if unknown:
            raise EmulatorError(f"unknown fields {', '.join(unknown)}; known: "
                                "text, msgtype, conversation_type, sender_staff_id, sender_nick, "
                                "conversation_id, conversation_title, at_bot, at_users, content, "
                                "rich_text, file, topic, fields")
        kwargs: dict[str, Any] = {}
        for key, value in body.items():
            name = _MESSAGE_KEYS[key]
            kwargs[name] = _opt({name: value}, name, _TYPES[name])
        fields = kwargs.pop("fields", None) or {}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return {**kwargs, **fields}

    async def post_message(self, request: Request) -> Response:
        body = await _body(request)
        if "text" not in body and body.get("msgtype", "text") == "text":
            raise EmulatorError("'text' is required for a text message")
        return _json(await self.emu.send_user_message(**self._message_kwargs(body)))

    async def post_event(self, request: Request) -> Response:
        body = await _body(request)
        event_type = _opt(body, "eventType", str) or _opt(body, "event_type", str)
        if not event_type:
            raise EmulatorError("'eventType' is required, e.g. chat_update_title")
        return _json(await self.emu.send_event(
            event_type, _opt(body, "data", dict) or _opt(body, "payload", dict) or {},
            event_id=_opt(body, "eventId", str), corp_id=_opt(body, "eventCorpId", str)))

    async def post_callback(self, request: Request) -> Response:
        body = await _body(request)
        topic = _opt(body, "topic", str)
        if not topic:
            raise EmulatorError("'topic' is required")
        return _json(await self.emu.send_callback(topic, _opt(body, "data", dict) or {}))

    async def post_file(self, request: Request) -> Response:
        body = await _body(request)
        content = _opt(body, "content", str) or ""
        try:
            data = base64.b64decode(content, validate=True)
        except ValueError:
            raise EmulatorError("'content' must be base64") from None
        return _json(self.emu.add_file(data, _opt(body, "name", str) or "file.bin",
                                       _opt(body, "mime", str) or "application/octet-stream"))

    async def click_card(self, request: Request) -> Response:
        body = await _body(request)
        return _json(await self.emu.click_card(
            request.path_params["id"], user_id=_opt(body, "userId", str),
            action_ids=_opt(body, "actionIds", list), params=_opt(body, "params", dict),
            wait=_opt(body, "wait", bool, True)))

    async def ping(self, request: Request) -> Response:
        return _json(await self.emu.ping(request.path_params.get("id")))

    async def disconnect(self, request: Request) -> Response:
        body = await _body(request)
        return _json(await self.emu.disconnect(request.path_params.get("id") or _opt(body, "connectionId", str),
                                               _opt(body, "reason", str) or "connection is expired"))

    # --- faults ---------------------------------------------------------------------------------
    async def reset_faults(self, request: Request) -> Response:
        self.emu.faults.reset()
        return _json(self.emu.faults.to_dict())

    async def fault_registration(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.refuse_registration(_opt(body, "mode", str) or "auth",
                                            status=_opt(body, "status", int), count=_opt(body, "count", int))
        return _json(self.emu.faults.to_dict())

    async def clear_registration(self, request: Request) -> Response:
        self.emu.faults.clear_registration()
        return _json(self.emu.faults.to_dict())

    async def fault_zombie(self, request: Request) -> Response:
        body = await _body(request)
        return _json({"connections": self.emu.faults.zombie(_opt(body, "connectionId", str),
                                                            pongs=bool(_opt(body, "pongs", bool, False)))})

    async def fault_drop(self, request: Request) -> Response:
        body = await _body(request)
        return _json({"connections": await self.emu.faults.drop(_opt(body, "connectionId", str))})

    async def fault_close(self, request: Request) -> Response:
        body = await _body(request)
        return _json({"connections": await self.emu.faults.close(
            _opt(body, "connectionId", str), _opt(body, "code", int, 1000), _opt(body, "reason", str, ""))})

    async def fault_malformed(self, request: Request) -> Response:
        body = await _body(request)
        return _json(await self.emu.faults.malformed(_opt(body, "connectionId", str),
                                                     _opt(body, "kind", str, "not_json")))

    async def fault_oversized(self, request: Request) -> Response:
        body = await _body(request)
        size = _opt(body, "size", int)
        kwargs = self._message_kwargs({k: v for k, v in body.items() if k != "size"})
        return _json(await self.emu.faults.oversized(size, **kwargs))

    async def fault_lost_acks(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.lose_acks(_opt(body, "count", int, 1))
        return _json(self.emu.faults.to_dict())

    async def fault_duplicates(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.duplicates(_opt(body, "count", int, 1),
                                   same_message_id=_opt(body, "sameMessageId", bool, True))
        return _json(self.emu.faults.to_dict())

    async def fault_qps(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.qps_errors(_opt(body, "count", int, 1), api=_opt(body, "api", str))
        return _json(self.emu.faults.to_dict())

    async def fault_card_delivery(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.card_delivery_failures(_opt(body, "count", int, 1),
                                               error_msg=_opt(body, "errorMsg", str, "deliver failed"))
        return _json(self.emu.faults.to_dict())

    async def fault_downloads(self, request: Request) -> Response:
        body = await _body(request)
        self.emu.faults.download_failures(_opt(body, "count", int, 1))
        return _json(self.emu.faults.to_dict())

    async def fault_expire_sessions(self, request: Request) -> Response:
        body = await _body(request)
        return _json({"expired": self.emu.faults.expire_sessions(_opt(body, "conversationId", str))})

    async def fault_clock(self, request: Request) -> Response:
        body = await _body(request)
        advance = _opt(body, "advance", (int, float))
        if advance is None or advance < 0:
            raise EmulatorError("'advance' (seconds, >= 0) is required")
        return _json({"offset": self.emu.faults.advance_clock(float(advance))})

    # --- the chat page --------------------------------------------------------------------------
    async def ui_state(self, request: Request) -> Response:
        e = self.emu
        cid = request.query_params.get("conversationId", "")
        conv = e.state.conversations.get(cid)
        return _json({
            "online": len(e.gateway.open_connections()),
            "botName": e.settings.bot_name,
            "defaultGroup": e.state.default_group.id,
            "timeline": [] if conv is None else [m.to_dict() for m in conv.timeline],
        })
