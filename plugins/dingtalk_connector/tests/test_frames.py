"""Envelope decoding and ACK encoding, exactly as dingtalk-protocol.md section 2 describes them."""

from __future__ import annotations

import json

import pytest
from host_dingtalk_connector import frames
from host_dingtalk_connector.errors import FrameError

CALLBACK = {
    "specVersion": "1.0",
    "type": "CALLBACK",
    "headers": {
        "appId": "b2f3c9d4",
        "connectionId": "7e1a2b3c",
        "contentType": "application/json",
        "messageId": "2130a1b2_974_1899aa11bb2_1c3d",
        "time": "1731200000123",
        "topic": "/v1.0/im/bot/messages/get",
    },
    "data": json.dumps({"msgtype": "text", "text": {"content": "hi"}, "msgId": "m1"}),
}


def test_decode_callback_frame() -> None:
    frame = frames.decode_frame(json.dumps(CALLBACK), max_size=1 << 20)
    assert frame.type == "CALLBACK"
    assert frame.message_id == "2130a1b2_974_1899aa11bb2_1c3d"
    assert frame.topic == frames.DEFAULT_BOT_TOPIC
    assert frame.payload()["msgId"] == "m1"


def test_numeric_header_values_are_tolerated_as_strings() -> None:
    raw = dict(CALLBACK, headers={**CALLBACK["headers"], "time": 1731200000123})
    frame = frames.decode_frame(json.dumps(raw), max_size=1 << 20)
    assert frame.headers["time"] == "1731200000123"


def test_system_frame_without_data() -> None:
    raw = {"specVersion": "1.0", "type": "SYSTEM", "headers": {"messageId": "s1", "topic": "ping"}}
    frame = frames.decode_frame(json.dumps(raw), max_size=1 << 20)
    assert frame.data == ""
    assert frame.payload() == {}


@pytest.mark.parametrize(
    ("raw", "reason", "message_id"),
    [
        ("not json at all", "not_json", None),
        ("[1, 2]", "not_object", None),
        (json.dumps({"type": "CALLBACK", "data": "{}"}), "missing_headers", None),
        (json.dumps({"type": "CALLBACK", "headers": {"topic": "x"}}), "missing_message_id", None),
        (json.dumps({"type": "WHAT", "headers": {"messageId": "a", "topic": "x"}}), "unknown_type", "a"),
        (json.dumps({"type": "EVENT", "headers": {"messageId": "b"}}), "missing_topic", "b"),
        (json.dumps({"type": "EVENT", "headers": {"messageId": "c", "topic": "*"}, "data": {"a": 1}}), "data_not_json", "c"),
        (json.dumps(CALLBACK).encode(), "binary", "2130a1b2_974_1899aa11bb2_1c3d"),
    ],
)
def test_bad_frames_name_the_problem(raw: str | bytes, reason: str, message_id: str | None) -> None:
    with pytest.raises(FrameError) as info:
        frames.decode_frame(raw, max_size=1 << 20)
    assert info.value.reason == reason
    assert info.value.message_id == message_id


def test_oversized_frame_keeps_its_message_id() -> None:
    raw = json.dumps(dict(CALLBACK, data=json.dumps({"text": "x" * 5000})))
    with pytest.raises(FrameError) as info:
        frames.decode_frame(raw, max_size=1000)
    assert info.value.reason == "oversized"
    assert info.value.message_id == CALLBACK["headers"]["messageId"]


def test_data_that_is_not_json() -> None:
    raw = json.dumps(dict(CALLBACK, data="{broken"))
    frame = frames.decode_frame(raw, max_size=1 << 20)
    with pytest.raises(FrameError) as info:
        frame.payload()
    assert info.value.reason == "data_not_json"
    assert info.value.message_id == CALLBACK["headers"]["messageId"]


def test_callback_ack_envelope() -> None:
    ack = json.loads(frames.ack_callback("mid-1"))
    assert ack == {
        "code": 200,
        "headers": {"contentType": "application/json", "messageId": "mid-1"},
        "message": "OK",
        "data": '{"response":null}',
    }
    assert json.loads(ack["data"]) == {"response": None}


def test_event_ack_success_and_later() -> None:
    success = json.loads(frames.ack_event("e1", success=True))
    later = json.loads(frames.ack_event("e2", success=False))
    assert success["code"] == 200 and later["code"] == 200
    assert json.loads(success["data"]) == {"status": "SUCCESS", "message": "success"}
    assert json.loads(later["data"]) == {"status": "LATER", "message": "later"}
    noted = json.loads(frames.ack_event("e3", success=False, note="db down"))
    assert json.loads(noted["data"]) == {"status": "LATER", "message": "db down"}


def test_ping_ack_echoes_data_verbatim() -> None:
    data = '{"opaque":"op-1"}'
    ack = json.loads(frames.ack_system("sysping1", data))
    assert ack["headers"]["messageId"] == "sysping1"
    assert ack["data"] == data


def test_error_ack() -> None:
    ack = json.loads(frames.ack_error("x", 404, "not supported"))
    assert (ack["code"], ack["message"], ack["headers"]["messageId"]) == (404, "not supported", "x")
