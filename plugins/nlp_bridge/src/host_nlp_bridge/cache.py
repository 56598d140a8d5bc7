"""The result cache: answers to identical requests, bounded by entries, characters and age.

The key is a hash of the backend, its model, the extra request parameters and the *normalised*
context (every message's role and text, Unicode-NFKC-normalised with whitespace runs collapsed), so
"What is  DingTalk?" and "What is DingTalk? " hit the same entry while any difference in the
remembered conversation makes a different key. Entries expire ``ttl`` seconds after they were stored
and the least recently used go first when a bound is reached. Only complete answers are stored.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from host_nlp_bridge.model import ChatMessage

__all__ = ["ResultCache", "cache_key", "normalise"]

_SPACES = re.compile(r"\s+")
_encode = msgspec.json.Encoder(order="deterministic").encode


def normalise(text: str) -> str:
    """The form of ``text`` that cache keys use: NFKC, whitespace runs collapsed, stripped."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def cache_key(backend: str, model: str, params: dict[str, Any], messages: Iterable[ChatMessage]) -> str:
    """A stable key for one request (also the coalescing key for requests in flight)."""
    payload = _encode([backend, model, params, [[m.role, normalise(m.content)] for m in messages]])
    return hashlib.sha256(payload).hexdigest()


@dataclass(slots=True)
class _Entry:
    text: str
    expires: float


class ResultCache:
    """A TTL + LRU cache of answer texts. ``clock`` returns seconds."""

    def __init__(self, *, max_entries: int, max_chars: int, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        return self._chars

    def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.text

    def put(self, key: str, text: str, ttl: float) -> None:
        if len(text) > self.max_chars:
            return  # would evict everything else and still not fit
        if key in self._entries:
            self._drop(key)
        self._entries[key] = _Entry(text, self._clock() + ttl)
        self._chars += len(text)
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._chars = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._chars -= len(entry.text)
