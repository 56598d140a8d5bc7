"""The audit plugin's exceptions.

::

    AuditError
    ├── AuditConfigError     an ``[audit]`` setting is unusable (names the key and the fix)
    ├── KeyFileError         the signing key cannot be created, read or trusted (e.g. mode not 0600)
    ├── LogLockedError       another process has the audit directory open
    ├── LogClosedError       an append was attempted on a log that is not open
    ├── AuditWriteError      a record could not be written (disk full, I/O error); the log recovers
    │                        into a new segment on the next append
    └── LogCorruptError      the log cannot be resumed (its last record is unreadable)

Verification problems are not exceptions: ``verify_log`` returns a ``VerifyReport`` describing the
first bad record.
"""

from __future__ import annotations

__all__ = [
    "AuditConfigError",
    "AuditError",
    "AuditWriteError",
    "KeyFileError",
    "LogClosedError",
    "LogCorruptError",
    "LogLockedError",
]


class AuditError(Exception):
    """Base of every error the audit plugin raises on purpose."""


class AuditConfigError(AuditError):
    """An ``[audit]`` setting is unusable."""


class KeyFileError(AuditError):
    """The signing key cannot be created, read or trusted."""


class LogLockedError(AuditError):
    """Another process holds the audit directory's lock."""


class LogClosedError(AuditError):
    """The log is not open (startup failed, or it was already closed)."""


class AuditWriteError(AuditError):
    """A record could not be written; it is not in the log."""


class LogCorruptError(AuditError):
    """The existing log cannot be resumed safely."""
