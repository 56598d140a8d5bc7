"""``POST /robot/sendBySession?session=...``: the session webhook of an inbound bot message (§6.1).

No token: the ``session`` query parameter is the credential, valid until the message's
``sessionWebhookExpiredTime``. Answers are HTTP 200 with ``{"errcode", "errmsg"}``.
Accepted msgtypes: text, markdown, actionCard (single button or ``btns``), link, feedCard.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import OapiError
from .openapi import Call
from .state import BotMessage, EmulatorState

__all__ = ["WEBHOOK_MSGTYPES", "SessionWebhook", "validate_webhook_body"]

WEBHOOK_MSGTYPES = ("text", "markdown", "actionCard", "link", "feedCard")


def _need(obj: Any, path: str, *fields: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise OapiError(40035, f"缺少参数 {path} (must be an object)")
    for name in fields:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise OapiError(40035, f"缺少参数 {path}.{name}")
    return obj


def validate_webhook_body(body: Any) -> tuple[str, str, str, dict[str, Any]]:
    """Check a webhook message body; returns ``(msgtype, title, readable text, at)``."""
    if not isinstance(body, dict):
        raise OapiError(40035, "缺少参数 json")
    msgtype = body.get("msgtype")
    if msgtype not in WEBHOOK_MSGTYPES:
        raise OapiError(400105, f"不支持的消息类型 {msgtype!r}: use one of {', '.join(WEBHOOK_MSGTYPES)}")
    title = ""
    if msgtype == "text":
        text = _need(body.get("text"), "text", "content")["content"]
    elif msgtype == "markdown":
        md = _need(body.get("markdown"), "markdown", "title", "text")
        title, text = md["title"], md["text"]
    elif msgtype == "actionCard":
        card = _need(body.get("actionCard"), "actionCard", "title", "text")
        title, text = card["title"], card["text"]
        btns = card.get("btns")
        if btns is not None:
            if not isinstance(btns, list) or not btns:
                raise OapiError(40035, "缺少参数 actionCard.btns (non-empty list)")
            for i, btn in enumerate(btns):
                _need(btn, f"actionCard.btns[{i}]", "title", "actionURL")
        else:
            _need(card, "actionCard", "singleTitle", "singleURL")
    elif msgtype == "link":
        link = _need(body.get("link"), "link", "title", "text", "messageUrl")
        title, text = link["title"], link["text"]
    else:
        feed = body.get("feedCard")
        links = feed.get("links") if isinstance(feed, dict) else None
        if not isinstance(links, list) or not links:
            raise OapiError(40035, "缺少参数 feedCard.links")
        for i, item in enumerate(links):
            _need(item, f"feedCard.links[{i}]", "title", "messageURL", "picURL")
        text = "\n".join(item["title"] for item in links)
    at = body.get("at") or {}
    if not isinstance(at, dict):
        raise OapiError(40035, "at must be an object {atUserIds, atMobiles, isAtAll}")
    for key in ("atUserIds", "atMobiles"):
        value = at.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise OapiError(40035, f"at.{key} must be a list of strings")
    if "isAtAll" in at and not isinstance(at["isAtAll"], bool):
        raise OapiError(40035, "at.isAtAll must be a boolean")
    if msgtype in ("link", "feedCard"):
        at = {}  # these types cannot @ anyone; DingTalk ignores it
    return msgtype, title, text, at


class SessionWebhook:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def send_by_session(self, call: Call) -> Any:
        state = self.state
        content_type = call.request.headers.get("content-type", "")
        if "application/json" not in content_type.lower():
            raise OapiError(43004, "无效的HTTP HEADER Content-Type (use application/json)")
        session = state.sessions.get(call.request.query_params.get("session", ""))
        if session is None:
            raise OapiError(state.settings.session_unknown_errcode, "session不存在")
        if session.expires_at <= state.clock.now():
            raise OapiError(state.settings.session_expired_errcode, "session已过期")
        raw = await call.request.body()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise OapiError(40035, "缺少参数 json (the body is not valid JSON)") from None
        call.record.request = body
        msgtype, title, text, at = validate_webhook_body(body)
        state.add_bot_message(BotMessage(
            seq=state.next_seq(), conversation_id=session.conversation_id, via="sessionWebhook",
            msgtype=msgtype, text=text, title=title, created_ms=state.clock.epoch_ms(),
            body=body, at=at))
        return {"errcode": 0, "errmsg": "ok"}
