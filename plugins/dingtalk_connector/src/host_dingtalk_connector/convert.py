"""DingTalk payloads -> host ``Message`` / ``Event``.

Bot messages (reference dingtalk-protocol.md section 4) become a ``Message`` with:

* ``parts`` by ``msgtype``: ``text`` -> ``TextPart``; ``picture`` -> ``ImagePart``; ``richText`` ->
  ``RichTextPart`` (text and pictures in order); ``audio`` -> ``AudioPart`` (with DingTalk's speech
  recognition); ``video`` -> ``VideoPart``; ``file`` -> ``FilePart``. Media carry the
  ``downloadCode`` (fetching is issue 5). ``unknownMsgType``, types we do not know and payloads
  without content (quota exhausted) give no parts, a warning, and the payload in ``raw``.
* ``conversation``: ``conversationId``, ``single`` ("1") or ``group`` ("2"), group title.
* ``sender``: ``platform_ids`` ``staffId`` / ``unionId`` / ``senderId`` (whichever are present),
  nick, admin flag, corp; ``identity`` from the identity resolver.
* ``mentions`` from ``atUsers`` (``is_bot`` for the robot itself) and ``mentions_bot`` from
  ``isInAtList``.
* ``raw``: the whole decoded payload. ``context``: what answering needs (session webhook and its
  expiry, robot code, app, the frame's ``messageId``); connector-private.

EVENT frames and card callbacks become ``Event`` values (``event_from_frame``,
``card_callback_event``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

from host.model import (
    AudioPart,
    Conversation,
    Event,
    FilePart,
    ImagePart,
    Media,
    Mention,
    Message,
    Part,
    RichTextPart,
    Sender,
    TextPart,
    VideoPart,
    now_ms,
)
from host_dingtalk_connector.errors import PayloadError
from host_dingtalk_connector.identity import IdentityResolver

__all__ = [
    "KNOWN_MSGTYPES",
    "PLATFORM",
    "card_callback_event",
    "convert_bot_message",
    "event_from_frame",
    "msgtype_label",
]

PLATFORM = "dingtalk"
KNOWN_MSGTYPES = frozenset({"text", "picture", "richText", "audio", "video", "file", "unknownMsgType"})


def msgtype_label(msgtype: object) -> str:
    """A bounded metric label for a msgtype (``other`` for anything unexpected)."""
    return msgtype if isinstance(msgtype, str) and msgtype in KNOWN_MSGTYPES else "other"


def _str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _int(value: Any) -> int | None:
    """Numbers, or numeric strings (the developerpedia video sample uses ``"5"``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value.strip()))
        except ValueError:
            return None
    return None


def _content(data: Mapping[str, Any]) -> dict[str, Any]:
    content = data.get("content")
    return content if isinstance(content, dict) else {}


def _media(content: Mapping[str, Any], **extra: Any) -> Media:
    return Media(download_code=_str(content, "downloadCode"), **extra)


def _parts(msgtype: str, data: Mapping[str, Any]) -> list[Part]:
    if msgtype == "text":
        text = data.get("text")
        content = text.get("content") if isinstance(text, dict) else None
        if not isinstance(content, str):
            return []
        # In groups DingTalk strips "@robot" and leaves the space before the text.
        return [TextPart(text=content.strip())]
    content = _content(data)
    if msgtype == "picture":
        if not content:
            return []
        return [ImagePart(media=_media(content, mime_type="image/*"))]
    if msgtype == "richText":
        items = content.get("richText")
        if not isinstance(items, list):
            return []
        rich: list[TextPart | ImagePart] = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str):
                rich.append(TextPart(text=item["text"]))
            elif item.get("downloadCode") or item.get("type") == "picture":
                rich.append(ImagePart(media=_media(item, mime_type="image/*")))
        return [RichTextPart(parts=rich)]
    if msgtype == "audio":
        if not content:
            return []
        recognition = content.get("recognition")
        return [
            AudioPart(
                media=_media(content, mime_type="audio/*"),
                recognition=recognition if isinstance(recognition, str) and recognition else None,
                duration_ms=_int(content.get("duration")),
            )
        ]
    if msgtype == "video":
        if not content:
            return []
        video_type = _str(content, "videoType")
        return [
            VideoPart(
                media=_media(content, mime_type=f"video/{video_type}" if video_type else "video/*"),
                duration_ms=_int(content.get("duration")),
                video_type=video_type,
            )
        ]
    if msgtype == "file":
        if not content:
            return []
        name = _str(content, "fileName")
        return [FilePart(media=_media(content, name=name), file_name=name)]
    return []


