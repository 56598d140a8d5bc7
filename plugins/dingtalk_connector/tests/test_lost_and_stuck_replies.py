"""Red team: replies lost, stuck or mangled (peers.md 12-C/D/E/J): edges the other reply tests miss.

Everything runs against the real emulator over 127.0.0.1 on the real clock (small intervals).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import hypercorn.trio
import pytest
import trio
import trio.lowlevel
from host_dingtalk_connector.cards import AICardStream, CardSettings, CollectedStream
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.replies import ReplySettings
from hypercorn.config import Config
from outkit import TEMPLATE, app_for, nlp_bridge_plugin, open_bot, open_outbound, user_message
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host import Message, hookimpl
from host.model import Reply

LIMIT = 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


class FaultyGateway:
    """A real HTTP proxy in front of the emulator's OpenAPIs that breaks chosen calls.

    ``faults["POST /v1.0/card/instances/createAndDeliver"] = ["after"]`` makes the next such call
    reach DingTalk (the emulator) and then answer 502, as a load balancer that lost the answer does;
    ``"before"`` answers 502 without forwarding. Each entry is used once.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.faults: dict[str, list[str]] = {}
        self.url = ""

    async def handle(self, request: Request) -> Response:
        api = f"{request.method} {request.url.path}"
        pending = self.faults.get(api) or []
        action = pending.pop(0) if pending else None
        if action == "before":
            return Response(b'{"code":"BadGateway","message":"upstream"}', status_code=502)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with httpx.AsyncClient() as client:
            answer = await client.request(request.method, self.target + request.url.path,
                                          params=request.query_params, content=await request.body(),
                                          headers=headers)  # fmt: skip
        if action == "after":
            return Response(b'{"code":"BadGateway","message":"upstream"}', status_code=502)
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))  # fmt: skip


@asynccontextmanager
async def open_faulty_gateway(target: str) -> AsyncIterator[FaultyGateway]:
    gateway = FaultyGateway(target)
    app = Starlette(routes=[Route("/{path:path}", gateway.handle, methods=["GET", "POST", "PUT"])])
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        (bound,) = await nursery.start(partial(hypercorn.trio.serve, app, config, mode="asgi"))  # type: ignore[arg-type]
        gateway.url = bound
        try:
            yield gateway
        finally:
            nursery.cancel_scope.cancel()


def card_settings(**overrides: Any) -> CardSettings:
    values: dict[str, Any] = {"template_id": TEMPLATE, "min_interval": 0.05}
    values.update(overrides)
    return CardSettings(**values)


# -- splitting long replies --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_small_message_max_bytes_still_delivers_every_reply() -> None:
    """``message_max_bytes`` accepts 100..15000, yet below 600 every reply raised ValueError."""
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, replies=ReplySettings(message_max_bytes=400)) as outbound,
        ):
            message, sent = await user_message(emu, "hi", conversation_type="group")
            await outbound.deliver(message, Reply.text_("short answer"))
            long = " ".join(f"w{i}" for i in range(300))
            await outbound.deliver(message, Reply.markdown(long))
            replies = emu.bot_messages(sent["conversationId"])
            assert replies[0]["text"] == "short answer"
            assert "".join(r["text"] for r in replies[1:]) == long
            assert all(len(r["text"].encode()) <= 400 for r in replies)


@pytest.mark.anyio
async def test_a_long_multiline_answer_through_the_openapi_fits_dingtalks_msgparam_limit() -> None:
    """Newlines and quotes are escaped in ``msgParam`` (a JSON string): a 14 KB code answer grows
    past the 15 000-byte group limit and DingTalk refused it: the user got nothing."""
    code = "".join(f'print("line {i}")\n' for i in range(800))  # ~16 KB of short lines
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            message, sent = await user_message(emu, "show me code", conversation_type="group")
            assert emu.faults.expire_sessions() == 1  # a long task: the webhook has expired
            await outbound.deliver(message, Reply.markdown(code))
            replies = emu.bot_messages(sent["conversationId"])
            assert {r["via"] for r in replies} == {"groupMessages"}
            assert "".join(r["text"] for r in replies) == code
            for call in emu.calls("POST /v1.0/robot/groupMessages/send"):
                assert call["status"] == 200, call["response"]


