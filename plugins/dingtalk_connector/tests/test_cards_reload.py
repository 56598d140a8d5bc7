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