def _conversation(data: Mapping[str, Any]) -> Conversation:
    conversation_id = _str(data, "conversationId")
    if conversation_id is None:
        raise PayloadError("conversationId is missing")
    kind = data.get("conversationType")
    if kind in ("2", 2):
        return Conversation(id=conversation_id, type="group", title=_str(data, "conversationTitle"))
    if kind in ("1", 1, None):
        return Conversation(id=conversation_id, type="single")
    raise PayloadError(f"conversationType must be '1' or '2', got {kind!r}")


def _sender(data: Mapping[str, Any], resolver: IdentityResolver) -> Sender:
    ids = {
        kind: value
        for kind, key in (("staffId", "senderStaffId"), ("unionId", "senderUnionId"), ("senderId", "senderId"))
        if (value := _str(data, key)) is not None
    }
    nick = data.get("senderNick")
    return Sender(
        platform_ids=ids,
        name=nick if isinstance(nick, str) else "",
        identity=resolver.resolve(ids) if ids else None,
        is_admin=data.get("isAdmin") is True,
        corp_id=_str(data, "senderCorpId"),
    )


def _mentions(data: Mapping[str, Any]) -> list[Mention]:
    at_users = data.get("atUsers")
    if not isinstance(at_users, list):
        return []
    bot_id = _str(data, "chatbotUserId")
    mentions = []
    for user in at_users:
        if not isinstance(user, dict):
            continue
        ids = {
            kind: value
            for kind, key in (("dingtalkId", "dingtalkId"), ("staffId", "staffId"), ("unionId", "unionId"))
            if (value := _str(user, key)) is not None
        }
        if ids:
            mentions.append(Mention(platform_ids=ids, is_bot=bot_id is not None and ids.get("dingtalkId") == bot_id))
    return mentions


def convert_bot_message(
    data: dict[str, Any],
    *,
    connector: str,
    app: str,
    resolver: IdentityResolver,
    frame_message_id: str,
) -> Message:
    """Build the host ``Message`` of a bot-message payload. Raises ``PayloadError`` when unusable."""
    msg_id = _str(data, "msgId")
    if msg_id is None:
        raise PayloadError("msgId is missing", message_id=frame_message_id)
    try:
        conversation = _conversation(data)
    except PayloadError as exc:
        raise PayloadError(exc.detail, message_id=frame_message_id) from None
    msgtype = data.get("msgtype")
    parts = _parts(msgtype, data) if isinstance(msgtype, str) else []
    context: dict[str, Any] = {
        "app": app,
        "robot_code": _str(data, "robotCode"),
        "frame_message_id": frame_message_id,
        "msgtype": msgtype if isinstance(msgtype, str) else None,
    }
    webhook = _str(data, "sessionWebhook")
    if webhook is not None:
        context["session_webhook"] = webhook
        context["session_webhook_expires_ms"] = _int(data.get("sessionWebhookExpiredTime"))
    created = _int(data.get("createAt"))
    return Message(
        id=msg_id,
        platform=PLATFORM,
        connector=connector,
        conversation=conversation,
        sender=_sender(data, resolver),
        parts=parts,
        mentions=_mentions(data),
        mentions_bot=data.get("isInAtList") is True,
        created_at_ms=created if created is not None else now_ms(),
        app_id=app,
        raw=data,
        context=context,
    )


def event_from_frame(headers: Mapping[str, str], data: dict[str, Any], *, connector: str, app: str) -> Event:
    """An EVENT frame as a host ``Event``: ``type`` = ``eventType``, ``id`` = ``eventId``.

    The event's identification lives in the frame headers (``eventType``, ``eventId``,
    ``eventCorpId``, ``eventBornTime``, ``eventUnifiedAppId``); ``payload`` is the decoded ``data``
    and ``raw`` keeps both.
    """
    event_type = headers.get("eventType")
    if not event_type:
        raise PayloadError("EVENT frame has no eventType header", message_id=headers.get("messageId"))
    event_id = headers.get("eventId") or headers["messageId"]
    born = _int(headers.get("eventBornTime"))
    return Event(
        id=event_id,
        platform=PLATFORM,
        connector=connector,
        type=event_type,
        payload=data,
        created_at_ms=born if born is not None else now_ms(),
        app_id=app,
        raw={"headers": dict(headers), "data": data},
    )


def card_callback_event(headers: Mapping[str, str], data: dict[str, Any], *, connector: str, app: str) -> Event:
    """A card callback (``/v1.0/card/instances/callback``) as an ``Event`` of type ``card_callback``.

    ``payload`` is the decoded callback with its JSON-string fields ``content`` and ``extension``
    decoded too (left as strings when they are not JSON).
    """
    payload = dict(data)
    for key in ("content", "extension"):
        value = payload.get(key)
        if isinstance(value, str) and value:
            with contextlib.suppress(ValueError):
                payload[key] = json.loads(value)
    return Event(
        id=headers["messageId"],
        platform=PLATFORM,
        connector=connector,
        type="card_callback",
        payload=payload,
        app_id=app,
        raw={"headers": dict(headers), "data": data},
    )