# -- streams that produce nothing visible --------------------------------------------------------------


@pytest.mark.anyio
async def test_a_whitespace_only_answer_never_leaves_a_blank_card_or_message() -> None:
    """A model that streams only blank lines: the card must not finish blank (12-D, "blank card")."""
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu:
            async with open_outbound(emu, cards=card_settings()) as outbound:
                message, sent = await user_message(emu, "q", conversation_type="group")
                stream = await outbound.open_stream(message)
                assert isinstance(stream, AICardStream)
                for chunk in ("\n", "  ", "\n\n", " "):
                    await stream.append(chunk)
                    await trio.sleep(0.06)
                await stream.finish()
                card = emu.card(stream.out_track_id)
                assert card["state"] == "FINISHED"
                assert card["text"] == "(The answer was empty.)"
                assert all(s["content"].strip() for s in card["streams"])  # no blank update either
            async with open_outbound(emu) as outbound:  # no template: one message at the end
                message, sent = await user_message(
                    emu, "q", conversation_type="group", conversation_id="cidBlank"
                )
                collected = await outbound.open_stream(message)
                assert isinstance(collected, CollectedStream)
                await collected.append("\n \n")
                await collected.finish()
                (reply,) = emu.bot_messages(sent["conversationId"])
                assert reply["text"] == "(The answer was empty.)"


# -- a card created although its creation "failed" ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("conversation_type", ["group", "single"])
async def test_a_card_created_but_answered_502_is_used_not_left_generating_beside_a_message(
    conversation_type: str,
) -> None:
    """createAndDeliver reached DingTalk but its answer was lost (502): the retry with the same
    outTrackId is refused as "already exists"; the card must still be streamed and finalized."""
    create = "POST /v1.0/card/instances/createAndDeliver"
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_faulty_gateway(emu.base_url) as gateway:
            app = app_for(emu, openapi_endpoint=gateway.url)
            async with open_outbound(emu, apps=[app], cards=card_settings()) as outbound:
                message, sent = await user_message(emu, "q", conversation_type=conversation_type)
                gateway.faults[create] = ["after"]
                stream = await outbound.open_stream(message)
                await stream.append("the whole answer")
                await stream.finish()
                replies = emu.bot_messages(sent["conversationId"])
                assert len(replies) == 1, replies  # one answer, not a stuck card plus a message
                (reply,) = replies
                assert reply["via"] == "card"
                assert reply["card"]["state"] == "FINISHED"
                assert reply["card"]["text"] == "the whole answer"


# -- the access token expires mid-stream ---------------------------------------------------------------


@pytest.mark.anyio
async def test_tokens_expiring_mid_stream_refresh_once_and_every_card_finishes_complete() -> None:
    words = [f"w{i} " for i in range(40)]
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, cards=card_settings()) as outbound,
        ):
            streams = []
            for i in range(5):
                message, _ = await user_message(
                    emu, "q", conversation_type="group", conversation_id=f"cidTok{i}",
                    sender_staff_id=f"user{i}",
                )  # fmt: skip
                streams.append(await outbound.open_stream(message))
            tokens = outbound.clients["default"].tokens
            before = tokens.requests

            async def write(stream: Any) -> None:
                for n, word in enumerate(words):
                    await stream.append(word)
                    await trio.sleep(0.01)
                    if n == 20 and stream is streams[0]:
                        assert emu.faults.expire_tokens() == 1
                await stream.finish()

            async with trio.open_nursery() as nursery:
                for stream in streams:
                    nursery.start_soon(write, stream)
            assert tokens.requests == before + 1  # one refresh, not one per card
            for stream in streams:
                card = emu.card(stream.out_track_id)
                assert (card["state"], card["text"]) == ("FINISHED", "".join(words))
            refused = [c for c in emu.calls("PUT /v1.0/card/streaming") if c["status"] != 200]
            assert {c["code"] for c in refused} <= {"InvalidAuthentication"}


