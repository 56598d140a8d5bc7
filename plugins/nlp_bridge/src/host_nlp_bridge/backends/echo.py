"""The built-in echo backend: answers with the user's own words, saying that it is echo.

It is what answers when no NLP service is configured, so a fresh install replies to everything
(and says why the reply is an echo). It streams word by word, so it exercises the streamed-reply
path (an AI card on DingTalk) exactly like a real model. ``delay`` and ``chunk_delay`` make it slow
on purpose, for demos and tests.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import trio

from host_nlp_bridge.backends.base import Item
from host_nlp_bridge.config import BackendConfig
from host_nlp_bridge.memory import estimate_tokens
from host_nlp_bridge.model import ChatRequest, Usage

__all__ = ["ECHO_PREFIX", "EchoBackend"]

#: Every echo reply starts with this, so nobody mistakes it for a model's answer.
ECHO_PREFIX = "[echo] "
_WORDS = re.compile(r"\S+\s*|\s+")


class EchoBackend:
    """Repeats the user's message, prefixed with ``[echo]``."""

    kind = "echo"
    can_stream = True
    model = "echo"
    def __init__(self, name: str, settings: BackendConfig) -> None:
        self.name = name
        self.settings = settings
        #: Echo's deliberate delays are not bounded by any timeout of its own; without delays it
        #: never waits (0.0), so the bridge can skip the cancel scope per streamed word.
        self.stall_timeout: float | None = None if settings.delay or settings.chunk_delay else 0.0

    def describe(self) -> str:
        return f"{self.name} (built-in echo: replies repeat the message, prefixed {ECHO_PREFIX.strip()!r})"

    def key_extra(self, request: ChatRequest) -> tuple[str, ...]:
        return ()

    async def aclose(self) -> None:
        return None

    async def generate(self, request: ChatRequest) -> AsyncIterator[Item]:
        answer = ECHO_PREFIX + request.text
        if self.settings.delay:
            await trio.sleep(self.settings.delay)
        if request.stream:
            for i, word in enumerate(_WORDS.findall(answer)):
                if i and self.settings.chunk_delay:
                    await trio.sleep(self.settings.chunk_delay)
                yield word
        else:
            yield answer
        yield Usage(sum(estimate_tokens(m.content) for m in request.messages), estimate_tokens(answer))
