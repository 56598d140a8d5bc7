"""What the bridge hands to a backend, and what a backend hands back.

A backend turns a ``ChatRequest`` into an async iterator of ``str`` (answer text, in order) and
``Usage`` (token counts, when the backend reports them). Ending the iterator means the answer is
complete; raising a ``BackendError`` means it is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ChatMessage", "ChatRequest", "Role", "Usage"]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation context, as Chat Completions APIs expect it."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One question for a backend, with its context.

    ``messages`` is the full context sent to chat backends: the system prompt, the remembered turns
    and the new user message (last). ``text`` is the new user message alone (what the echo backend
    repeats and what ``${text}`` means in an http_json body template).
    """

    messages: tuple[ChatMessage, ...]
    text: str
    stream: bool = True
    conversation_id: str = ""
    user_id: str = ""
    user_name: str = ""
    request_id: str = ""
    #: ``messages`` without the system prompt and the new user message.
    history: tuple[ChatMessage, ...] = field(default=())

    @property
    def system(self) -> str:
        return next((m.content for m in self.messages if m.role == "system"), "")


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts reported by a backend for one answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
