"""Every msgtype of dingtalk-protocol.md section 4 becomes the right host Message."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from host_dingtalk_connector.convert import (
    card_callback_event,
    convert_bot_message,
    event_from_frame,
    msgtype_label,
)
from host_dingtalk_connector.errors import PayloadError
from host_dingtalk_connector.identity import MappingFileResolver, NullResolver

from host.model import AudioPart, FilePart, ImagePart, RichTextPart, TextPart, VideoPart

GROUP_TEXT: dict[str, Any] = {
    "conversationId": "cidq3L9xExampleGroupAbC0=",
    "conversationType": "2",
    "conversationTitle": "Release team",
    "atUsers": [{"dingtalkId": "$:LWCP_v1:$R0b0tEncId"}, {"dingtalkId": "$:LWCP_v1:$Other", "staffId": "u2"}],
    "chatbotCorpId": "ding5a1b2c3d4e5f6789",
    "chatbotUserId": "$:LWCP_v1:$R0b0tEncId",
    "msgId": "msgQx2Zexample1==",
    "senderNick": "Li Lei",
    "isAdmin": False,
    "senderStaffId": "manager1234",
    "senderId": "$:LWCP_v1:$S3nderEnc==",
    "senderUnionId": "ZPbvexample",
    "senderCorpId": "ding5a1b2c3d4e5f6789",
    "senderPlatform": "Mac",
    "createAt": 1731200000000,
    "sessionWebhookExpiredTime": 1731205400000,
    "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    "isInAtList": True,
    "robotCode": "dingabcdefghijkl",
    "msgtype": "text",
    "text": {"content": " build status?"},
}


def single(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(GROUP_TEXT)
    data["conversationType"] = "1"
    for key in ("conversationTitle", "isInAtList", "atUsers"):
        data.pop(key)
    data.pop("text")
    data.update(changes)
    return data


def convert(data: dict[str, Any], resolver: Any = None) -> Any:
    return convert_bot_message(
        data, connector="dingtalk", app="main", resolver=resolver or NullResolver(), frame_message_id="frame-1"
    )


def test_group_text_message() -> None:
    message = convert(copy.deepcopy(GROUP_TEXT))
    assert message.id == "msgQx2Zexample1=="
    assert message.platform == "dingtalk" and message.connector == "dingtalk" and message.app_id == "main"
    assert message.parts == [TextPart(text="build status?")]
    assert message.text == "build status?"
    assert message.conversation.type == "group"
    assert message.conversation.title == "Release team"
    assert message.conversation.id == "cidq3L9xExampleGroupAbC0="
    assert message.mentions_bot is True
    assert [m.is_bot for m in message.mentions] == [True, False]
    assert message.mentions[1].platform_ids == {"dingtalkId": "$:LWCP_v1:$Other", "staffId": "u2"}
    assert message.sender.platform_ids == {
        "staffId": "manager1234",
        "unionId": "ZPbvexample",
        "senderId": "$:LWCP_v1:$S3nderEnc==",
    }
    assert message.sender.name == "Li Lei" and message.sender.corp_id == "ding5a1b2c3d4e5f6789"
    assert message.sender.is_admin is False
    assert message.created_at_ms == 1731200000000
    assert message.context["session_webhook"] == GROUP_TEXT["sessionWebhook"]
    assert message.context["session_webhook_expires_ms"] == 1731205400000
    assert message.context["robot_code"] == "dingabcdefghijkl"
    assert message.context["frame_message_id"] == "frame-1"
    assert message.raw == GROUP_TEXT


def test_single_chat() -> None:
    message = convert(single(msgtype="text", text={"content": "hi"}))
    assert message.conversation.type == "single" and message.conversation.title is None
    assert message.mentions == [] and message.mentions_bot is False


def test_picture() -> None:
    message = convert(single(msgtype="picture", content={"pictureDownloadCode": "pWjA", "downloadCode": "mIofN1"}))
    assert message.parts == [ImagePart(media=message.parts[0].media)]
    assert message.parts[0].media.download_code == "mIofN1"


def test_rich_text_keeps_order() -> None:
    message = convert(
        single(
            msgtype="richText",
            content={
                "richText": [
                    {"text": "see the screenshot:"},
                    {"pictureDownloadCode": "p2", "downloadCode": "dl2", "type": "picture"},
                    {"text": "thanks"},
                ]
            },
        )
    )
    (part,) = message.parts
    assert isinstance(part, RichTextPart)
    assert [type(p).__name__ for p in part.parts] == ["TextPart", "ImagePart", "TextPart"]
    assert part.parts[1].media.download_code == "dl2"  # type: ignore[union-attr]
    assert message.text == "see the screenshot:\nthanks"


def test_audio_with_recognition() -> None:
    message = convert(
        single(msgtype="audio", content={"duration": 4000, "downloadCode": "aud", "recognition": "明天的会议改到三点"})
    )
    (part,) = message.parts
    assert isinstance(part, AudioPart)
    assert part.recognition == "明天的会议改到三点" and part.duration_ms == 4000
    assert part.media.download_code == "aud"
    assert message.text == "明天的会议改到三点"


@pytest.mark.parametrize("duration", [4000, "4000"])
def test_video_duration_number_or_string(duration: Any) -> None:
    message = convert(single(msgtype="video", content={"duration": duration, "videoType": "mp4", "downloadCode": "v"}))
    (part,) = message.parts
    assert isinstance(part, VideoPart)
    assert part.duration_ms == 4000 and part.video_type == "mp4" and part.media.download_code == "v"


def test_file() -> None:
    message = convert(
        single(msgtype="file", content={"spaceId": "223", "fileName": "report.zip", "downloadCode": "f", "fileId": "117"})
    )
    (part,) = message.parts
    assert isinstance(part, FilePart)
    assert part.file_name == "report.zip" and part.media.name == "report.zip" and part.media.download_code == "f"


def test_unknown_msgtype_is_kept_raw() -> None:
    data = single(msgtype="unknownMsgType", content={"unknownMsgType": "用户发送了一条消息，机器人暂不支持接收。"})
    message = convert(data)
    assert message.parts == []
    assert message.raw["content"]["unknownMsgType"].startswith("用户")
    assert msgtype_label("unknownMsgType") == "unknownMsgType"


def test_future_msgtype_is_kept_raw() -> None:
    message = convert(single(msgtype="interactiveCard", content={"x": 1}))
    assert message.parts == [] and message.raw["msgtype"] == "interactiveCard"
    assert msgtype_label("interactiveCard") == "other"
    assert msgtype_label(None) == "other"


def test_quota_exhausted_message_without_text() -> None:
    message = convert(single(msgtype="text", errMsg="受调用量超量影响"))
    assert message.parts == []


def test_identity_mapping_applies() -> None:
    resolver = MappingFileResolver({"unionId": {"ZPbvexample": "alice"}})
    assert convert(copy.deepcopy(GROUP_TEXT), resolver).sender.identity == "alice"
    assert convert(copy.deepcopy(GROUP_TEXT)).sender.identity is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"msgId": None}, "msgId"), ({"conversationId": None}, "conversationId"), ({"conversationType": "9"}, "conversationType")],
)
def test_unusable_payload(change: dict[str, Any], problem: str) -> None:
    data = copy.deepcopy(GROUP_TEXT)
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    with pytest.raises(PayloadError) as info:
        convert(data)
    assert problem in str(info.value)
    assert info.value.message_id == "frame-1"


def test_event_from_headers() -> None:
    headers = {
        "topic": "*",
        "messageId": "213d",
        "eventType": "chat_update_title",
        "eventId": "5c0ffee",
        "eventCorpId": "ding5a",
        "eventBornTime": "1731200099000",
        "eventUnifiedAppId": "b2f3",
    }
    event = event_from_frame(headers, {"title": "New name"}, connector="dingtalk", app="main")
    assert (event.id, event.type, event.app_id) == ("5c0ffee", "chat_update_title", "main")
    assert event.payload == {"title": "New name"}
    assert event.created_at_ms == 1731200099000
    assert event.raw["headers"]["eventCorpId"] == "ding5a"
    with pytest.raises(PayloadError):
        event_from_frame({"messageId": "x", "topic": "*"}, {}, connector="d", app="a")


def test_card_callback_decodes_json_strings() -> None:
    data = {
        "type": "actionCallback",
        "outTrackId": "card_1",
        "userId": "manager1234",
        "content": '{"cardPrivateData":{"actionIds":["btn_accept"],"params":{"action":"accept"}}}',
        "extension": "not json",
    }
    event = card_callback_event({"messageId": "cb1", "topic": "/v1.0/card/instances/callback"}, data, connector="d", app="a")
    assert event.type == "card_callback" and event.id == "cb1"
    assert event.payload["content"]["cardPrivateData"]["params"] == {"action": "accept"}
    assert event.payload["extension"] == "not json"
