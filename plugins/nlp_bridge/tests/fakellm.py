"""A scriptable OpenAI-compatible server for the tests, on 127.0.0.1 (port chosen by the OS).

``open_fake_llm()`` runs hypercorn + Starlette on trio inside the test's nursery. Each request to
``/v1/chat/completions`` (or to ``/inhouse``, the http_json endpoint) takes the next step of
``script`` (or ``default`` when the script is empty) and records what it received in ``requests``
with the (virtual) time it arrived. Steps cover the faults the bridge must survive: slow first byte,
stall mid-stream, a status code (429 with Retry-After, 500, 503...), malformed SSE, a stream ending
without ``[DONE]``, invalid JSON. A connection cut in the middle of a chunked body needs a socket
we can slam shut, which an ASGI app cannot do cleanly: ``open_cutting_server`` is a raw trio
server for that.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "Answer",
    "FakeLLM",
    "Malformed",
    "Recorded",
    "Stall",
    "Status",
    "open_cutting_server",
    "open_fake_llm",
    "sse",
    "words",
]


def words(text: str) -> list[str]:
    """``text`` in word chunks, spaces kept (how the fake server streams)."""
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        out.append(word if i == 0 else " " + word)
    return out


def sse(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {"content": content} if content is not None else {}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@dataclass
class Recorded:
    """One request the server received."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float

    @property
    def messages(self) -> list[dict[str, str]]:
        return list(self.body.get("messages", []))

    @property
    def last_user(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class Answer:
    """A normal answer: SSE when the request asked to stream, JSON otherwise."""

    text: str | None = None
    first_byte_delay: float = 0.0
    chunk_delay: float = 0.0
    usage: tuple[int, int] | None = (11, 7)
    #: False: end the stream without finish_reason and [DONE] (a truncated answer, cleanly closed).
    done: bool = True


@dataclass
class Status:
    """An error status with an optional body and headers (e.g. 429 with Retry-After)."""

    code: int
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    first_byte_delay: float = 0.0


@dataclass
class Stall:
    """Stream ``before`` chunks, then go silent for ``seconds`` without closing."""

    before: list[str]
    seconds: float = 3600.0


@dataclass
class Malformed:
    """Send these raw SSE bytes (after ``before`` good chunks) and end the response."""

    raw: bytes
    before: list[str] = field(default_factory=list)


@dataclass
class InvalidJson:
    """A 200 with a body that is not JSON (``application/json`` claimed)."""

    body: bytes = b'{"choices": [ oops'


Step = Answer | Status | Stall | Malformed | InvalidJson


class FakeLLM:
    """The server's state: script, default behaviour, received requests."""

    def __init__(self) -> None:
        self.script: deque[Step] = deque()
        self.default: Step = Answer()
        self.requests: list[Recorded] = []
        self.models = ["fake-model"]
        self.url = ""
        #: How the default answer is made from the request: "You said: <last user message>".
        self.answer_for: Callable[[Recorded], str] = lambda r: f"You said: {r.last_user}"
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/inhouse", self._inhouse, methods=["POST"]),
            ]
        )

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def then(self, *steps: Step) -> FakeLLM:
        """Queue steps for the next requests, in order."""
        self.script.extend(steps)
        return self

    def chat_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    async def _record(self, request: Request) -> Recorded:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        recorded = Recorded(request.url.path, dict(request.headers), body, trio.current_time())
        self.requests.append(recorded)
        return recorded

    def _next(self) -> Step:
        return self.script.popleft() if self.script else self.default

    async def _models(self, request: Request) -> Response:
        self.requests.append(Recorded(request.url.path, dict(request.headers), None, trio.current_time()))
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: Request) -> Response:
        recorded = await self._record(request)
        step = self._next()
        stream = bool(recorded.body.get("stream"))
        if isinstance(step, Status):
            await trio.sleep(step.first_byte_delay)
            return Response(step.body, status_code=step.code, headers=step.headers)
        if isinstance(step, InvalidJson):
            return Response(step.body, media_type="application/json")
        if isinstance(step, Answer):
            await trio.sleep(step.first_byte_delay)
            text = step.text if step.text is not None else self.answer_for(recorded)
            if not stream:
                body: dict[str, Any] = {
                    "id": "c1",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                }
                if step.usage:
                    body["usage"] = {"prompt_tokens": step.usage[0], "completion_tokens": step.usage[1]}
                return JSONResponse(body)
            include_usage = bool(recorded.body.get("stream_options", {}).get("include_usage"))
            return StreamingResponse(self._answer_stream(step, text, include_usage), media_type="text/event-stream")
        if isinstance(step, Stall):
            return StreamingResponse(self._stall_stream(step), media_type="text/event-stream")
        return StreamingResponse(self._malformed_stream(step), media_type="text/event-stream")

    async def _answer_stream(self, step: Answer, text: str, include_usage: bool) -> AsyncIterator[bytes]:
        for i, piece in enumerate(words(text)):
            if i and step.chunk_delay:
                await trio.sleep(step.chunk_delay)
            yield sse(_chunk(piece))
        if step.done:
            yield sse(_chunk(None, "stop"))
            if include_usage and step.usage:
                yield sse({"choices": [], "usage": {"prompt_tokens": step.usage[0], "completion_tokens": step.usage[1]}})
            yield sse("[DONE]")

    async def _stall_stream(self, step: Stall) -> AsyncIterator[bytes]:
        for piece in step.before:
            yield sse(_chunk(piece))
        await trio.sleep(step.seconds)
        yield sse("[DONE]")

    async def _malformed_stream(self, step: Malformed) -> AsyncIterator[bytes]:
        for piece in step.before:
            yield sse(_chunk(piece))
        yield step.raw

    async def _inhouse(self, request: Request) -> Response:
        recorded = await self._record(request)
        step = self._next()
        if isinstance(step, Status):
            return Response(step.body, status_code=step.code, headers=step.headers)
        if isinstance(step, InvalidJson):
            return Response(step.body, media_type="application/json")
        answer = step.text if isinstance(step, Answer) and step.text is not None else f"in-house: {recorded.body.get('query')}"
        return JSONResponse({"code": 0, "data": {"answer": answer}})


@asynccontextmanager
async def open_fake_llm() -> AsyncIterator[FakeLLM]:
    """Serve a ``FakeLLM`` on 127.0.0.1 for the duration of the block."""
    fake = FakeLLM()
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    # Virtual time jumps while everything waits; keep idle connections open through the jumps.
    config.keep_alive_timeout = 1e6
    config.read_timeout = None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(hypercorn.trio.serve, fake.app, config))
        fake.url = urls[0]
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class CuttingServer:
    url: str
    connections: int = 0


@asynccontextmanager
async def open_cutting_server(chunks: list[str], *, chunked: bool = True) -> AsyncIterator[CuttingServer]:
    """A raw HTTP server that streams ``chunks`` as SSE, then closes the socket mid-response.

    ``chunked=True``: the body is chunked and the terminating chunk never comes (a cut connection,
    which httpx reports as a protocol error). ``chunked=False``: the body is delimited by the
    connection closing, so the cut looks like a clean end of body without ``[DONE]``.
    """

    async def handle(stream: trio.SocketStream) -> None:
        server.connections += 1
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
            0,
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
        headers = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        headers += b"transfer-encoding: chunked\r\n\r\n" if chunked else b"connection: close\r\n\r\n"
        await stream.send_all(headers)
        for piece in chunks:
            event = sse(_chunk(piece))
            await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        server = CuttingServer(f"http://127.0.0.1:{port}")
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
