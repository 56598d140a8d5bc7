"""DingTalk Stream frames: decoding the server's envelope and encoding our ACKs.

Every application frame is a WebSocket **text** frame holding one JSON object (reference
``dingtalk-protocol.md`` section 2)::

    {"specVersion": "1.0", "type": "CALLBACK",
     "headers": {"messageId": "...", "topic": "/v1.0/im/bot/messages/get", "time": "1731200000123", ...},
     "data": "<a JSON document serialized into a string>"}

and every answer is an ACK echoing ``headers.messageId``::

    {"code": 200, "headers": {"contentType": "application/json", "messageId": "..."},
     "message": "OK", "data": "{\\"response\\": null}"}

``decode_frame`` raises ``FrameError`` with a bounded ``reason`` label (and the ``messageId`` when it
could still be read) for anything unusable; the connection keeps going.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from host_dingtalk_connector.errors import FrameError

__all__ = [
    "BOT_TOPICS",
    "CARD_CALLBACK_TOPIC",
    "DEFAULT_BOT_TOPIC",
    "DELEGATE_BOT_TOPIC",
    "EVENT_DATA_LATER",
    "EVENT_DATA_SUCCESS",
    "FRAME_TYPES",
    "Frame",
    "ack_callback",
    "ack_error",
    "ack_event",
    "ack_system",
    "decode_frame",
    "encode_ack",
]

DEFAULT_BOT_TOPIC: Final = "/v1.0/im/bot/messages/get"
DELEGATE_BOT_TOPIC: Final = "/v1.0/im/bot/messages/delegate"
#: Topics whose frames are robot chat messages.
BOT_TOPICS: Final = frozenset({DEFAULT_BOT_TOPIC, DELEGATE_BOT_TOPIC})
CARD_CALLBACK_TOPIC: Final = "/v1.0/card/instances/callback"
FRAME_TYPES: Final = frozenset({"SYSTEM", "EVENT", "CALLBACK"})

_CONTENT_TYPE: Final = "application/json"


class _Envelope(msgspec.Struct):
    # Loosely typed on purpose: each field is checked below so the error can say what was wrong.
    specVersion: Any = None
    type: Any = None
    headers: Any = None
    data: Any = None


class _WellFormed(msgspec.Struct):
    # What DingTalk sends: decoded straight into the types we keep (no per-header copy). Anything
    # else fails validation and takes the lenient path, whose error names the problem.
    type: str
    headers: dict[str, str]
    data: str = ""


class _HeadersOnly(msgspec.Struct):
    headers: Any = None


_well_formed_decoder = msgspec.json.Decoder(_WellFormed)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_headers_decoder = msgspec.json.Decoder(_HeadersOnly)
_object_decoder = msgspec.json.Decoder(dict[str, Any])
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Frame:
    """One decoded downstream frame. ``headers`` values are strings; ``data`` is the raw string."""

    type: str
    headers: dict[str, str]
    data: str
    size: int

    @property
    def message_id(self) -> str:
        return self.headers["messageId"]

    @property
    def topic(self) -> str:
        return self.headers["topic"]

    def payload(self) -> dict[str, Any]:
        """``data`` parsed as a JSON object (``{}`` when empty). Raises ``FrameError(data_not_json)``."""
        if not self.data:
            return {}
        try:
            return _object_decoder.decode(self.data)
        except msgspec.ValidationError:
            raise FrameError(
                "data_not_json", "data is JSON but not an object", message_id=self.message_id
            ) from None
        except msgspec.DecodeError as exc:
            raise FrameError("data_not_json", f"data is not JSON ({exc})", message_id=self.message_id) from None
        except RecursionError:
            raise FrameError("data_not_json", "data is nested too deeply", message_id=self.message_id) from None


def _message_id_of(raw: str | bytes) -> str | None:
    """Best effort: the ``headers.messageId`` of an otherwise unusable frame (for logs and ACKs)."""
    try:
        headers = _headers_decoder.decode(raw).headers
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(headers, dict):
        value = headers.get("messageId")
        if isinstance(value, str) and value:
            return value
    return None


def decode_frame(raw: str | bytes, *, max_size: int) -> Frame:
    """Decode one WebSocket message into a ``Frame``.

    ``max_size`` bounds the frame's length (``len()``, as trio-websocket measures it). Raises
    ``FrameError`` naming the problem; ``message_id`` is set when the frame still had a readable one.
    """
    if isinstance(raw, bytes | bytearray):
        raise FrameError("binary", f"binary frame of {len(raw)} bytes", message_id=_message_id_of(bytes(raw)))
    size = len(raw)
    if size > max_size:
        raise FrameError("oversized", f"frame of {size} characters exceeds {max_size}", message_id=_message_id_of(raw))
    try:
        fast = _well_formed_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        pass  # msgspec.ValidationError is a DecodeError: the lenient path below explains it
    else:
        headers = fast.headers
        message_id = headers.get("messageId")
        if message_id and fast.type in FRAME_TYPES and headers.get("topic"):
            return Frame(type=fast.type, headers=headers, data=fast.data, size=size)
    return _decode_leniently(raw, size)


def _decode_leniently(raw: str, size: int) -> Frame:
    """Decode a frame that is not exactly what DingTalk sends: tolerate what the official SDKs
    tolerate (numeric header values, ``data`` null or absent), reject the rest naming the problem."""
    try:
        envelope = _envelope_decoder.decode(raw)
    except msgspec.ValidationError:
        raise FrameError("not_object", "frame is JSON but not an object") from None
    except msgspec.DecodeError as exc:
        raise FrameError("not_json", f"frame is not JSON ({exc})") from None
    except RecursionError:
        # msgspec recurses per nesting level: ~2 KB of brackets is enough to exhaust the stack.
        raise FrameError("not_json", "frame is nested too deeply") from None
    headers = envelope.headers
    if not isinstance(headers, dict) or not headers:
        raise FrameError("missing_headers", "frame has no headers object")
    message_id = headers.get("messageId")
    if not isinstance(message_id, str) or not message_id:
        raise FrameError("missing_message_id", "headers.messageId is missing or not a string")
    # Header values are strings on the wire; tolerate numbers (as the official Python SDK does).
    clean = {str(k): v if isinstance(v, str) else _encoder.encode(v).decode() for k, v in headers.items()}
    kind = envelope.type
    if not isinstance(kind, str) or kind not in FRAME_TYPES:
        raise FrameError("unknown_type", f"unknown frame type {kind!r}", message_id=message_id)
    topic = clean.get("topic")
    if not topic:
        raise FrameError("missing_topic", "headers.topic is missing", message_id=message_id)
    data = envelope.data
    if data is None:
        data = ""
    elif not isinstance(data, str):
        raise FrameError("data_not_json", "data must be a JSON document serialized into a string", message_id=message_id)
    return Frame(type=kind, headers=clean, data=data, size=size)


def encode_ack(message_id: str, *, code: int = 200, message: str = "OK", data: str = "") -> str:
    """The ACK envelope of section 2.2, as the text to send."""
    return _encoder.encode(
        {
            "code": code,
            "headers": {"contentType": _CONTENT_TYPE, "messageId": message_id},
            "message": message,
            "data": data,
        }
    ).decode()


_RESPONSE_NULL: Final = '{"response":null}'
EVENT_DATA_SUCCESS: Final = '{"status":"SUCCESS","message":"success"}'
EVENT_DATA_LATER: Final = '{"status":"LATER","message":"later"}'


def ack_callback(message_id: str, response: Any = None) -> str:
    """ACK a CALLBACK (bot message or card callback): ``data = {"response": <response>}``."""
    data = _RESPONSE_NULL if response is None else _encoder.encode({"response": response}).decode()
    return encode_ack(message_id, data=data)


def ack_event(message_id: str, *, success: bool, note: str | None = None) -> str:
    """ACK an EVENT: ``SUCCESS`` (consumed) or ``LATER`` (please redeliver)."""
    if note is None:
        data = EVENT_DATA_SUCCESS if success else EVENT_DATA_LATER
    else:
        data = _encoder.encode({"status": "SUCCESS" if success else "LATER", "message": note}).decode()
    return encode_ack(message_id, data=data)


def ack_system(message_id: str, data: str) -> str:
    """ACK a SYSTEM frame by echoing its data verbatim (``ping`` requires the same ``opaque``)."""
    return encode_ack(message_id, data=data)


def ack_error(message_id: str, code: int, message: str) -> str:
    """A non-200 ACK: 400 unusable frame, 404 topic/type not handled, 500 internal error."""
    return encode_ack(message_id, code=code, message=message, data="")
