"""The writer: an open, append-only, hash-chained, checkpointed audit log.

``AuditLog.open(settings)`` resumes (or creates) the log in ``settings.directory`` and always starts a
new segment, so a file is never written to again after the process that wrote it stopped (a torn
last line from a crash stays where it is and is acknowledged by a ``finding`` record in the new
segment). ``append`` is synchronous and cheap (encode, hash, one ``write()``): call it from the
event loop; do the slow parts, ``sync()`` (fsync), ``expire()`` and ``close()``, from a worker
thread. All methods are thread-safe.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from host.logs import logger
from host.model import AuditEntry, now_ms
from host_audit.errors import AuditWriteError, LogClosedError, LogCorruptError, LogLockedError
from host_audit.keys import (
    SigningKey,
    checkpoint_message,
    endorsement_message,
    load_or_create_key,
    load_signing_key,
    retired_key_path,
)
from host_audit.records import (
    ZERO_HASH,
    CheckpointNote,
    CheckpointRecord,
    ExpiredSegment,
    ExpiryRecord,
    FindingRecord,
    RecordHead,
    SegmentRecord,
    encode,
    entry_record,
    seal,
    split_line,
)
from host_audit.segments import (
    CHECKPOINTS_FILE,
    LOCK_FILE,
    list_segments,
    read_first_line,
    read_tail,
    segment_index,
    segment_name,
)
from host_audit.settings import LogSettings

__all__ = ["AuditLog", "LogStats"]

_DAY_MS = 86_400_000
#: Torn fragments up to this size are copied into the finding that acknowledges them.
_MAX_FRAGMENT_COPY = 64 * 1024
_head_decoder = msgspec.json.Decoder(RecordHead)
_segment_decoder = msgspec.json.Decoder(SegmentRecord)
_checkpoint_decoder = msgspec.json.Decoder(CheckpointRecord)


@dataclass(slots=True)
class LogStats:
    """Counters since the log was opened (exported as metrics)."""

    entries: int = 0
    checkpoints: int = 0
    segments: int = 0
    findings: int = 0
    expired_segments: int = 0
    write_errors: int = 0
    syncs: int = 0
    sync_errors: int = 0
    clock_steps: int = 0


class AuditLog:
    """One open audit log. Create with ``AuditLog.open(settings)``; one writer per directory."""

    def __init__(self, settings: LogSettings, *, clock: Callable[[], int] = now_ms) -> None:
        self.settings = settings
        self.directory = settings.directory
        self.stats = LogStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._tolerance = settings.clock_tolerance_ms
        self._checkpoint_ms = int(settings.checkpoint_every_seconds * 1000)
        self._segment_max_ms = int(settings.segment_max_seconds * 1000)
        self._lock_fd = self._dir_fd = self._fd = self._cp_fd = -1
        self._pending_fds: list[int] = []
        self._sync_wanted = self._cp_dirty = self._dir_dirty = False
        self._closed = True
        self._broken: str | None = None
        self._clock_stepped = False
        self.log_id = ""
        self.key: SigningKey | None = None
        #: Findings recorded while opening (torn tails, unclean shutdown...), for callers to report.
        self.opening_findings: list[FindingRecord] = []
        self._written_findings: list[FindingRecord] = []
        self._seq = 0
        self._prev = ZERO_HASH
        self._max_ts = 0
        self._segment = ""
        self._segment_index = -1
        self._segment_bytes = self._segment_records = 0
        self._segment_started = 0
        self._since_checkpoint = 0
        self._last_checkpoint_ts = 0
        self._cp_size = 0
        self._cp_cut_at: int | None = None
        self._retired_used = False

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: LogSettings, *, clock: Callable[[], int] = now_ms) -> AuditLog:
        """Open (creating on first run) the log in ``settings.directory``. Blocking: disk I/O.

        Raises ``LogLockedError``, ``KeyFileError``, ``LogCorruptError`` or ``OSError``.
        """
        log = cls(settings, clock=clock)
        try:
            log._open()
        except BaseException:
            log._release_fds()
            raise
        return log

    def _open(self) -> None:
        directory = self.directory
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif directory.stat().st_mode & 0o077:
            logger.warning("audit directory {} is accessible by group/others; chmod 700 it", directory)
        self._acquire_lock()
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.key, created = load_or_create_key(self.settings.key_file)
        if created:
            logger.info("audit: generated signing key {} at {}", self.key.key_id, self.settings.key_file)
        findings: list[tuple[str, dict[str, Any]]] = []
        self._open_checkpoint_file(findings)
        self._resume(findings)
        self._closed = False

    def _acquire_lock(self) -> None:
        path = self.directory / LOCK_FILE
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LogLockedError(
                f"audit directory {self.directory} is in use by another process (pid {holder}); "
                "only one host may write an audit log"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _open_checkpoint_file(self, findings: list[tuple[str, dict[str, Any]]]) -> None:
        path = self.directory / CHECKPOINTS_FILE
        if path.exists():
            tail = read_tail(path)
            if tail.fragment:
                # The torn bytes are copied into a finding; once that is written (``_resume``) they
                # are cut, so the file stays line-valid.
                findings.append(("torn_tail", _fragment_details(CHECKPOINTS_FILE, tail.fragment, tail.fragment_offset)))
                self._cp_cut_at = tail.fragment_offset
        self._cp_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._cp_size = os.fstat(self._cp_fd).st_size

    def _resume(self, findings: list[tuple[str, dict[str, Any]]]) -> None:
        existing = list_segments(self.directory)
        next_index = (segment_index(existing[-1].name) or 0) + 1 if existing else 0
        last_path: Path | None = None
        for path in reversed(list(existing)):
            tail = read_tail(path)
            if tail.size == 0:
                # Created but not even its header written: nothing to lose, and it would break the chain.
                path.unlink()
                existing.remove(path)
                self._dir_dirty = True
                findings.append(("empty_segment", {"segment": path.name}))
                continue
            if tail.fragment:
                findings.append(("torn_tail", _fragment_details(path.name, tail.fragment, tail.fragment_offset)))
            if tail.last_line is not None:
                last_path = path
                break
            # Only a torn header: the file stays (acknowledged by the finding); look further back.
        prev_segment = existing[-1].name if existing else None
        key = self.key
        assert key is not None
        if last_path is None:
            if existing:
                raise LogCorruptError(
                    f"{self.directory} holds segment files but no complete record; move them aside to start a new log"
                )
            self.log_id = secrets.token_hex(16)
            self._create_segment(next_index, "genesis", prev_segment=None)
        else:
            last_line = read_tail(last_path).last_line
            assert last_line is not None
            parts = split_line(last_line)
            header_line = read_first_line(last_path)
            try:
                if parts is None or header_line is None:
                    raise ValueError("no hash")
                head = _head_decoder.decode(last_line)
                header = _segment_decoder.decode(header_line)
                prev = bytes.fromhex(parts[1].decode())
                clean = head.type == "checkpoint" and _checkpoint_decoder.decode(last_line).reason == "shutdown"
            except (ValueError, msgspec.DecodeError) as exc:  # UnicodeDecodeError is a ValueError
                raise LogCorruptError(
                    f"cannot resume the audit log: the last record or the header of {last_path} is "
                    f"unreadable ({exc}); run `python -m host audit verify {self.directory}`"
                ) from None
            self.log_id = header.log
            self._seq, self._prev, self._max_ts = head.seq + 1, prev, head.ts
            if not clean:
                findings.append(("unclean_shutdown", {"last_seq": head.seq, "last_type": head.type}))
            endorsement, endorsed_by = None, None
            if header.key_id != key.key_id:
                endorsement, endorsed_by = self._endorse(header.key_id)
                findings.append(
                    ("key_change", {"previous": header.key_id, "new": key.key_id, "endorsed": endorsement is not None})
                )
            self._create_segment(next_index, "start", prev_segment=prev_segment,
                                 endorsement=endorsement, endorsed_by=endorsed_by)
        for kind, details in findings:
            self._finding(kind, details)
        self.opening_findings = list(self._written_findings)
        if self._cp_cut_at is not None:
            os.ftruncate(self._cp_fd, self._cp_cut_at)
            self._cp_size = self._cp_cut_at
        self._checkpoint("start")
        self._fsync_now()
        if self._retired_used:
            self._drop_retired_key(retired_key_path(self.settings.key_file))

    def _endorse(self, previous_key_id: str) -> tuple[str | None, str | None]:
        key = self.key
        assert key is not None
        retired = retired_key_path(self.settings.key_file)
        if retired.exists():
            old = load_signing_key(retired)
            if old.key_id == previous_key_id:
                message = endorsement_message(self.log_id, key.key_id, key.public.b64)
                self._retired_used = True
                return base64.b64encode(old.sign(message)).decode(), old.key_id
            logger.warning("audit: {} is key {}, not the log's previous key {}; ignored",
                           retired, old.key_id, previous_key_id)
        logger.warning(
            "audit: signing key changed from {} to {} with no endorsement by the previous key; "
            "verifiers must pin the new key (python -m host audit export-key)",
            previous_key_id, key.key_id,
        )
        return None, None

    def _drop_retired_key(self, retired: Path) -> None:
        # The retired key's only job was to endorse its successor, which is now durable in the log.
        retired.unlink(missing_ok=True)
        logger.info("audit: the retired signing key endorsed its successor and was deleted ({})", retired)

    # -- appending ----------------------------------------------------------------------------

    def append(self, entry: AuditEntry) -> int:
        """Write ``entry`` as the next record; returns its sequence number.

        Raises ``LogClosedError`` if the log is closed, ``AuditWriteError`` if the write failed (the
        entry is then not in the log; the next append continues in a new segment).
        """
        with self._lock:
            if self._broken is not None or self._closed:
                self._ensure_writable()
            ts = self._clock()
            if ts >= self._max_ts:
                self._max_ts = ts
                self._clock_stepped = False
            elif ts < self._max_ts - self._tolerance:
                ts = self._clock_step(ts)
            if (
                self._segment_bytes >= self.settings.segment_max_bytes
                or self._segment_records >= self.settings.segment_max_records
                or ts - self._segment_started >= self._segment_max_ms
            ):
                self._rotate()
                ts = self._ts()
            seq = self._seq
            self._emit(entry_record(entry, seq, ts))
            self.stats.entries += 1
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.settings.checkpoint_every_records:
                self._checkpoint_after_entry("count")
            elif ts - self._last_checkpoint_ts >= self._checkpoint_ms:
                self._checkpoint_after_entry("time")
            return seq

    def _checkpoint_after_entry(self, reason: str) -> None:
        # The entry is stored: a failed checkpoint is logged, not reported as a lost entry.
        try:
            self._checkpoint(reason)
        except AuditWriteError as exc:
            logger.error("audit: {} checkpoint failed: {}", reason, exc)

    def _ts(self) -> int:
        ts = self._clock()
        if ts >= self._max_ts:
            self._max_ts = ts
            return ts
        return ts if ts >= self._max_ts - self._tolerance else self._max_ts

    def _clock_step(self, now: int) -> int:
        # The wall clock went back further than the tolerance: keep timestamps monotonic (within
        # tolerance) and say so in the log, once per step.
        if not self._clock_stepped:
            self._clock_stepped = True
            self.stats.clock_steps += 1
            logger.warning("audit: wall clock is {} ms behind the newest record; holding timestamps",
                           self._max_ts - now)
            self._finding("clock_step", {"clock_ms": now, "newest_ms": self._max_ts, "behind_ms": self._max_ts - now})
        return self._max_ts

    def _emit(self, record: msgspec.Struct) -> None:
        line, digest = seal(self._prev, encode(record))
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            self.stats.write_errors += 1
            logger.error("audit: cannot write to {}: {}", self._segment, self._broken)
            raise AuditWriteError(f"audit record not written to {self._segment}: {self._broken}") from exc
        self._prev = digest
        self._seq += 1
        self._segment_bytes += len(line)
        self._segment_records += 1

    def _finding(self, kind: str, details: dict[str, Any]) -> None:
        record = FindingRecord(seq=self._seq, ts=self._ts(), kind=kind, details=details)
        self._emit(record)
        self._written_findings.append(record)
        self.stats.findings += 1
        self._since_checkpoint += 1

    def _create_segment(
        self,
        index: int,
        reason: str,
        *,
        prev_segment: str | None,
        endorsement: str | None = None,
        endorsed_by: str | None = None,
    ) -> None:
        key = self.key
        assert key is not None
        name = segment_name(index)
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask
        if self._fd >= 0:
            self._pending_fds.append(self._fd)
        self._fd, self._segment, self._segment_index = fd, name, index
        self._segment_bytes = self._segment_records = 0
        ts = self._ts()
        self._segment_started = ts
        self._dir_dirty = self._sync_wanted = True
        header = SegmentRecord(
            seq=self._seq,
            ts=ts,
            log=self.log_id,
            segment=name,
            prev_segment=prev_segment,
            prev_hash=self._prev.hex(),
            reason=reason,
            key_id=key.key_id,
            public_key=key.public.b64,
            endorsement=endorsement,
            endorsed_by=endorsed_by,
        )
        self._emit(header)
        self.stats.segments += 1

    def _rotate(self) -> None:
        self._checkpoint("rotate")
        self._create_segment(self._segment_index + 1, "rotate", prev_segment=self._segment)

    def _checkpoint(self, reason: str) -> None:
        key = self.key
        assert key is not None
        ts = self._ts()
        size, head = self._seq, self._prev.hex()
        sig = base64.b64encode(key.sign(checkpoint_message(self.log_id, size, head, ts))).decode()
        self._emit(CheckpointRecord(seq=size, ts=ts, log=self.log_id, size=size, head=head,
                                    key_id=key.key_id, sig=sig, reason=reason))
        self._since_checkpoint = 0
        self._last_checkpoint_ts = ts
        self._sync_wanted = self._cp_dirty = True
        self.stats.checkpoints += 1
        note = encode(CheckpointNote(log=self.log_id, size=size, head=head, ts=ts, key_id=key.key_id,
                                     sig=sig, reason=reason)) + b"\n"
        try:
            _write_all(self._cp_fd, note)
        except OSError as exc:
            self.stats.write_errors += 1
            with contextlib.suppress(OSError):
                os.ftruncate(self._cp_fd, self._cp_size)  # no torn line left in the checkpoint file
            raise AuditWriteError(f"checkpoint not written to {CHECKPOINTS_FILE}: {exc}") from exc
        self._cp_size += len(note)

    def _ensure_writable(self) -> None:
        if self._closed:
            raise LogClosedError(f"the audit log in {self.directory} is not open")
        if self._broken is not None:
            self._recover()

    def _recover(self) -> None:
        """After a failed write: close the damaged segment, continue in a new one, say what happened."""
        damaged = self.directory / self._segment
        error = self._broken
        findings: list[tuple[str, dict[str, Any]]] = [("write_failed", {"segment": self._segment, "error": error})]
        prev_segment: str | None = self._segment
        tail = read_tail(damaged)
        if tail.size == 0:
            damaged.unlink()
            findings.append(("empty_segment", {"segment": damaged.name}))
            older = [p for p in list_segments(self.directory) if (segment_index(p.name) or 0) < self._segment_index]
            prev_segment = older[-1].name if older else None
        elif tail.fragment:
            findings.append(("torn_tail", _fragment_details(damaged.name, tail.fragment, tail.fragment_offset)))
        self._broken = None
        self._create_segment(self._segment_index + 1, "recover", prev_segment=prev_segment)
        for kind, details in findings:
            self._finding(kind, details)
        logger.warning("audit: continued in {} after a failed write ({})", self._segment, error)

    # -- periodic work (call from a worker thread) ---------------------------------------------

    def checkpoint_if_due(self) -> bool:
        """Write a ``time`` checkpoint if records are waiting and the interval passed."""
        with self._lock:
            if self._closed or self._broken is not None or self._since_checkpoint == 0:
                return False
            if self._clock() - self._last_checkpoint_ts < self._checkpoint_ms:
                return False
            self._checkpoint("time")
            return True

    @property
    def sync_wanted(self) -> bool:
        """A checkpoint or new segment was written since the last ``sync()``."""
        return self._sync_wanted

    def sync(self) -> None:
        """fsync what was written (segment, checkpoint file, directory). Blocking: use a thread."""
        with self._lock:
            if self._fd < 0:
                return
            fds = [os.dup(self._fd)]
            if self._cp_dirty:
                fds.append(os.dup(self._cp_fd))
                self._cp_dirty = False
            if self._dir_dirty:
                fds.append(os.dup(self._dir_fd))
                self._dir_dirty = False
            fds.extend(self._pending_fds)
            self._pending_fds = []
            self._sync_wanted = False
        self._fsync_and_close(fds)

    def _fsync_now(self) -> None:
        # Used where the caller already holds the lock or owns the log exclusively (open/close).
        fds = [os.dup(fd) for fd in (self._fd, self._cp_fd, self._dir_fd) if fd >= 0]
        fds.extend(self._pending_fds)
        self._pending_fds = []
        self._sync_wanted = self._cp_dirty = self._dir_dirty = False
        self._fsync_and_close(fds)

    def _fsync_and_close(self, fds: list[int]) -> None:
        error: OSError | None = None
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as exc:
                error = exc
            finally:
                os.close(fd)
        self.stats.syncs += 1
        if error is not None:
            self.stats.sync_errors += 1
            raise AuditWriteError(f"fsync of the audit log failed: {error}") from error

    def expire(self) -> list[str]:
        """Apply retention: record, checkpoint, sync, then delete segments older than the limit.

        A segment expires when its newest record is older than ``retention_days``; only a prefix of
        the chain expires (never the current segment). Returns the deleted file names. Blocking.
        """
        days = self.settings.retention_days
        if days <= 0:
            return []
        with self._lock:
            if self._closed:
                return []
            current = self._segment_index
        cutoff = self._clock() - days * _DAY_MS
        expired: list[tuple[Path, ExpiredSegment]] = []
        for path in list_segments(self.directory):
            if (segment_index(path.name) or 0) >= current:
                break
            info = _describe_segment(path)
            newest = info.last_ts if info.last_ts is not None else int(path.stat().st_mtime * 1000)
            if newest >= cutoff:
                break
            expired.append((path, info))
        if not expired:
            return []
        with self._lock:
            self._ensure_writable()
            record = ExpiryRecord(seq=self._seq, ts=self._ts(), retention_days=days, segments=[i for _, i in expired])
            self._emit(record)
            self._since_checkpoint += 1
            self._checkpoint("expiry")
        self.sync()  # the expiry record must be durable before the data it describes goes
        for path, _ in expired:
            path.unlink(missing_ok=True)
        with self._lock:
            self._dir_dirty = True
        self.sync()
        self.stats.expired_segments += len(expired)
        names = [p.name for p, _ in expired]
        logger.info("audit: retention ({} days) expired {} segment(s): {}", days, len(names), ", ".join(names))
        return names

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Write the final (``shutdown``) checkpoint, fsync and close. Blocking; idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._broken is not None:
                    self._recover()
                self._checkpoint("shutdown")
            except (AuditWriteError, OSError) as exc:
                logger.error("audit: final checkpoint not written: {}", exc)
            finally:
                self._closed = True
                try:
                    self._fsync_now()
                finally:
                    self._release_fds()

    def _release_fds(self) -> None:
        for fd in (self._fd, self._cp_fd, self._dir_fd, *self._pending_fds, self._lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._cp_fd = self._dir_fd = self._lock_fd = -1
        self._pending_fds = []

    @property
    def closed(self) -> bool:
        return self._closed

    # -- introspection --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The sequence number the next record will get (= records written so far)."""
        return self._seq

    @property
    def head_hash(self) -> str:
        return self._prev.hex()

    @property
    def segment_path(self) -> Path:
        return self.directory / self._segment

    @property
    def key_id(self) -> str:
        return self.key.key_id if self.key else ""

    @property
    def last_checkpoint_ts(self) -> int:
        return self._last_checkpoint_ts

    @property
    def records_since_checkpoint(self) -> int:
        return self._since_checkpoint


