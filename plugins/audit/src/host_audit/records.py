"""Record types, their canonical encoding and the hash chain.

A segment line is the canonical JSON of a record (``msgspec`` with sorted keys, compact) with the
chain hash appended as the last member::

    {"action":"load",...,"seq":42,"ts":1732800000123,"type":"entry","h":"<64 hex>"}

``h = SHA-256(0x00 ‖ h_prev ‖ P)`` where ``P`` is the line's bytes before ``,"h":"`` (the canonical
encoding of the record without its closing brace) and ``h_prev`` the raw 32-byte hash of the
previous record (32 zero bytes before the first). Hashing the stored bytes (not a re-encoding)
means every byte of every line is covered (the rest of the line is the hash itself and fixed
framing), and a verifier needs no JSON encoder that matches ours.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from host import Secret
from host.config import known_secret_values
from host.model import AuditEntry

__all__ = [
    "FORMAT_VERSION",
    "HASH_SUFFIX_LEN",
    "MASK",
    "ZERO_HASH",
    "CheckpointNote",
    "CheckpointRecord",
    "EntryRecord",
    "ExpiredSegment",
    "ExpiryRecord",
    "FindingRecord",
    "RecordHead",
    "SegmentRecord",
    "chain_hash",
    "encode",
    "entry_record",
    "is_sensitive_key",
    "sanitize",
    "seal",
    "split_line",
]

#: Bumped on any incompatible change of the line format.
FORMAT_VERSION = 1
#: The chain value "before" the first record.
ZERO_HASH = bytes(32)
#: Replaces redacted values.
MASK = "**********"

_HASH_OPEN = b',"h":"'
_HASH_CLOSE = b'"}'
#: Length of the ``,"h":"<64 hex>"}`` suffix of every line (without the newline).
HASH_SUFFIX_LEN = len(_HASH_OPEN) + 64 + len(_HASH_CLOSE)


def _enc_hook(obj: Any) -> Any:
    # Only reached for values ``sanitize`` did not turn into JSON types (system records never do).
    return str(obj)


_encoder = msgspec.json.Encoder(order="sorted", enc_hook=_enc_hook)


def encode(record: msgspec.Struct) -> bytes:
    """The canonical encoding of ``record``: compact JSON, keys sorted at every level."""
    return _encoder.encode(record)


def chain_hash(prev: bytes, prefix: bytes) -> bytes:
    """``SHA-256(0x00 ‖ prev ‖ prefix)``; the 0x00 separates record hashes from any other use."""
    return hashlib.sha256(b"\x00" + prev + prefix).digest()


def seal(prev: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Chain the encoded record ``body`` to ``prev``: returns ``(line with newline, hash)``."""
    prefix = body[:-1]
    digest = hashlib.sha256(b"\x00" + prev + prefix).digest()
    return prefix + _HASH_OPEN + digest.hex().encode() + b'"}\n', digest


def split_line(line: bytes) -> tuple[bytes, bytes] | None:
    """``(hashed prefix, hex hash)`` of a line (without newline), or ``None`` if it has no hash."""
    if (
        len(line) <= HASH_SUFFIX_LEN + 1
        or line[-HASH_SUFFIX_LEN : -HASH_SUFFIX_LEN + 6] != _HASH_OPEN
        or line[-2:] != _HASH_CLOSE
    ):
        return None
    return line[:-HASH_SUFFIX_LEN], line[-66:-2]


# -- record types ----------------------------------------------------------------------------------
# gc=False: records are short-lived and never part of a reference cycle, so the cyclic garbage
# collector need not track them (fewer collections on the append path).


class RecordHead(msgspec.Struct, gc=False):
    """The fields every record has; what the verifier decodes for each line."""

    seq: int
    ts: int
    type: str


class SegmentRecord(msgspec.Struct, tag="segment", tag_field="type", kw_only=True, gc=False):
    """First record of every segment file: ties the file into the chain and names the signing key."""

    seq: int
    ts: int
    format: int = FORMAT_VERSION
    #: Random id of the whole log (fixed at genesis); binds checkpoints to this log.
    log: str
    #: This file's own name (a renamed file no longer matches).
    segment: str
    #: Name of the segment file before this one (``None`` for the first ever).
    prev_segment: str | None
    #: Hex hash of the last complete record before this segment (64 zeros at genesis).
    prev_hash: str
    #: ``genesis`` | ``start`` (host started) | ``rotate`` (previous segment full) | ``recover``.
    reason: str
    key_id: str
    #: Raw Ed25519 public key, base64.
    public_key: str
    #: When the key changed: the previous key's signature over the new one (base64), if available.
    endorsement: str | None = None
    endorsed_by: str | None = None


class EntryRecord(msgspec.Struct, tag="entry", tag_field="type", kw_only=True, gc=False):
    """An audited action (``host.model.AuditEntry``)."""

    seq: int
    ts: int
    category: str
    action: str
    actor: str
    target: str | None
    details: dict[str, Any]
    request_id: str | None
    #: When the action happened (``AuditEntry.at_ms``); ``ts`` is when it was written.
    at: int