# -- the NLP bridge's backend is down -------------------------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.anyio
@pytest.mark.parametrize("template", [TEMPLATE, ""])
async def test_a_dead_language_backend_gives_an_apology_even_after_the_session_expired(
    template: str,
) -> None:
    """The LLM is unreachable and the session webhook expired meanwhile: the user still gets the
    bridge's apology (on the card, or as a message through the OpenAPI), never silence."""
    bridge = nlp_bridge_plugin()
    if bridge is None:
        pytest.skip("the NLP bridge plugin is not installed")
    section = {
        "reply_format": "text",
        "backends": {"llm": {"type": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
                             "model": "m", "max_attempts": 1, "connect_timeout": 2.0}},
        "limits": {"user_rate_per_minute": 0},
    }  # fmt: skip
    with trio.fail_after(LIMIT):
        async with (
            open_emulator(session_webhook_ttl=1.0) as emu,  # expired by the time of the answer
            open_bot(
                emu, ("nlp_bridge", bridge), sections={"nlp_bridge": section},
                dingtalk={"cards": {"template_id": template}},
            ) as host,
        ):  # fmt: skip
            sent = await emu.send_user_message("hello?", conversation_type="group")
            await emu.wait_for_bot_message(sent["conversationId"])
            await host.wait_idle()
            (reply,) = emu.bot_messages(sent["conversationId"])
            if template:
                assert reply["via"] == "card" and reply["card"]["state"] in ("FINISHED", "FAILED")
                text = reply["card"]["text"]
            else:
                assert reply["via"] == "groupMessages"
                text = reply["text"]
            assert text.startswith("Sorry"), text


# -- one huge chunk, thousands of tiny ones --------------------------------------------------------------

CONTINUED = "\n\n*(continued below)*"


@pytest.mark.anyio
async def test_huge_and_tiny_chunk_streams_arrive_whole_after_the_session_expired() -> None:
    """One 20 KB chunk of CJK, emoji and code (1:1 chat), and 3000 one-character chunks (group):
    the cards finish, nothing is lost or doubled, the overflow goes through the OpenAPI."""
    huge = "".join(f'第{i}段：你好👋🏽 `x = "{i}"`\n' for i in range(500))
    tiny = "".join(chr(0x4E00 + i % 500) for i in range(900))  # 2700 bytes: fits the card

    class Answers:
        @hookimpl
        async def on_message(self, message: Message) -> Any:
            async def chunks() -> Any:
                if message.text == "huge":
                    yield huge
                    return
                for char in tiny:
                    await trio.lowlevel.checkpoint()
                    yield char

            return chunks()

    with trio.fail_after(LIMIT):
        async with (
            open_emulator(session_webhook_ttl=1.0) as emu,
            open_bot(
                emu, ("answers", Answers()), dingtalk={"cards": {"template_id": TEMPLATE}}
            ) as host,
        ):
            big = await emu.send_user_message("huge", conversation_type="single")
            small = await emu.send_user_message("tiny", conversation_type="group")
            await emu.wait_for_card(conversation_id=big["conversationId"])
            await emu.wait_for_card(conversation_id=small["conversationId"])
            await host.wait_idle()
            first, *rest = emu.bot_messages(big["conversationId"])
            card = first["card"]
            assert card["state"] == "FINISHED" and card["text"].endswith(CONTINUED)
            assert len(card["text"].encode()) <= 3000
            assert rest and {m["via"] for m in rest} == {"oToMessages"}
            shown = card["text"][: -len(CONTINUED)]
            assert huge.startswith(shown)
            assert shown + "\n" + "".join(m["text"] for m in rest) == huge  # cut at a line end
            (only,) = emu.bot_messages(small["conversationId"])
            assert (only["card"]["state"], only["card"]["text"]) == ("FINISHED", tiny)
            assert len(only["card"]["streams"]) < 60  # coalesced, not one update per character
