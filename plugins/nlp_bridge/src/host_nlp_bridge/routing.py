"""Which backend answers a message: routes by command or conversation, then the fallback order.

A command route matches a message whose first word is its ``command`` (case-insensitive); the
command is stripped from the text sent to the backend. A conversation route matches messages from
the listed conversation ids. Command routes win over conversation routes, which win over the
default backend. The backends tried are the route's backend, then each ``fallback`` backend in order
(skipping the route's own).
"""

from __future__ import annotations

from dataclasses import dataclass

from host_nlp_bridge.config import BridgeSettings, RouteConfig

__all__ = ["Route", "Router", "first_word"]


@dataclass(frozen=True, slots=True)
class Route:
    """The decision for one message."""

    #: Identifies the route (memory is kept per conversation *and* route).
    id: str
    #: Backends to try, in order.
    chain: tuple[str, ...]
    #: The text for the backend (command stripped).
    text: str
    stateless: bool
    system_prompt: str
    #: The command that matched ("" if none).
    command: str = ""


def first_word(text: str) -> tuple[str, str]:
    """``("/cmd", "rest")`` for ``"/cmd  rest"``; the word is lower-cased."""
    parts = text.strip().split(maxsplit=1)
    if not parts:
        return "", ""
    return parts[0].lower(), parts[1].strip() if len(parts) > 1 else ""


class Router:
    """Routes messages according to ``BridgeSettings``."""

    def __init__(self, settings: BridgeSettings) -> None:
        self._settings = settings
        section = settings.section
        self._commands = {r.command.lower(): (i, r) for i, r in enumerate(section.routes) if r.command}
        self._conversations: dict[str, RouteConfig] = {}
        self._route_ids: dict[int, str] = {id(r): f"route{i}" for i, r in enumerate(section.routes)}
        for r in section.routes:
            for conversation in r.conversations:
                self._conversations.setdefault(conversation, r)
        self._memory_enabled = section.memory.enabled

    def route(self, conversation_id: str, text: str) -> Route:
        settings = self._settings
        word, rest = first_word(text) if text.startswith("/") else ("", text)
        match = self._commands.get(word) if word else None
        if match is not None:
            index, route = match
            return self._make(f"route{index}", route.backend, rest, route.stateless, route.system_prompt, word)
        by_conversation = self._conversations.get(conversation_id)
        if by_conversation is not None:
            r = by_conversation
            return self._make(self._route_ids[id(r)], r.backend, text.strip(), r.stateless, r.system_prompt)
        return self._make("default", settings.default_backend, text.strip(), False, None)

    def _make(
        self, route_id: str, backend: str, text: str, stateless: bool, system_prompt: str | None, command: str = ""
    ) -> Route:
        settings = self._settings
        chain = (backend, *(name for name in settings.fallback if name != backend))
        if system_prompt is None:
            system_prompt = settings.backends[backend].system_prompt
        if system_prompt is None:
            system_prompt = settings.section.system_prompt
        return Route(
            id=route_id,
            chain=chain,
            text=text,
            stateless=stateless or not self._memory_enabled,
            system_prompt=system_prompt,
            command=command,
        )
