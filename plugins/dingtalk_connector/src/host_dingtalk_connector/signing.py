"""DingTalk HTTP-callback signatures and the replay guard (reference dingtalk-protocol.md 8.1).

DingTalk POSTs each bot message to our callback URL with two headers::

    timestamp: 1577262236757            (epoch milliseconds, DingTalk's clock)
    sign:      Base64(HMAC-SHA256(key=appSecret, msg=timestamp + "\\n" + appSecret))

and we accept it when ``sign`` matches (compared in constant time) and ``timestamp`` is within the
window of our clock (DingTalk's documentation says one hour).

**What the signature does not cover: the body.** It only proves that someone who knows the
AppSecret signed *this timestamp*. So the body's integrity rests on TLS between DingTalk and us,
plus one rule enforced here: **each signature is accepted once** (``ReplayGuard``). A captured
request cannot be replayed, and its headers cannot be reused with another body, for as long as the
timestamp would pass the window check (after that the window check refuses it).

Nothing here logs or returns a secret; errors carry a bounded ``reason`` label.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_TIMESTAMP_DIGITS",
    "ReplayGuard",
    "ReplayVerdict",
    "SignatureError",
    "compute_sign",
    "match_signature",
    "parse_timestamp",
]

#: Epoch milliseconds have 13 digits until the year 2286; anything much longer is garbage.
MAX_TIMESTAMP_DIGITS = 15
#: A ``sign`` header is 44 base64 characters; refuse absurd values before doing any work.
_MAX_SIGN_LENGTH = 256

ReplayVerdict = Literal["new", "replay", "reused", "full"]


class SignatureError(Exception):
    """A callback's ``timestamp``/``sign`` headers were refused.

    ``reason`` is a bounded label (used in metrics, logs and the HTTP answer): ``missing_headers``,
    ``bad_timestamp``, ``outside_window``, ``bad_sign``. ``detail`` says what exactly, for the log;
    it never contains a secret or the expected signature.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def compute_sign(secret: str, timestamp: str | int) -> str:
    """DingTalk's ``sign`` for ``timestamp`` under ``secret`` (the AppSecret): base64 text."""
    message = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def parse_timestamp(value: str | None) -> int:
    """The ``timestamp`` header as epoch milliseconds; ``SignatureError`` when absent or not digits."""
    if value is None or value == "":
        raise SignatureError("missing_headers", "the timestamp header is missing")
    value = value.strip()
    # isdecimal() alone accepts non-ASCII digits ("١٢٣"); DingTalk sends ASCII only.
    if not value.isascii() or not value.isdecimal() or len(value) > MAX_TIMESTAMP_DIGITS:
        raise SignatureError("bad_timestamp", "the timestamp header is not epoch milliseconds")
    return int(value)


def match_signature(
    timestamp: str | None,
    sign: str | None,
    secrets: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    window_seconds: float,
    now: Callable[[], float] = time.time,
) -> tuple[str, int]:
    """Check a callback's headers; return ``(app name, timestamp ms)`` of the app whose secret signed it.

    ``secrets`` maps app names to AppSecrets (one entry per configured app: a callback URL may be
    shared by several apps). Checks, cheapest first: both headers present, timestamp well-formed,
    timestamp within ``window_seconds`` of ``now()`` (either direction), then the signature against
    every app with ``hmac.compare_digest`` (all apps are compared, so timing does not reveal which
    one matched). Raises ``SignatureError`` naming the reason.
    """
    if timestamp is None or sign is None or timestamp == "" or sign == "":
        missing = [name for name, value in (("timestamp", timestamp), ("sign", sign)) if not value]
        raise SignatureError("missing_headers", f"missing header(s): {', '.join(missing)}")
    ts = parse_timestamp(timestamp)
    skew = now() - ts / 1000
    if abs(skew) > window_seconds:
        direction = "old" if skew > 0 else "in the future"
        raise SignatureError(
            "outside_window", f"timestamp is {abs(skew):.0f} s {direction}; the window is {window_seconds:g} s"
        )
    if len(sign) > _MAX_SIGN_LENGTH:
        raise SignatureError("bad_sign", "the sign header is too long to be a signature")
    provided = sign.strip().encode("utf-8", errors="replace")
    items = secrets.items() if isinstance(secrets, Mapping) else secrets
    matched: str | None = None
    for name, secret in items:
        # The signed text is the header exactly as DingTalk sent it.
        expected = compute_sign(secret, timestamp.strip()).encode("ascii")
        if hmac.compare_digest(expected, provided) and matched is None:
            matched = name
    if matched is None:
        raise SignatureError("bad_sign", "the sign header does not match any configured app's AppSecret")
    return matched, ts


@dataclass(slots=True)
class _Entry:
    expires: float
    body_digest: bytes


class ReplayGuard:
    """Remembers every accepted signature until its timestamp leaves the window.

    ``check(app, timestamp_ms, sign, body)`` answers:

    * ``new``: first use; it is remembered until ``timestamp + window`` (after that the window
      check refuses it anyway, so memory never needs to outlive the window);
    * ``replay``: the same signature with the same body again (a replayed request);
    * ``reused``: the same signature with a *different* body: either headers lifted from another
      request, or two callbacks DingTalk signed in the same millisecond (the signature covers only
      the timestamp, so they are indistinguishable); the caller refuses it with a status DingTalk
      may retry;
    * ``full``: ``max_entries`` unexpired signatures are remembered already: refuse (fail closed;
      forgetting one early would re-open it for replay).

    ``clock`` returns epoch seconds (the same clock as the window check).
    """

    def __init__(
        self, *, window_seconds: float, max_entries: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        if window_seconds <= 0 or max_entries < 1:
            raise ValueError("window_seconds must be > 0 and max_entries >= 1")
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[bytes, _Entry] = {}
        self._expiry: list[tuple[float, bytes]] = []  # heap; may hold stale items for forgotten keys

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(app: str, timestamp_ms: int, sign: str) -> bytes:
        # A digest keeps entries small whatever the header sizes (16 bytes is plenty against collisions).
        return hashlib.blake2b(f"{app}\0{timestamp_ms}\0{sign}".encode(), digest_size=16).digest()

    def _expire(self, now: float) -> None:
        heap = self._expiry
        # Kept while now <= expires: the window check accepts a skew of exactly window_seconds.
        while heap and heap[0][0] < now:
            expires, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires == expires:
                del self._entries[key]

    def check(self, app: str, timestamp_ms: int, sign: str, body: bytes) -> ReplayVerdict:
        """Record and judge one verified callback (see the class docstring)."""
        now = self._clock()
        self._expire(now)
        key = self._key(app, timestamp_ms, sign.strip())
        digest = hashlib.blake2b(body, digest_size=16).digest()
        known = self._entries.get(key)
        if known is not None:
            return "replay" if hmac.compare_digest(known.body_digest, digest) else "reused"
        if len(self._entries) >= self.max_entries:
            return "full"
        expires = timestamp_ms / 1000 + self.window_seconds
        self._entries[key] = _Entry(expires, digest)
        heapq.heappush(self._expiry, (expires, key))
        return "new"

    def forget(self, app: str, timestamp_ms: int, sign: str) -> None:
        """Drop a signature whose request was not processed (host busy): a retry of it is no replay."""
        self._entries.pop(self._key(app, timestamp_ms, sign.strip()), None)

    def statistics(self) -> dict[str, int]:
        return {"entries": len(self._entries), "max_entries": self.max_entries}
