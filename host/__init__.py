"""host: a minimal plugin host for enterprise chat bots.

Plugins implement hooks with ``from host import hookimpl`` (see ``host.hookspecs`` and docs/hooks.md).
"""

from __future__ import annotations

import pluggy

from host.config import Secret
from host.model import (
    AudioPart,
    AuditEntry,
    CardButton,
    Conversation,
    Event,
    FilePart,
    ImagePart,
    MarkdownPart,
    Media,
    Mention,
    Message,
    Reply,
    RichTextPart,
    Sender,
    TextPart,
    VideoPart,
)

__version__ = "0.1.0"

#: Marks a plugin function as a hook implementation: ``@hookimpl`` or ``@hookimpl(tryfirst=True)``.
hookimpl = pluggy.HookimplMarker("host")

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
    "Reply",
    "RichTextPart",
    "Secret",
    "Sender",
    "TextPart",
    "VideoPart",
    "__version__",
    "hookimpl",
]