class CheckpointRecord(msgspec.Struct, tag="checkpoint", tag_field="type", kw_only=True, gc=False):
    """A signed statement: this log had ``size`` records, the last one hashing to ``head``."""

    seq: int
    ts: int
    log: str
    size: int
    head: str
    key_id: str
    sig: str
    #: ``count`` | ``time`` | ``rotate`` | ``start`` | ``expiry`` | ``shutdown``.
    reason: str


class FindingRecord(msgspec.Struct, tag="finding", tag_field="type", kw_only=True, gc=False):
    """Something the log noticed about itself (torn tail after a crash, clock step...)."""

    seq: int
    ts: int
    kind: str
    details: dict[str, Any]


class ExpiredSegment(msgspec.Struct, gc=False):
    """One segment removed by retention, with what a verifier needs to anchor its successor."""

    name: str
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    last_ts: int | None


class ExpiryRecord(msgspec.Struct, tag="expiry", tag_field="type", kw_only=True, gc=False):
    """Segments about to be deleted by retention (written, checkpointed and synced before)."""

    seq: int
    ts: int
    retention_days: int
    segments: list[ExpiredSegment]


class CheckpointNote(msgspec.Struct, gc=False):
    """A line of ``checkpoints.jsonl``: the checkpoint, without the log's own framing."""

    log: str
    size: int
    head: str
    ts: int
    key_id: str
    sig: str
    reason: str


# -- entries ---------------------------------------------------------------------------------------

#: Words that make a details key sensitive (matched on word parts: ``apiKey``, ``x-auth-token``).
SENSITIVE_WORDS = frozenset(
    {
        "apikey", "auth", "authorization", "cookie", "credential", "credentials", "key", "passphrase",
        "passwd", "password", "pwd", "secret", "secrets", "signature", "ticket", "token", "tokens",
        "webhook",
    }
)  # fmt: skip
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_MAX_DEPTH = 16


_sensitive_cache: dict[str, bool] = {}
_SENSITIVE_CACHE_MAX = 4096


def is_sensitive_key(name: str) -> bool:
    """Whether a details key names a secret (``api_key``, ``accessToken``, ``X-Auth-Token``...)."""
    cached = _sensitive_cache.get(name)
    if cached is not None:
        return cached
    words = [w.lower() for w in _WORD.findall(name)]
    result = any(w in SENSITIVE_WORDS for w in words) or "".join(words) in SENSITIVE_WORDS
    if len(_sensitive_cache) < _SENSITIVE_CACHE_MAX:  # bounded: keys are mostly a fixed vocabulary
        _sensitive_cache[name] = result
    return result


def _mask_known(text: str) -> str:
    for secret in known_secret_values():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


_PLAIN = frozenset({str, int, float, bool, type(None)})
_KEEP_UNDER_SENSITIVE_KEY = frozenset({bool, type(None)})


def sanitize(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` with secrets masked (defence in depth; the host redacts first).

    ``host.Secret`` values and the values of keys named like secrets (see ``SENSITIVE_WORDS``) become
    ``MASK``, except booleans and ``None`` (``{"password_changed": true}`` stays informative).
    Values that are not JSON types become their ``str()`` (with known secret values masked).
    """
    # Exact type checks first (this runs for every audited entry); ABC checks only for the rest.
    kind = type(value)
    if kind in _PLAIN:
        return value
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if kind is dict:
        return _sanitize_mapping(value, depth)
    if kind is list or kind is tuple:
        return [v if type(v) in _PLAIN else sanitize(v, depth + 1) for v in value]
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, enum.Enum):
        return sanitize(value.value, depth + 1)
    if isinstance(value, str | bool | int | float):  # subclasses of the plain types
        return value
    if isinstance(value, Mapping):
        return _sanitize_mapping(value, depth)
    if isinstance(value, list | tuple | set | frozenset):
        return [sanitize(v, depth + 1) for v in value]
    if isinstance(value, msgspec.Struct):
        return sanitize(msgspec.structs.asdict(value), depth + 1)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    return _mask_known(str(value))


def _sanitize_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out = {}
    for k, v in value.items():
        key = k if type(k) is str else str(k)
        if type(v) in _KEEP_UNDER_SENSITIVE_KEY or not is_sensitive_key(key):
            out[key] = v if type(v) in _PLAIN else sanitize(v, depth + 1)
        else:
            out[key] = MASK
    return out


def entry_record(entry: AuditEntry, seq: int, ts: int) -> EntryRecord:
    """The record for ``entry`` at position ``seq``, written at ``ts``."""
    return EntryRecord(
        seq=seq,
        ts=ts,
        category=entry.category,
        action=entry.action,
        actor=entry.actor,
        target=entry.target,
        details=sanitize(entry.details) if entry.details else {},
        request_id=entry.request_id,
        at=entry.at_ms,
    )