def _write_all(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    while written < len(data):  # short writes are legal (signals, nearly full disks)
        written += os.write(fd, data[written:])


def _fragment_details(segment: str, fragment: bytes, offset: int) -> dict[str, Any]:
    details: dict[str, Any] = {
        "segment": segment,
        "offset": offset,
        "length": len(fragment),
        "sha256": hashlib.sha256(fragment).hexdigest(),
    }
    if len(fragment) <= _MAX_FRAGMENT_COPY:
        details["fragment_b64"] = base64.b64encode(fragment).decode()
    return details


def _describe_segment(path: Path) -> ExpiredSegment:
    """First/last sequence numbers and last hash of a closed segment (for expiry records)."""
    first_seq = last_seq = last_ts = None
    last_hash = None
    header = read_first_line(path)
    if header is not None:
        with contextlib.suppress(msgspec.DecodeError, ValueError):
            first_seq = _head_decoder.decode(header).seq
    last_line = read_tail(path).last_line
    if last_line is not None:
        parts = split_line(last_line)
        with contextlib.suppress(msgspec.DecodeError, ValueError):
            head = _head_decoder.decode(last_line)
            last_seq, last_ts = head.seq, head.ts
            last_hash = parts[1].decode() if parts else None
    return ExpiredSegment(name=path.name, first_seq=first_seq, last_seq=last_seq, last_hash=last_hash, last_ts=last_ts)
