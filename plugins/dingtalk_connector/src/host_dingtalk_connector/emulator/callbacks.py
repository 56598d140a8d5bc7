"""Webhook (HTTP callback) mode: the emulator POSTs signed bot messages to a bot's URL (reference 8.1).

In HTTP mode DingTalk does not push bot messages over the Stream WebSocket: it POSTs the same JSON
(section 4) to the robot's callback URL with ``timestamp`` (epoch ms) and
``sign = Base64(HMAC-SHA256(key=appSecret, msg=timestamp + "\\n" + appSecret))`` headers, and takes
the HTTP response body as an optional reply (a session-webhook message body, or
``{"msgtype": "empty"}``). ``CallbackDriver`` does exactly that::

    async with open_callbacks(emu) as callbacks:
        record = await callbacks.send_user_message(bot_url, "hello")
        record.status, record.outcome, record.inline_reply      # 200, "answered", {...}
        await callbacks.replay(record)                          # the same request again
        await callbacks.send_user_message(bot_url, "hi", timestamp_ms=old)   # a stale one

The user message joins the conversation's timeline like a Stream push; an inline answer is
recorded as a bot message with ``via = "callbackResponse"`` (so ``wait_for_bot_message`` sees
inline answers and session-webhook replies alike). Every POST is kept in ``records`` with its HTTP
status, answer and outcome: ``answered`` (an inline reply), ``empty`` (200 without a reply),
``refused`` (any other status), ``bad_answer`` (200 with a body DingTalk would reject),
``timeout`` (no answer within ``answer_timeout``, DingTalk's 2.5 s) or ``error`` (connection failed).

The signature is computed here from the reference, independently of the connector's code, so a
mistake on either side shows up in tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .errors import EmulatorError, NotFound, OapiError
from .state import BotMessage, UserMessage
from .webhook import validate_webhook_body

if TYPE_CHECKING:
    from .server import Emulator

__all__ = [
    "CALLBACK_TIMEOUT",
    "CallbackDriver",
    "CallbackRecord",
    "callback_routes",
    "open_callbacks",
    "sign_callback",
]

#: DingTalk gives an HTTP push about 2.5 s (reference 2.3).
CALLBACK_TIMEOUT = 2.5
_CONVERSATION_TYPES = {"single": "1", "1": "1", "group": "2", "2": "2"}


def sign_callback(secret: str, timestamp: str | int) -> str:
    """The ``sign`` header DingTalk sends with a callback signed at ``timestamp`` (epoch ms)."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}\n{secret}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


@dataclass
class CallbackRecord:
    """One callback POSTed to a bot, and what the bot answered."""

    seq: int
    url: str
    headers: dict[str, str]
    body: bytes
    msg_id: str | None = None
    conversation_id: str | None = None
    status: int | None = None
    response: Any = None
    outcome: str = ""  # answered | empty | refused | bad_answer | timeout | error | not_delivered
    error: str = ""
    inline_reply: dict[str, Any] | None = None
    replay_of: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "url": self.url, "msgId": self.msg_id, "conversationId": self.conversation_id,
            "timestamp": self.headers.get("timestamp"), "status": self.status, "response": self.response,
            "outcome": self.outcome, "error": self.error, "inlineReply": self.inline_reply,
            "replayOf": self.replay_of,
        }  # fmt: skip


