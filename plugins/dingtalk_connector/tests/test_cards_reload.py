"""Hot-reloading the connector plugin while an AI card streams: the card still ends finalized with the
whole answer, the new version streams its own cards, and the old HTTP client is closed afterwards."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from outkit import TEMPLATE, open_bot

from host import Message, hookimpl

LIMIT = 60


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


@pytest.fixture(autouse=True)
def _restore_modules() -> Iterator[None]:
    """A reload re-imports ``host_dingtalk_connector``: put the original modules back afterwards, so
    the tests that run next see the same classes as the modules they imported."""
    saved = {
        k: m
        for k, m in sys.modules.items()
        if k == "host_dingtalk_connector" or k.startswith("host_dingtalk_connector.")
    }
    yield
    for key in [
        k
        for k in sys.modules
        if k == "host_dingtalk_connector" or k.startswith("host_dingtalk_connector.")
    ]:
        del sys.modules[key]
    sys.modules.update(saved)


class Streamer:
    """Answers ``<text>: chunk0 chunk1 ...`` slowly, streamed."""

    @hookimpl
    async def on_message(self, message: Message) -> Any:
        async def chunks() -> Any:
            yield f"{message.text}:"
            for i in range(25):
                await trio.sleep(0.05)
                yield f" chunk{i}"

        return chunks()


EXPECTED = "".join(f" chunk{i}" for i in range(25))


@pytest.mark.anyio
async def test_reloading_the_plugin_mid_stream_finishes_the_open_card() -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_bot(
                emu,
                ("streamer", Streamer()),
                dingtalk={"cards": {"template_id": TEMPLATE, "min_interval": 0.05}},
            ) as host,
        ):
            old = host.connectors["dingtalk"]
            before = await emu.send_user_message(
                "before", conversation_type="group", conversation_id="cidBefore"
            )
            await emu.wait_for_card(conversation_id=before["conversationId"], state="INPUTING")
            result = await host.reloader.reload_plugin("dingtalk_connector", reason="test")
            assert result.outcome == "reloaded", result
            new = host.connectors["dingtalk"]
            assert new is not old
            card = await emu.wait_for_card(conversation_id=before["conversationId"])
            assert card["state"] == "FINISHED" and card["text"] == "before:" + EXPECTED
            # The old version's HTTP client closes once its last stream ended.
            await host.wait_idle()
            assert old.outbound.http.is_closed  # type: ignore[attr-defined]
            after = await emu.send_user_message(
                "after", conversation_type="group", conversation_id="cidAfter"
            )
            card = await emu.wait_for_card(conversation_id=after["conversationId"])
            assert card["state"] == "FINISHED" and card["text"] == "after:" + EXPECTED
            assert len(card["streams"]) >= 3  # the new version streams (its card loops run)
            assert not new.outbound.http.is_closed  # type: ignore[attr-defined]


class Recorder:
    """Keeps the messages it sees and does not answer them (the test answers through the connector)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = trio.Event()

    @hookimpl
    def on_message(self, message: Message) -> None:
        self.messages.append(message)
        self.arrived.set()


@pytest.mark.anyio
async def test_retired_connector_answers_until_stopped_and_idle() -> None:
    # On a reload, on_shutdown only flags the old connector: it must keep answering the messages it
    # accepted until its successor is up and it is stopped, then close its HTTP client once idle.
    from host import Reply

    recorder = Recorder()
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_bot(emu, ("recorder", recorder)) as host:
            old = host.connectors["dingtalk"]
            first = await emu.send_user_message("first", sender_staff_id="u1")
            second = await emu.send_user_message("second", sender_staff_id="u2")
            while len(recorder.messages) < 2:
                recorder.arrived = trio.Event()
                await recorder.arrived.wait()
            by_text = {m.text: m for m in recorder.messages}
            old.retire_when_stopped()
            await old.deliver(by_text["first"], Reply.text_("still answering"))
            await emu.wait_for_bot_message(first["conversationId"], count=1)
            stream = await old.open_stream(by_text["second"])
            await old.stop()
            assert not old.outbound.http.is_closed  # a streamed reply of its own is still open
            await stream.append("streamed after stop")
            await stream.finish()
            assert old.outbound.http.is_closed
            await emu.wait_for_bot_message(second["conversationId"], count=1)
            assert "streamed after stop" in emu.bot_messages(second["conversationId"])[0]["text"]
