"""Stream frames as DingTalk sends them, and how client ACKs are judged (reference §2).

Downstream frame: ``{"specVersion": "1.0", "type", "headers": {str: str}, "data": "<JSON string>"}``
with ``time`` in epoch milliseconds as a string. ACK: ``{"code", "headers": {"messageId", ...},
"message", "data": "<JSON string>"}``.

ACK verdicts (``AckRecord.verdict``):

============== =====================================================================================
ok             accepted (code 200; for EVENTs the data is not ``"status": "LATER"``, so the official
               Python client's echo-style ACK counts; for pings the ``opaque`` matches)
later          EVENT answered ``LATER`` (redelivery requested)
error          code other than 200 (Go answers LATER with 500)
bad_opaque     ping ACK whose data does not echo the ``opaque``
late           card-callback ACK after the 2 s deadline (not applied to the card)
duplicate      a second ACK for a frame already ACKed
unknown        ACK for a messageId this connection was never sent
malformed      not JSON, not an object, or no ``headers.messageId``
============== =====================================================================================

``problems`` lists deviations DingTalk tolerates but a careful client avoids (``data`` not a string,
``code`` not a number, missing ``contentType``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

__all__ = ["AckRecord", "FrameRecord", "build_frame", "encode", "encode_bytes", "frame_of", "judge_ack", "parse_ack"]

_encoder = msgspec.json.Encoder()


def encode(value: Any) -> str:
    return _encoder.encode(value).decode()


def encode_bytes(value: Any) -> bytes:
    """UTF-8 JSON (what goes on the wire, and what ``max_frame_bytes`` is checked against)."""
    return _encoder.encode(value)


def build_frame(frame_type: str, headers: dict[str, str], data: Any) -> dict[str, Any]:
    """A downstream frame; ``data`` is serialized into a JSON string (never left an object)."""
    assert all(isinstance(v, str) for v in headers.values()), "header values must be strings"
    return {"specVersion": "1.0", "type": frame_type, "headers": headers,
            "data": data if isinstance(data, str) else encode(data)}


def frame_of(frame_type: str, headers: dict[str, str], data: Any) -> dict[str, Any]:
    """``build_frame`` for headers known to be strings (the push path builds them itself)."""
    return {"specVersion": "1.0", "type": frame_type, "headers": headers,
            "data": data if isinstance(data, str) else encode(data)}


@dataclass
class AckRecord:
    message_id: str
    code: Any
    message: Any
    data: Any  # as received (normally a JSON string)
    parsed: Any  # ``data`` decoded when it is a JSON string
    latency: float | None  # seconds from push to ACK (emulator clock)
    verdict: str
    problems: list[str] = field(default_factory=list)
    received_ms: int = 0
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"messageId": self.message_id, "code": self.code, "message": self.message,
                "data": self.data, "parsed": self.parsed, "latency": self.latency,
                "verdict": self.verdict, "problems": list(self.problems),
                "receivedAt": self.received_ms}


@dataclass
class FrameRecord:
    """A frame the emulator sent on a connection."""

    message_id: str
    frame_type: str  # SYSTEM | EVENT | CALLBACK | RAW (faults)
    topic: str
    kind: str  # ping | disconnect | bot_message | event | card_callback | callback | malformed | oversized
    connection_id: str
    sent_at: float  # emulator clock
    sent_ms: int
    size: int
    frame: dict[str, Any] | None
    payload: Any = None
    delivery_key: str = ""  # msgId / eventId / outTrackId: the same across redeliveries
    attempt: int = 0  # 0 = first delivery
    expect_ack: bool = True
    opaque: str = ""
    ack: AckRecord | None = None
    extra_acks: list[AckRecord] = field(default_factory=list)
    _acked: trio.Event | None = field(default=None, repr=False)

    @property
    def acked(self) -> trio.Event:
        """Set once the first ACK arrived (made on first use: most frames are never waited on)."""
        if self._acked is None:
            self._acked = trio.Event()
            if self.ack is not None:
                self._acked.set()
        return self._acked

    def record_ack(self, ack: AckRecord) -> None:
        """The first ACK of this frame arrived."""
        self.ack = ack
        if self._acked is not None:
            self._acked.set()

    def to_dict(self, *, with_frame: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "messageId": self.message_id, "type": self.frame_type, "topic": self.topic,
            "kind": self.kind, "connectionId": self.connection_id, "sentAt": self.sent_ms,
            "size": self.size, "deliveryKey": self.delivery_key, "attempt": self.attempt,
            "expectAck": self.expect_ack, "ack": None if self.ack is None else self.ack.to_dict(),
            "extraAcks": [a.to_dict() for a in self.extra_acks],
        }
        if with_frame:
            data["frame"] = self.frame
            data["payload"] = self.payload
        return data


def parse_ack(raw: str | bytes) -> tuple[dict[str, Any] | None, str]:
    """Decode an inbound message; returns ``(ack, "")`` or ``(None, why it is malformed)``."""
    if isinstance(raw, bytes):
        return None, "binary frame (DingTalk uses text frames only)"
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        return None, f"not JSON: {exc}"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    headers = value.get("headers")
    if not isinstance(headers, dict) or not isinstance(headers.get("messageId"), str):
        return None, "missing headers.messageId"
    return value, ""


def judge_ack(frame: FrameRecord, ack: dict[str, Any], *, now: float, now_ms: int,
              card_callback_timeout: float, raw: str) -> AckRecord:
    """Judge ``ack`` (already parsed) against the frame it answers (reference §2.2)."""
    headers = ack.get("headers") or {}
    code, data = ack.get("code"), ack.get("data")
    problems: list[str] = []
    if not isinstance(code, int) or isinstance(code, bool):
        problems.append("code is not a number")
    if headers.get("contentType") != "application/json":
        problems.append("headers.contentType is not application/json")
    parsed: Any = None
    if isinstance(data, str):
        if data:
            try:
                parsed = msgspec.json.decode(data)
            except msgspec.DecodeError:
                problems.append("data is not a JSON string")
    elif data is not None:
        problems.append("data is not a string (DingTalk expects JSON serialized into a string)")
        parsed = data
    latency = now - frame.sent_at
    code_ok = code == 200 or code == "200"
    if frame.kind == "ping":
        echoed = parsed.get("opaque") if isinstance(parsed, dict) else None
        verdict = ("ok" if echoed == frame.opaque else "bad_opaque") if code_ok else "error"
    elif frame.kind == "event":
        later = isinstance(parsed, dict) and parsed.get("status") == "LATER"
        verdict = "error" if not code_ok else ("later" if later else "ok")
    elif frame.kind == "card_callback":
        verdict = "error" if not code_ok else ("ok" if latency <= card_callback_timeout else "late")
    else:
        verdict = "ok" if code_ok else "error"
    return AckRecord(message_id=headers["messageId"], code=code, message=ack.get("message"),
                     data=data, parsed=parsed, latency=latency, verdict=verdict,
                     problems=problems, received_ms=now_ms, raw=raw)