class CallbackDriver:
    """Sends signed bot-message callbacks to bots in webhook mode, as DingTalk does."""

    def __init__(self, emu: Emulator, *, answer_timeout: float = CALLBACK_TIMEOUT,
                 records: list[CallbackRecord] | None = None) -> None:
        self.emu = emu
        self.answer_timeout = answer_timeout
        #: Every callback sent, in order (may be shared between drivers of the same emulator).
        self.records: list[CallbackRecord] = [] if records is None else records
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(answer_timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- acting as DingTalk -----------------------------------------------------------------------

    async def send_user_message(
        self,
        url: str,
        text: str = "hello",
        *,
        secret: str | None = None,
        timestamp_ms: int | None = None,
        sign: str | None = None,
        tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        msgtype: str = "text",
        conversation_type: str = "single",
        sender_staff_id: str | None = None,
        sender_nick: str | None = None,
        conversation_id: str | None = None,
        conversation_title: str | None = None,
        at_bot: bool = True,
        at_users: list[str] | tuple[str, ...] = (),
        content: dict[str, Any] | None = None,
        rich_text: list[dict[str, Any]] | None = None,
        file: dict[str, Any] | None = None,
        **fields: Any,
    ) -> CallbackRecord:
        """A user sends the robot a message; DingTalk POSTs it, signed, to ``url``.

        Message options are those of ``Emulator.send_user_message``. Signing: ``secret`` defaults
        to the emulator app's secret, ``timestamp_ms`` to the emulator clock (a stale or future one
        tests the window), ``sign`` overrides the computed signature; ``tamper`` may rewrite the
        payload *after* signing (the signature does not cover the body). A group message without
        ``at_bot`` is not sent (DingTalk's rule) and gets outcome ``not_delivered``.
        """
        state = self.emu.state
        payload, record = self._user_message(
            text, msgtype=msgtype, conversation_type=conversation_type, sender_staff_id=sender_staff_id,
            sender_nick=sender_nick, conversation_id=conversation_id, conversation_title=conversation_title,
            at_bot=at_bot, at_users=at_users, content=content, rich_text=rich_text, file=file, fields=fields,
        )  # fmt: skip
        if tamper is not None:
            payload = tamper(dict(payload))
        timestamp = str(state.clock.epoch_ms() if timestamp_ms is None else timestamp_ms)
        secret = self.emu.settings.client_secret if secret is None else secret
        headers = {
            "content-type": "application/json; charset=utf-8",
            "timestamp": timestamp,
            "sign": sign_callback(secret, timestamp) if sign is None else sign,
        }
        body = msgspec.json.encode(payload)
        if _CONVERSATION_TYPES[conversation_type] == "2" and not at_bot:
            record.note = "not delivered: in groups DingTalk only pushes messages that @ the robot"
            callback = self._new_record(url, headers, body, record)
            callback.outcome = "not_delivered"
            state.notifier.notify()
            return callback
        callback = await self._post(self._new_record(url, headers, body, record))
        record.delivered = callback.status == 200
        record.note = "" if record.delivered else f"callback answered {callback.outcome} ({callback.status})"
        state.notifier.notify()
        return callback

    async def replay(self, record: CallbackRecord, *, body: bytes | None = None) -> CallbackRecord:
        """POST ``record``'s request again with the same headers (and ``body``, default the same)."""
        again = CallbackRecord(seq=self.emu.state.next_seq(), url=record.url, headers=dict(record.headers),
                               body=record.body if body is None else body, msg_id=record.msg_id,
                               conversation_id=record.conversation_id, replay_of=record.seq)  # fmt: skip
        self.records.append(again)
        return await self._post(again)

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> CallbackRecord:
        """POST anything (hostile-input tests): the answer is recorded like any callback."""
        record = CallbackRecord(seq=self.emu.state.next_seq(), url=url, headers=dict(headers), body=body)
        self.records.append(record)
        return await self._post(record)

    # --- inspection ------------------------------------------------------------------------------

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    # --- internals -------------------------------------------------------------------------------

    def _new_record(self, url: str, headers: dict[str, str], body: bytes, message: UserMessage) -> CallbackRecord:
        record = CallbackRecord(seq=self.emu.state.next_seq(), url=url, headers=headers, body=body,
                                msg_id=message.msg_id, conversation_id=message.conversation_id)  # fmt: skip
        self.records.append(record)
        return record

    def _user_message(self, text: str, *, msgtype: str, conversation_type: str, sender_staff_id: str | None,
                      sender_nick: str | None, conversation_id: str | None, conversation_title: str | None,
                      at_bot: bool, at_users: list[str] | tuple[str, ...], content: dict[str, Any] | None,
                      rich_text: list[dict[str, Any]] | None, file: dict[str, Any] | None,
                      fields: dict[str, Any]) -> tuple[dict[str, Any], UserMessage]:
        """Build the payload and put the user's message in its conversation (as a Stream push does)."""
        return self.emu.prepare_user_message(
            text, msgtype=msgtype, conversation_type=conversation_type, sender_staff_id=sender_staff_id,
            sender_nick=sender_nick, conversation_id=conversation_id, conversation_title=conversation_title,
            at_bot=at_bot, at_users=at_users, content=content, rich_text=rich_text, file=file, fields=fields,
        )

    async def _post(self, record: CallbackRecord) -> CallbackRecord:
        try:
            response = await self._http.post(record.url, content=record.body, headers=record.headers)
        except httpx.TimeoutException:
            record.outcome, record.error = "timeout", f"no answer within {self.answer_timeout} s"
            return self._done(record)
        except httpx.HTTPError as exc:
            record.outcome, record.error = "error", f"{type(exc).__name__}: {exc}"
            return self._done(record)
        record.status = response.status_code
        try:
            record.response = response.json()
        except ValueError:
            record.response = response.text
        if response.status_code != 200:
            record.outcome = "refused"
            return self._done(record)
        answer = record.response
        if isinstance(answer, dict) and answer.get("msgtype") == "empty":
            record.outcome = "empty"
            return self._done(record)
        try:
            msgtype, title, text, at = validate_webhook_body(answer)
        except OapiError as exc:
            record.outcome, record.error = "bad_answer", str(exc)
            return self._done(record)
        record.outcome = "answered"
        if record.conversation_id is not None and record.conversation_id in self.emu.state.conversations:
            state = self.emu.state
            message = state.add_bot_message(BotMessage(
                seq=state.next_seq(), conversation_id=record.conversation_id, via="callbackResponse",
                msgtype=msgtype, text=text, title=title, created_ms=state.clock.epoch_ms(), body=answer, at=at))
            record.inline_reply = message.to_dict()
        return self._done(record)

    def _done(self, record: CallbackRecord) -> CallbackRecord:
        self.emu.state.notifier.notify()
        return record


@asynccontextmanager
async def open_callbacks(emu: Emulator, *, answer_timeout: float = CALLBACK_TIMEOUT,
                         records: list[CallbackRecord] | None = None) -> AsyncIterator[CallbackDriver]:
    """A ``CallbackDriver`` for ``emu`` whose HTTP client is closed afterwards."""
    driver = CallbackDriver(emu, answer_timeout=answer_timeout, records=records)
    try:
        yield driver
    finally:
        await driver.aclose()


# --- control API ----------------------------------------------------------------------------------

#: Callback records of each emulator sent through the control API (kept as long as the emulator).
_CONTROL_RECORDS: WeakKeyDictionary[Emulator, list[CallbackRecord]] = WeakKeyDictionary()
_SIGNING_KEYS: dict[str, type | tuple[type, ...]] = {"url": str, "secret": str, "timestampMs": int, "sign": str, "answerTimeout": (int, float)}


def callback_routes(emu: Emulator) -> list[BaseRoute]:
    """Control-API routes driving webhook mode (errors answer ``{"error"}`` with 400/404):

    * ``POST /_emulator/webhook-callbacks``: ``{"url", "text", ...}`` (``url`` required; the message
      fields of ``POST /_emulator/messages``; optional ``secret``, ``timestampMs``, ``sign``,
      ``answerTimeout``): a user message POSTed, signed, to ``url``; answers the record.
    * ``POST /_emulator/webhook-callbacks/{seq}/replay``: the same request again.
    * ``GET /_emulator/webhook-callbacks``: every record.
    """
    records = _CONTROL_RECORDS.setdefault(emu, [])

    def route(method: str, path: str, handler: Callable[[Request], Awaitable[Any]]) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(await handler(request))
            except EmulatorError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)

        return Route(path, endpoint, methods=[method])

    async def send(request: Request) -> Any:
        from .control import ControlApi

        body = await _json_object(request)
        signing: dict[str, Any] = {}
        for key, kind in _SIGNING_KEYS.items():
            value = body.pop(key, None)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise EmulatorError(f"{key!r} has the wrong type ({type(value).__name__})")
            signing[key] = value
        if not signing["url"]:
            raise EmulatorError("'url' is required: the bot's callback URL")
        if "topic" in body:
            raise EmulatorError("'topic' does not apply: HTTP callbacks carry bot messages only")
        kwargs = ControlApi._message_kwargs(body)
        timeout = signing["answerTimeout"] or CALLBACK_TIMEOUT
        async with open_callbacks(emu, answer_timeout=timeout, records=records) as driver:
            record = await driver.send_user_message(
                signing["url"], secret=signing["secret"], timestamp_ms=signing["timestampMs"],
                sign=signing["sign"], **kwargs)  # fmt: skip
        return record.to_dict()

    async def replay(request: Request) -> Any:
        seq = request.path_params["seq"]
        original = next((r for r in records if str(r.seq) == seq), None)
        if original is None:
            raise NotFound(f"no callback record {seq!r}")
        async with open_callbacks(emu, records=records) as driver:
            return (await driver.replay(original)).to_dict()

    async def listing(request: Request) -> Any:
        return [r.to_dict() for r in records]

    return [
        route("POST", "/_emulator/webhook-callbacks", send),
        route("GET", "/_emulator/webhook-callbacks", listing),
        route("POST", "/_emulator/webhook-callbacks/{seq}/replay", replay),
    ]


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise EmulatorError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EmulatorError("request body must be a JSON object")
    return value
