"""OpenAI-compatible Chat Completions (vLLM, Ollama, Xinference, LM Studio, one-api, ...).

``POST {base_url}/chat/completions`` with the conversation; when streaming, the answer arrives as
Server-Sent Events, one JSON chunk per ``data:`` line, ending with ``data: [DONE]``. A stream that
ends without ``[DONE]`` (or a ``finish_reason``) was cut: that is reported as ``BackendUnavailable``
so the bridge can tell a complete answer from a truncated one. A server that answers a streaming
request with plain JSON is understood too.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import msgspec
import trio
from httpx_sse import EventSource, ServerSentEvent, SSEError

from host.logs import logger
from host_nlp_bridge.backends.base import (
    Item,
    auth_headers,
    close_stream,
    make_client,
    raise_for_status,
    translate_errors,
)
from host_nlp_bridge.config import BackendConfig
from host_nlp_bridge.errors import BackendUnavailable, BadResponse
from host_nlp_bridge.model import ChatRequest, Usage

__all__ = ["OpenAIBackend"]


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _StreamChunk(msgspec.Struct):
    choices: list[_StreamChoice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model] = msgspec.field(default_factory=list)


#: Seconds to wait for the end of the body after [DONE] (servers close it at once).
_DRAIN_TIMEOUT = 1.0

_decode_chunk = msgspec.json.Decoder(_StreamChunk).decode
_decode_completion = msgspec.json.Decoder(_Completion).decode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_encode = msgspec.json.Encoder().encode


class OpenAIBackend:
    """A Chat Completions backend."""

    kind = "openai"

    def __init__(self, name: str, settings: BackendConfig) -> None:
        self.name = name
        self.settings = settings
        self.model = settings.model
        self.can_stream = settings.stream
        self._base = settings.base_url.rstrip("/")
        self._client = make_client(settings)
        self.stall_timeout: float | None = settings.read_timeout
        self._model_lock = trio.Lock()

    def describe(self) -> str:
        url = httpx.URL(self._base).copy_with(username=None, password=None)
        model = self.model or "(first listed by the server)"
        return f"{self.name} (openai {url}, model {model}{', streaming' if self.can_stream else ''})"

    def key_extra(self, request: ChatRequest) -> tuple[str, ...]:
        return ()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def resolve_model(self) -> str:
        """The configured model, or the first one the server's ``/models`` lists (asked once)."""
        if self.model:
            return self.model
        async with self._model_lock:
            if not self.model:
                with translate_errors(self.name):
                    response = await self._client.get(f"{self._base}/models", headers=auth_headers(self.settings))
                await raise_for_status(self.name, response)
                try:
                    models = _decode_models(response.content)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise BadResponse(self.name, f"invalid /models response: {exc}") from None
                if not models.data:
                    raise BadResponse(self.name, "no model configured and the server's /models lists none")
                self.model = models.data[0].id
                logger.info("nlp_bridge: backend {} uses model {!r} (the first its server lists)", self.name, self.model)
        return self.model

    async def generate(self, request: ChatRequest) -> AsyncIterator[Item]:
        model = await self.resolve_model()
        stream = request.stream and self.can_stream
        body: dict[str, Any] = {
            **self.settings.params,
            "model": model,
            "messages": [m.as_dict() for m in request.messages],
            "stream": stream,
        }
        headers = auth_headers(self.settings)
        headers["Content-Type"] = "application/json"
        if stream:
            headers["Accept"] = "text/event-stream"
            if self.settings.stream_usage:
                body["stream_options"] = {"include_usage": True}
        outgoing = self._client.build_request(
            "POST", f"{self._base}/chat/completions", content=_encode(body), headers=headers
        )
        with translate_errors(self.name):
            response = await self._client.send(outgoing, stream=True)
        events: AsyncGenerator[ServerSentEvent, None] | None = None
        try:
            await raise_for_status(self.name, response)
            if "text/event-stream" not in response.headers.get("content-type", ""):
                with translate_errors(self.name):
                    raw = await response.aread()
                for item in self._read_completion(raw):
                    yield item
                return
            events = EventSource(response).aiter_sse()
            done = finish_seen = False
            with translate_errors(self.name):
                while not done:
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        break
                    except SSEError as exc:
                        raise BadResponse(self.name, f"malformed SSE stream: {exc}") from None
                    data = event.data.strip()
                    if data == "[DONE]":
                        done = True
                    elif data:
                        chunk = self._decode_event(data)
                        for choice in chunk.choices:
                            if choice.delta is not None and choice.delta.content:
                                yield choice.delta.content
                            finish_seen = finish_seen or bool(choice.finish_reason)
                        if chunk.usage is not None:
                            yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            # A finish_reason without [DONE] is a complete answer; neither means it was cut off.
            if not (done or finish_seen):
                raise BackendUnavailable(self.name, "the stream ended before [DONE]: the answer was cut off")
            if done and await _read_to_end(events):
                events = None  # exhausted: nothing left for close_stream to unwind
        finally:
            await close_stream(response, events)

    def _decode_event(self, data: str) -> _StreamChunk:
        try:
            chunk = _decode_chunk(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadResponse(self.name, f"malformed SSE data ({exc}): {data[:80]!r}") from None
        if chunk.error is not None:
            raise BadResponse(self.name, f"the server reported an error mid-stream: {chunk.error!r:.200}")
        return chunk

    def _read_completion(self, raw: bytes) -> list[Item]:
        try:
            completion = _decode_completion(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadResponse(self.name, f"invalid JSON response ({exc}): {raw[:80]!r}") from None
        if completion.error is not None:
            raise BadResponse(self.name, f"the server reported an error: {completion.error!r:.200}")
        message = completion.choices[0].message if completion.choices else None
        if message is None or message.content is None:
            raise BadResponse(self.name, "the response has no choices[0].message.content")
        items: list[Item] = [message.content]
        if completion.usage is not None:
            items.append(Usage(completion.usage.prompt_tokens, completion.usage.completion_tokens))
        return items


async def _read_to_end(events: AsyncIterator[ServerSentEvent]) -> bool:
    """Consume what follows [DONE], so that the connection goes back to the pool for reuse.

    Closing a response that was not read to the end closes its connection, and the next call pays
    for a new one. Anything going wrong here is ignored: the answer is already complete. ``True``
    when the body was read to its end.
    """
    with trio.move_on_after(_DRAIN_TIMEOUT):
        try:
            async for _ in events:
                pass
        except Exception:
            return False  # the answer is complete; a late transport error only costs the connection
        return True
    return False
