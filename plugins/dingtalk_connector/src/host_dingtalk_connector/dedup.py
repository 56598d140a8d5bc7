"""Bounded, expiring memory of what an app already accepted (frame ``messageId``, ``msgId``, ``eventId``).

DingTalk redelivers a bot message whose ACK was late with a **new** frame ``messageId`` but the same
``data.msgId`` (reference peers.md section 1.2), and an EVENT with the same ``eventId``; so the
connector remembers all three, under separate namespaces, for ``ttl`` seconds (default 15 min: field
reports show redeliveries up to ~60 s later; the issue asks for at least 10 min).

One ``DedupCache`` per app: two bots @-mentioned in the same group message each get their own push
with the same ``msgId`` and both must be handled (peers.md 12 K, DingTalk-Real-AI #351).

Memory is bounded by ``max_entries``: when full, the oldest entries are evicted first (and counted).
Entries are kept in insertion order, which is also expiry order because the TTL is constant, so
expiry and eviction are O(1) per operation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import trio

__all__ = ["DedupCache"]


class DedupCache:
    """Remembers keys for ``ttl`` seconds, at most ``max_entries`` of them.

    ``clock`` returns seconds (default ``trio.current_time``, so tests run under trio's virtual clock).
    """

    def __init__(
        self,
        *,
        ttl: float = 900.0,
        max_entries: int = 20_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be > 0 and max_entries >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()
        # No entry expires before this time (the oldest deadline when last looked at; it only
        # grows, and refreshing an entry can only make it conservative): skips most expiry scans.
        self._horizon = float("inf")
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def _expire(self, now: float) -> None:
        if now < self._horizon:
            return
        expiry = self._expiry
        while expiry:
            key, deadline = next(iter(expiry.items()))
            if deadline > now:
                self._horizon = deadline
                return
            del expiry[key]
        self._horizon = float("inf")

    def seen(self, namespace: str, key: str) -> bool:
        """``True`` when ``key`` was added under ``namespace`` less than ``ttl`` seconds ago."""
        now = self._clock()
        deadline = self._expiry.get((namespace, key))
        if deadline is None:
            return False
        if deadline <= now:
            self._expire(now)
            return False
        return True

    def add(self, namespace: str, key: str) -> None:
        """Remember ``key`` for ``ttl`` seconds from now (refreshing it if already known)."""
        now = self._clock()
        self._expire(now)
        item = (namespace, key)
        expiry = self._expiry
        deadline = now + self.ttl
        if expiry.pop(item, None) is None and not expiry:
            self._horizon = deadline
        expiry[item] = deadline
        while len(expiry) > self.max_entries:
            expiry.popitem(last=False)
            self.evicted += 1

    def discard(self, namespace: str, key: str) -> None:
        self._expiry.pop((namespace, key), None)

    def statistics(self) -> dict[str, int]:
        return {"entries": len(self._expiry), "evicted": self.evicted}
