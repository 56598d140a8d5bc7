"""The ``[audit]`` configuration section and the resolved settings the log runs with.

``AuditSection`` is what ``host.toml`` holds (validated by the host through
``register_config_sections``); ``LogSettings`` is the same with paths resolved, and is what
``AuditLog`` takes, so the log can also be used without a host (tests, benchmarks, tools).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "DIR_ENV_VAR",
    "MIN_RETENTION_DAYS",
    "AuditSection",
    "LogSettings",
    "MessageAuditSettings",
]

#: Environment variable naming the audit directory; it wins over ``[audit] dir``.
DIR_ENV_VAR = "HOST_AUDIT_DIR"
#: The shortest retention that may be configured (0 keeps everything forever).
MIN_RETENTION_DAYS = 7

_MIB = 1 << 20


class MessageAuditSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[audit.messages]``: optional auditing of message metadata."""

    #: Record one ``message/received`` entry per inbound message.
    enabled: bool = False
    #: Also record the message text. Off by default: audit logs are kept for years.
    include_content: bool = False
    #: HMAC salt for hashing ids; empty means ``message-ids.salt`` next to the signing key.
    salt_file: str = ""


class AuditSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[audit]``: where and how the tamper-evident audit log is written."""

    #: Directory of the log (segments, ``checkpoints.jsonl``). ``HOST_AUDIT_DIR`` wins over it.
    dir: str = "./audit"
    #: Ed25519 signing key (PEM, mode 0600); empty means ``<dir>/signing.key``.
    key_file: str = ""
    #: A segment is closed once it holds this many bytes...
    segment_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * _MIB
    #: ...or this many records...
    segment_max_records: Annotated[int, msgspec.Meta(ge=10)] = 1_000_000
    #: ...or is this old (seconds), so retention can expire the log day by day.
    segment_max_seconds: Annotated[float, msgspec.Meta(ge=1)] = 86_400.0
    #: Write a signed checkpoint after this many records...
    checkpoint_every_records: Annotated[int, msgspec.Meta(ge=1)] = 1000
    #: ...or when records are waiting and this many seconds passed since the last one.
    checkpoint_every_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    #: ``none``: write each record with one ``write()`` (survives a process crash), fsync at
    #: checkpoints; ``strict``: also fsync every record (from a worker thread).
    fsync: Literal["none", "strict"] = "none"
    #: Expire segments whose newest record is older than this many days; 0 keeps everything.
    retention_days: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: How often (seconds) the retention check runs while the host is up.
    retention_check_seconds: Annotated[float, msgspec.Meta(ge=1)] = 3600.0
    #: How far (ms) a record's timestamp may go back behind the newest one (clock steps).
    clock_tolerance_ms: Annotated[int, msgspec.Meta(ge=0)] = 5000
    messages: MessageAuditSettings = msgspec.field(default_factory=MessageAuditSettings)

    def __post_init__(self) -> None:
        if 0 < self.retention_days < MIN_RETENTION_DAYS:
            raise ValueError(
                f"retention_days must be 0 (keep forever) or at least {MIN_RETENTION_DAYS}, "
                f"got {self.retention_days}"
            )
        if not self.dir.strip():
            raise ValueError("dir must not be empty")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Resolved settings of one audit log (see ``AuditSection`` for the meaning of each)."""

    directory: Path
    key_file: Path
    segment_max_bytes: int = 64 * _MIB
    segment_max_records: int = 1_000_000
    segment_max_seconds: float = 86_400.0
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 60.0
    fsync: Literal["none", "strict"] = "none"
    retention_days: int = 0
    retention_check_seconds: float = 3600.0
    clock_tolerance_ms: int = 5000

    @classmethod
    def for_directory(cls, directory: str | Path, key_file: str | Path | None = None, **overrides: Any) -> LogSettings:
        """Defaults for ``directory`` (key in ``<directory>/signing.key``), with overrides."""
        path = Path(directory)
        return cls(directory=path, key_file=Path(key_file) if key_file else path / "signing.key", **overrides)

    @classmethod
    def from_section(cls, section: AuditSection, environ: Mapping[str, str] | None = None) -> LogSettings:
        """Resolve ``[audit]``: ``HOST_AUDIT_DIR`` wins over ``dir``; relative paths are from the CWD."""
        environ = os.environ if environ is None else environ
        directory = Path(environ.get(DIR_ENV_VAR) or section.dir)
        key_file = Path(section.key_file) if section.key_file else directory / "signing.key"
        return cls(
            directory=directory,
            key_file=key_file,
            segment_max_bytes=section.segment_max_bytes,
            segment_max_records=section.segment_max_records,
            segment_max_seconds=section.segment_max_seconds,
            checkpoint_every_records=section.checkpoint_every_records,
            checkpoint_every_seconds=section.checkpoint_every_seconds,
            fsync=section.fsync,
            retention_days=section.retention_days,
            retention_check_seconds=section.retention_check_seconds,
            clock_tolerance_ms=section.clock_tolerance_ms,
        )

    def salt_file(self, messages: MessageAuditSettings) -> Path:
        """Where the message-id HMAC salt lives."""
        return Path(messages.salt_file) if messages.salt_file else self.key_file.parent / "message-ids.salt"
