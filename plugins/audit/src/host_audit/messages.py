"""Optional auditing of message metadata (``[audit.messages] enabled = true``).

A middleware records one ``message/received`` entry per inbound message, before handing it on.
Identifiers (message id, sender ids, conversation id) are replaced by keyed hashes:
``HMAC-SHA256(salt, value)``, the first 32 hex digits, prefixed ``h:``. The salt is random, generated
on first use and kept in a 0600 file next to the signing key (not in the log), so someone who can
read the log cannot confirm a guessed id; an investigator with the salt can
(``python -m host audit hash-id VALUE``). Message text is recorded only with
``include_content = true``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.model import Message
from host_audit.errors import KeyFileError
from host_audit.keys import write_private_file
from host_audit.settings import MessageAuditSettings

if TYPE_CHECKING:
    from host.runtime import Host

__all__ = ["IdHasher", "load_or_create_salt", "make_message_middleware", "message_details"]

_SALT_BYTES = 32


def load_or_create_salt(path: Path) -> bytes:
    """The HMAC salt in ``path`` (created with 32 random bytes, mode 0600, on first use)."""
    if not path.exists():
        try:
            write_private_file(path, os.urandom(_SALT_BYTES).hex().encode() + b"\n")
        except OSError as exc:
            raise KeyFileError(f"cannot create message-id salt {path}: {exc.strerror or exc}") from None
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"message-id salt {path} is accessible by group/others; run: chmod 600 {path}")
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise KeyFileError(f"message-id salt {path} is not hex") from None


class IdHasher:
    """Keyed hashing of identifiers (stable for one salt, meaningless without it)."""

    __slots__ = ("_salt",)

    def __init__(self, salt: bytes) -> None:
        self._salt = salt

    def __call__(self, value: str) -> str:
        return "h:" + hmac.new(self._salt, value.encode(), hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "IdHasher(salt=<hidden>)"


def message_details(message: Message, hasher: IdHasher, *, include_content: bool) -> dict[str, Any]:
    """What a ``message/received`` entry records about ``message``."""
    details: dict[str, Any] = {
        "message_id": hasher(message.id),
        "connector": message.connector,
        "platform": message.platform,
        "conversation_type": message.conversation.type,
        "sender_ids": {k: hasher(v) for k, v in sorted(message.sender.platform_ids.items())},
        "parts": [type(p).__name__.removesuffix("Part").lower() for p in message.parts],
        "chars": len(message.text),
        "mentions_bot": message.mentions_bot,
        "created_at_ms": message.created_at_ms,
    }
    if include_content:
        details["text"] = message.text
    return details


def _actor(message: Message, hasher: IdHasher) -> str:
    sender = message.sender
    if sender.identity:
        return "user:" + hasher(sender.identity)
    if sender.platform_ids:
        key, value = min(sender.platform_ids.items())
        return f"{message.platform}:{key}:" + hasher(value)
    return "unknown"


Middleware = Callable[[Message, Callable[[Message], Awaitable[None]]], Awaitable[None]]


def make_message_middleware(
    host: Host, hasher: Callable[[], IdHasher | None], settings: MessageAuditSettings
) -> Middleware:
    """The middleware; ``hasher()`` returns ``None`` until the log is open (then nothing is recorded)."""

    async def audit_message_metadata(message: Message, call_next: Callable[[Message], Awaitable[None]]) -> None:
        current = hasher()
        if current is not None:
            # audit_soon queues without waiting: message handling never waits for the disk.
            host.audit_soon(
                "message",
                "received",
                actor=_actor(message, current),
                target=current(message.conversation.id),
                details=message_details(message, current, include_content=settings.include_content),
            )
        await call_next(message)

    return audit_message_metadata
