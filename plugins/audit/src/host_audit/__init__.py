"""host-audit: a tamper-evident audit log for ``host``.

Hash-chained JSON-lines segments, Ed25519-signed checkpoints (in the log and in
``checkpoints.jsonl`` for off-host copies), retention, and ``python -m host audit verify``.
The plugin module is ``host_audit.plugin``; the pieces are usable on their own:

* ``AuditLog`` — the writer (``AuditLog.open(LogSettings.for_directory(path))``);
* ``verify_log`` — the verifier, returning a ``VerifyReport``.
"""

from __future__ import annotations

from host_audit.log import AuditLog
from host_audit.settings import AuditSection, LogSettings
from host_audit.verify import VerifyReport, verify_log

__version__ = "0.1.0"

__all__ = ["AuditLog", "AuditSection", "LogSettings", "VerifyReport", "__version__", "verify_log"]
