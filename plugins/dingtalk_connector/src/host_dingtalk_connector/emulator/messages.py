"""Inbound bot messages: the ``data`` of a ``/v1.0/im/bot/messages/get`` CALLBACK (reference §4).

JSON types follow what Go/Java unmarshal into: ``createAt`` and ``sessionWebhookExpiredTime`` are
numbers, ``conversationType`` is the string "1"/"2", ``isAdmin``/``isInAtList`` are booleans.
"""

from __future__ import annotations

import base64
from typing import Any

from .errors import EmulatorError
from .media import sample_file
from .state import Conversation, EmulatorState, Session, StoredFile, User

__all__ = ["MSGTYPES", "build_message", "decode_file_spec"]

MSGTYPES = ("text", "picture", "richText", "audio", "video", "file", "unknownMsgType")
#: DingTalk delivers these only in a person-to-robot 1:1 chat.
ONE_TO_ONE_ONLY = ("audio", "video", "file")
UNKNOWN_TEXT = "用户发送了一条消息，机器人暂不支持接收。"


def decode_file_spec(spec: Any) -> tuple[bytes, str, str] | None:
    """``{"name", "content" (bytes or base64 str), "mime"}`` -> (content, name, mime)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise EmulatorError("file must be an object {name, content (base64), mime}")
    content = spec.get("content", b"")
    if isinstance(content, str):
        try:
            content = base64.b64decode(content, validate=True)
        except ValueError as exc:
            raise EmulatorError(f"file.content is not valid base64: {exc}") from None
    if not isinstance(content, bytes):
        raise EmulatorError("file.content must be bytes or a base64 string")
    return content, str(spec.get("name") or "file.bin"), str(spec.get("mime") or "application/octet-stream")


def _attach(state: EmulatorState, msgtype: str, file: tuple[bytes, str, str] | None) -> StoredFile:
    content, name, mime = file or sample_file(msgtype)
    return state.add_file(content, name, mime, kind=msgtype)


def build_message(state: EmulatorState, *, conversation: Conversation, sender: User,
                  session: Session, msg_id: str, created_ms: int, msgtype: str, text: str,
                  at_bot: bool, at_users: list[str], content: dict[str, Any] | None,
                  rich_text: list[dict[str, Any]] | None, file: tuple[bytes, str, str] | None,
                  fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The payload dict and the plain text a person would read in it."""
    settings = state.settings
    group = conversation.type == "2"
    if group and msgtype in ONE_TO_ONE_ONLY:
        raise EmulatorError(f"DingTalk does not deliver {msgtype} messages in group chats "
                            "(only in a 1:1 chat with the robot)")
    payload: dict[str, Any] = {
        "conversationId": conversation.id,
        "conversationType": conversation.type,
    }
    if group:
        payload["conversationTitle"] = conversation.title
        at_list = [{"dingtalkId": state.chatbot_user_id}] if at_bot else []
        for staff_id in at_users:
            mentioned = state.user(staff_id)
            at_list.append({"dingtalkId": mentioned.sender_id, "staffId": mentioned.staff_id})
        payload["atUsers"] = at_list
    payload.update({
        "chatbotCorpId": settings.corp_id,
        "chatbotUserId": state.chatbot_user_id,
        "msgId": msg_id,
        "senderNick": sender.nick,
        "isAdmin": sender.is_admin,
        "senderStaffId": sender.staff_id,
        "sessionWebhookExpiredTime": created_ms + int(settings.session_webhook_ttl * 1000),
        "createAt": created_ms,
        "senderCorpId": settings.corp_id,
        "senderPlatform": sender.platform,
        "senderId": sender.sender_id,
        "sessionWebhook": state.session_url(session),
        "robotCode": settings.effective_robot_code,
        "msgtype": msgtype,
        "openThreadId": conversation.id,
    })
    if group:
        payload["isInAtList"] = at_bot
    readable = text
    if msgtype == "text":
        # In groups DingTalk strips the "@Bot" mention and leaves the space that followed it.
        payload["text"] = {"content": (" " + text) if group and at_bot else text}
    elif msgtype == "picture":
        stored = _attach(state, msgtype, file)
        payload["content"] = {"pictureDownloadCode": state.ids.download_code(),
                              "downloadCode": stored.download_code}
        readable = readable or "[picture]"
    elif msgtype == "richText":
        segments = rich_text if rich_text is not None else [{"text": text or "see the picture:"},
                                                            {"type": "picture"}]
        out = []
        for segment in segments:
            if not isinstance(segment, dict):
                raise EmulatorError("rich_text items must be objects like {'text': ...} or {'type': 'picture'}")
            if segment.get("type") == "picture" and "downloadCode" not in segment:
                stored = _attach(state, "picture", file)
                segment = {"pictureDownloadCode": state.ids.download_code(),
                           "downloadCode": stored.download_code, "type": "picture"}
            out.append(segment)
        payload["content"] = {"richText": out}
        readable = "".join(s.get("text", "[picture]") for s in out)
    elif msgtype == "audio":
        stored = _attach(state, msgtype, file)
        payload["content"] = {"duration": 4000, "downloadCode": stored.download_code,
                              "recognition": text}
    elif msgtype == "video":
        stored = _attach(state, msgtype, file)
        payload["content"] = {"duration": 4000, "videoType": "mp4", "downloadCode": stored.download_code}
        readable = readable or "[video]"
    elif msgtype == "file":
        stored = _attach(state, msgtype, file)
        payload["content"] = {"spaceId": "22300001", "fileName": stored.name,
                              "downloadCode": stored.download_code, "fileId": "117" + stored.id[:6]}
        readable = readable or f"[file] {stored.name}"
    elif msgtype == "unknownMsgType":
        payload["content"] = {"unknownMsgType": UNKNOWN_TEXT}
        readable = readable or UNKNOWN_TEXT
    elif content is None:
        raise EmulatorError(f"msgtype {msgtype!r} needs an explicit content object "
                            f"(built-in types: {', '.join(MSGTYPES)})")
    if content is not None:
        payload["content"] = {**payload.get("content", {}), **content}
    for key, value in fields.items():
        if value is None:
            payload.pop(key, None)  # e.g. senderStaffId=None for an external user
        else:
            payload[key] = value
    return payload, readable
