"""The platform-neutral message model.

Everything that flows between connectors and plugins is one of these msgspec Structs. Nothing here is
DingTalk-specific: a connector converts its platform's payloads into these types on the way in and
turns ``Reply`` values into platform calls on the way out. The raw platform payload is kept on
``Message.raw`` / ``Event.raw`` for plugins that need a field the model does not carry.

Timestamps are integers in milliseconds since the Unix epoch (``*_ms``), the unit chat platforms use.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeAlias

import msgspec

__all__ = [
    "AudioPart",
    "AuditEntry",
    "CardButton",
    "Conversation",
    "Event",
    "FilePart",
    "ImagePart",
    "MarkdownPart",
    "Media",
    "Mention",
    "Message",
    "Part",
    "Reply",
    "ReplyResult",
    "RichTextPart",
    "Sender",
    "StreamedReply",
    "TextPart",
    "VideoPart",
    "now_ms",
]


def now_ms() -> int:
    """Current wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class Conversation(msgspec.Struct, frozen=True):
    """Where a message was said: a 1:1 chat (``single``) or a group chat (``group``)."""

    id: str
    type: Literal["single", "group"]
    title: str | None = None


class Sender(msgspec.Struct):
    """Who sent a message.

    ``platform_ids`` holds every id the platform gave (DingTalk: ``staffId``, ``senderId``,
    ``unionId``); ``identity`` is the single site-wide user id an identity resolver mapped them to
    (``None`` when unresolved). ``is_admin`` is the platform's own admin flag when it has one.
    ``departments`` lists the sender's department ids or names when a connector or identity resolver
    knows them (``[access]`` allow/deny lists and roles match on them).
    """

    platform_ids: dict[str, str]
    name: str = ""
    identity: str | None = None
    is_admin: bool = False
    corp_id: str | None = None
    departments: list[str] = msgspec.field(default_factory=list)


class Media(msgspec.Struct):
    """A reference to a media object: a platform download code, and once fetched a local path."""

    download_code: str | None = None
    url: str | None = None
    path: str | None = None
    mime_type: str | None = None
    size: int | None = None
    name: str | None = None


class TextPart(msgspec.Struct, tag="text"):
    text: str


class MarkdownPart(msgspec.Struct, tag="markdown"):
    text: str
    title: str | None = None


class ImagePart(msgspec.Struct, tag="image"):
    media: Media


class AudioPart(msgspec.Struct, tag="audio"):
    """Voice message; ``recognition`` is the platform's speech-to-text, when it supplied one."""

    media: Media
    recognition: str | None = None
    duration_ms: int | None = None


class VideoPart(msgspec.Struct, tag="video"):
    media: Media
    duration_ms: int | None = None
    video_type: str | None = None


class FilePart(msgspec.Struct, tag="file"):
    media: Media
    file_name: str | None = None


class RichTextPart(msgspec.Struct, tag="rich_text"):
    """Text and inline pictures in their original order."""

    parts: list[TextPart | ImagePart]


Part: TypeAlias = (
    TextPart | MarkdownPart | ImagePart | AudioPart | VideoPart | FilePart | RichTextPart
)


class Mention(msgspec.Struct):
    """An @-mention inside a message. ``is_bot`` is true when the bot itself was mentioned."""

    platform_ids: dict[str, str]
    name: str | None = None
    is_bot: bool = False


class Message(msgspec.Struct, kw_only=True):
    """One inbound chat message, converted from the platform's payload by a connector.

    ``id`` is the platform's message id (stable across redeliveries); ``connector`` names the
    connector instance it came through, and replies go back the same way. ``request_id`` is set by the
    host when the message is accepted and is carried through every hook and outbound call.
    ``context`` is connector-private state needed to answer (e.g. a reply webhook); plugins should not
    rely on its contents.
    """

    id: str
    platform: str
    connector: str
    conversation: Conversation
    sender: Sender
    parts: list[Part] = msgspec.field(default_factory=list)
    mentions: list[Mention] = msgspec.field(default_factory=list)
    mentions_bot: bool = False
    created_at_ms: int = msgspec.field(default_factory=now_ms)
    received_at_ms: int = msgspec.field(default_factory=now_ms)
    app_id: str | None = None
    request_id: str = ""
    raw: dict[str, Any] = msgspec.field(default_factory=dict)
    context: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def text(self) -> str:
        """All textual content, in order: text, markdown, rich-text text, recognised speech."""
        chunks: list[str] = []
        for part in self.parts:
            if isinstance(part, TextPart | MarkdownPart):
                chunks.append(part.text)
            elif isinstance(part, RichTextPart):
                chunks.extend(p.text for p in part.parts if isinstance(p, TextPart))
            elif isinstance(part, AudioPart) and part.recognition:
                chunks.append(part.recognition)
        return "\n".join(c.strip() for c in chunks if c.strip())


class Event(msgspec.Struct, kw_only=True):
    """A platform event that is not a chat message (membership change, card button press...).

    ``type`` is the platform's event type (DingTalk ``eventType``, or ``card_callback``); ``id`` is
    unique per event and the key for idempotency.
    """

    id: str
    platform: str
    connector: str
    type: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at_ms: int = msgspec.field(default_factory=now_ms)
    app_id: str | None = None
    request_id: str = ""
    raw: dict[str, Any] = msgspec.field(default_factory=dict)


class CardButton(msgspec.Struct, frozen=True):
    title: str
    url: str


class Reply(msgspec.Struct, kw_only=True):
    """What a plugin sends back: plain text, markdown, or an action card (markdown plus buttons).

    Build one with the constructors: ``Reply.text_("hi")``, ``Reply.markdown("**hi**")``,
    ``Reply.card(title, text, buttons)``. A plugin may also just return a ``str`` (a text reply).
    ``mention_sender`` asks group-chat connectors to @-mention the person being answered.
    """

    kind: Literal["text", "markdown", "card"] = "text"
    text: str
    title: str | None = None
    buttons: list[CardButton] = msgspec.field(default_factory=list)
    mention_sender: bool = False

    @classmethod
    def text_(cls, text: str) -> Reply:
        return cls(kind="text", text=text)

    @classmethod
    def markdown(cls, text: str, title: str | None = None) -> Reply:
        return cls(kind="markdown", text=text, title=title)

    @classmethod
    def card(cls, title: str, text: str, buttons: list[CardButton] | None = None) -> Reply:
        return cls(kind="card", title=title, text=text, buttons=buttons or [])


#: A streamed reply is any async iterator of text chunks; the connector shows it growing (an AI card
#: on DingTalk) and finalizes it when the iterator ends.
StreamedReply: TypeAlias = AsyncIterator[str]

#: What an ``on_message`` implementation may return.
ReplyResult: TypeAlias = Reply | str | StreamedReply | None


class AuditEntry(msgspec.Struct, kw_only=True):
    """One auditable action, emitted through ``Host.audit`` and delivered to ``on_audit``.

    ``category`` groups actions (``plugin``, ``config``, ``permission``, ``admin``, ``connector``,
    ``message``); ``action`` says what happened (``load``, ``fail``, ``change``...); ``actor`` who did it
    (a user identity, ``host`` or a plugin name); ``target`` what it was done to. ``details`` must never
    carry secrets: the host redacts known secret values before emitting.
    """

    category: str
    action: str
    actor: str = "host"
    target: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    request_id: str | None = None
    at_ms: int = msgspec.field(default_factory=now_ms)
