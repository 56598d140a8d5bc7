"""A generic HTTP JSON backend for in-house NLP services.

The request body is the ``body`` table of the backend's configuration with ``${name}`` placeholders
filled in. A string that is exactly one placeholder is replaced by the value itself (so
``history = "${history}"`` becomes a JSON list); a placeholder inside a longer string is replaced by
its text. The answer is read from the response JSON at ``answer_path``: dot-separated keys and list
indexes, e.g. ``data.answer`` or ``choices.0.text``. Variables:

=================  =====================================================================
``text``           the user's message
``system``         the system prompt
``messages``       the whole context, ``[{"role": ..., "content": ...}, ...]``
``history``        the remembered turns only, same shape
``model``          always ``""`` (the service chooses)
``conversation_id``, ``user_id``, ``user_name``, ``request_id``
=================  =====================================================================
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import trio

from host_nlp_bridge.backends.base import (
    Item,
    auth_headers,
    make_client,
    raise_for_status,
    translate_errors,
)
from host_nlp_bridge.config import BackendConfig
from host_nlp_bridge.errors import BadResponse
from host_nlp_bridge.model import ChatRequest

__all__ = ["HttpJsonBackend", "extract", "render"]

_WHOLE = re.compile(r"^\$\{(\w+)\}$")
_PART = re.compile(r"\$\{(\w+)\}")
_encode = msgspec.json.Encoder().encode


def variables(request: ChatRequest) -> dict[str, Any]:
    """The values ``${name}`` placeholders stand for."""
    return {
        "text": request.text,
        "system": request.system,
        "messages": [m.as_dict() for m in request.messages],
        "history": [m.as_dict() for m in request.history],
        "model": "",
        "conversation_id": request.conversation_id,
        "user_id": request.user_id,
        "user_name": request.user_name,
        "request_id": request.request_id,
    }


def render(template: Any, values: dict[str, Any]) -> Any:
    """``template`` with its placeholders filled in from ``values`` (see the module docstring)."""
    if isinstance(template, str):
        whole = _WHOLE.match(template)
        if whole:
            return values[whole.group(1)]
        return _PART.sub(lambda m: _as_text(values[m.group(1)]), template)
    if isinstance(template, dict):
        return {key: render(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, values) for value in template]
    return template


def _names(template: Any) -> set[str]:
    if isinstance(template, str):
        return set(_PART.findall(template))
    if isinstance(template, dict):
        return set().union(*map(_names, template.values()))
    if isinstance(template, list):
        return set().union(*map(_names, template))
    return set()


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else _encode(value).decode()


def extract(document: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``document``; ``KeyError`` naming the missing step."""
    node = document
    walked: list[str] = []
    for step in path.split("."):
        walked.append(step)
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.lstrip("-").isdigit() and -len(node) <= int(step) < len(node):
            node = node[int(step)]
        else:
            raise KeyError(".".join(walked))
    return node


class HttpJsonBackend:
    """One request, one JSON answer (no streaming)."""

    kind = "http_json"
    can_stream = False
    model = ""

    def __init__(self, name: str, settings: BackendConfig) -> None:
        self.name = name
        self.settings = settings
        self._client = make_client(settings)
        self.stall_timeout: float | None = settings.read_timeout
        used = _names(settings.body)
        # Variables that differ between users for the same context keep their answers apart.
        self._identity = tuple(sorted(used & {"conversation_id", "user_id", "user_name", "request_id"}))

    def key_extra(self, request: ChatRequest) -> tuple[str, ...]:
        values = variables(request)
        return tuple(f"{name}={values[name]}" for name in self._identity)

    def describe(self) -> str:
        url = httpx.URL(self.settings.url).copy_with(username=None, password=None, query=None)
        return f"{self.name} (http_json {self.settings.method} {url}, answer at {self.settings.answer_path})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def generate(self, request: ChatRequest) -> AsyncIterator[Item]:
        body = render(self.settings.body, variables(request))
        headers = auth_headers(self.settings)
        headers["Content-Type"] = "application/json"
        with translate_errors(self.name):
            response = await self._client.request(
                self.settings.method, self.settings.url, content=_encode(body), headers=headers
            )
        try:
            await raise_for_status(self.name, response)
            try:
                document = msgspec.json.decode(response.content)
            except msgspec.DecodeError as exc:
                raise BadResponse(self.name, f"invalid JSON response ({exc}): {response.content[:80]!r}") from None
            try:
                answer = extract(document, self.settings.answer_path)
            except KeyError as exc:
                raise BadResponse(
                    self.name, f"answer_path {self.settings.answer_path!r}: nothing at {exc.args[0]!r} in the response"
                ) from None
            if not isinstance(answer, str):
                raise BadResponse(
                    self.name, f"answer_path {self.settings.answer_path!r} holds {type(answer).__name__}, not text"
                )
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()
        yield answer
