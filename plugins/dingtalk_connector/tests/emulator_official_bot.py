"""A bot written with the official ``dingtalk-stream`` SDK (0.24.x), run as a subprocess by
test_emulator_fidelity.py against the emulator. Configuration comes from the environment:
``DINGTALK_OPENAPI_ENDPOINT`` (read by the SDK at import), ``EMU_CLIENT_ID``, ``EMU_CLIENT_SECRET``.

Behaviour: "markdown ..." -> reply_markdown; "card ..." -> an AI markdown card (start, two streaming
steps, finish); anything else -> reply_text "echo: ...". EVENTs of type "flaky" fail (500) the first
time; card clicks answer with a card update.
"""

from __future__ import annotations

import logging
import os
import sys

import dingtalk_stream
from dingtalk_stream import (
    AckMessage,
    CallbackHandler,
    ChatbotHandler,
    ChatbotMessage,
    EventHandler,
)


class Bot(ChatbotHandler):
    async def process(self, callback):  # type: ignore[no-untyped-def]
        message = ChatbotMessage.from_dict(callback.data)
        text = message.text.content.strip() if message.text else ""
        if text.startswith("markdown"):
            self.reply_markdown("Title", f"**{text}**", message)
        elif text.startswith("card"):
            card = self.ai_markdown_card_start(message, title="AI")
            card.ai_streaming("Thinking", append=True)
            card.ai_streaming(" about it", append=True)
            card.ai_finish(f"Final answer to {text}")
        else:
            self.reply_text(f"echo: {text}", message)
        return AckMessage.STATUS_OK, "OK"


class Events(EventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    async def process(self, event):  # type: ignore[no-untyped-def]
        if event.headers.event_type == "flaky" and event.headers.event_id not in self.failed:
            self.failed.add(event.headers.event_id)
            return AckMessage.STATUS_SYSTEM_EXCEPTION, "try again later"
        return AckMessage.STATUS_OK, "OK"


class CardClicks(CallbackHandler):
    async def process(self, callback):  # type: ignore[no-untyped-def]
        user = callback.data.get("userId", "?")
        return AckMessage.STATUS_OK, {"cardData": {"cardParamMap": {"status": f"clicked by {user}"}},
                                      "cardUpdateOptions": {"updateCardDataByKey": True}}


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    credential = dingtalk_stream.Credential(os.environ["EMU_CLIENT_ID"], os.environ["EMU_CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    client.register_all_event_handler(Events())
    client.register_callback_handler(ChatbotMessage.TOPIC, Bot())
    client.register_callback_handler(CallbackHandler.TOPIC_CARD_CALLBACK, CardClicks())
    client.start_forever()


if __name__ == "__main__":
    main()
