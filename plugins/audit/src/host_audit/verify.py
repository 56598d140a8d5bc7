"""The verifier: re-derives the whole chain and checks every checkpoint.

``verify_log(directory)`` reads every segment in order and checks, for each line:

1. it parses as a JSON record with ``seq``, ``ts``, ``type`` and ``h``;
2. its ``seq`` is the previous one + 1 (deleted, inserted and reordered records break this);
3. ``h`` equals ``SHA-256(0x00 ‖ previous h ‖ the line before its last 72 bytes)`` (an edited byte
   breaks this);
4. its ``ts`` is not more than ``clock_tolerance_ms`` behind the newest earlier timestamp

(``host_audit.scan``, run in worker processes for large logs),

and per record type: a ``segment`` header names its own file, the previous file, the previous hash
and the log id (a removed, renamed or reordered segment breaks this); a ``checkpoint`` covers exactly
the records before it, its ``head`` is the hash of the record before it and its Ed25519 signature
verifies with a trusted key; ``finding`` records acknowledge torn lines left by crashes; ``expiry``
records anchor what remains after retention. Then every line of the checkpoint file(s) (the off-host
copies) is checked against the log: a valid signature, the same log id, and a head that matches the
log at that size, which detects a log truncated or rewritten after that checkpoint was copied.

It stops at the first problem and reports it (``VerifyReport.problem``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import msgspec

from host_audit.keys import PublicKey, checkpoint_message, endorsement_message
from host_audit.records import (
    FORMAT_VERSION,
    ZERO_HASH,
    CheckpointNote,
    CheckpointRecord,
    ExpiryRecord,
    FindingRecord,
    RecordHead,
    SegmentRecord,
)
from host_audit.scan import (
    Scan,
    default_jobs,
    iso_ms,
    plan_ranges,
    read_range,
    scan_lines,
    scan_range,
    stored_hash_before,
)
from host_audit.segments import CHECKPOINTS_FILE, list_segments, read_first_line, read_tail

__all__ = ["DEFAULT_CLOCK_TOLERANCE_MS", "Problem", "VerifyReport", "verify_log"]

#: Timestamps may go back this much (ms) behind the newest earlier record (NTP steps, VM pauses).
DEFAULT_CLOCK_TOLERANCE_MS = 5000
#: Logs at least this big are verified by worker processes (``jobs=None``), in runs of this size.
PARALLEL_MIN_BYTES = 24 << 20
CHUNK_BYTES = 8 << 20


_head_decoder = msgspec.json.Decoder(RecordHead)
_segment_decoder = msgspec.json.Decoder(SegmentRecord)
_checkpoint_decoder = msgspec.json.Decoder(CheckpointRecord)
_finding_decoder = msgspec.json.Decoder(FindingRecord)
_expiry_decoder = msgspec.json.Decoder(ExpiryRecord)
_note_decoder = msgspec.json.Decoder(CheckpointNote)
_ZERO_HEX = ZERO_HASH.hex()
#: What decoding a damaged line can raise (msgspec reports invalid UTF-8 as UnicodeDecodeError).
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing found wrong: where, which record, and why."""

    where: str
    seq: int | None
    kind: str
    reason: str

    def __str__(self) -> str:
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"{self.where}{seq}: {self.reason}"


@dataclass(slots=True)
class VerifyReport:
    """What ``verify_log`` found. ``ok`` is true only when no problem was found."""

    directory: Path
    problem: Problem | None = None
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    segments: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    log_id: str = ""
    checkpoints_in_log: int = 0
    checkpoint_files: list[Path] = field(default_factory=list)
    checkpoints_in_files: int = 0
    #: Key ids whose signatures were accepted.
    keys_used: list[str] = field(default_factory=list)
    pinned: bool = False
    #: Findings the log recorded about itself, as ``kind: detail`` strings.
    findings: list[str] = field(default_factory=list)
    #: Describes the retention anchor when the log no longer starts at seq 0.
    expired: str | None = None
    #: Records after the last checkpoint (not covered by any signature yet).
    unanchored: int = 0
    #: The last record is a ``shutdown`` checkpoint.
    clean_end: bool = False
    warnings: list[str] = field(default_factory=list)
    clock_tolerance_ms: int = DEFAULT_CLOCK_TOLERANCE_MS
    #: Processes that scanned the records.
    jobs: int = 1
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        """A human-readable report (what ``python -m host audit verify`` prints)."""
        lines = []
        if self.problem is not None:
            lines.append(f"audit log INVALID: {self.directory}")
            lines.append(f"  first problem: {self.problem}")
            if self.records:
                lines.append(f"  {self.records:,} record(s) verified before it")
            lines.extend(f"  warning: {w}" for w in self.warnings)
            return "\n".join(lines)
        rate = self.records / self.elapsed if self.elapsed > 0 else 0.0
        lines.append(f"audit log OK: {self.directory}")
        lines.append(f"  log id:       {self.log_id}")
        lines.append(
            f"  records:      {self.records:,} (seq {self.first_seq}..{self.last_seq}) in {self.segments} segment(s)"
        )
        if self.first_ts is not None and self.last_ts is not None:
            lines.append(f"  time span:    {_iso(self.first_ts)} .. {_iso(self.last_ts)}")
        lines.append(f"  timestamps:   monotonic within {self.clock_tolerance_ms} ms")
        files = ", ".join(str(p) for p in self.checkpoint_files) or "none"
        lines.append(
            f"  checkpoints:  {self.checkpoints_in_log} in the log, {self.checkpoints_in_files} in {files}; "
            "all signatures valid"
        )
        keys = ", ".join(self.keys_used) or "none"
        if self.pinned:
            lines.append(f"  signing keys: {keys} (pinned with --public-key)")
        else:
            lines.append(
                f"  signing keys: {keys} (taken from the log itself, NOT pinned: a log rewritten and "
                "re-signed with another key would pass; use --public-key)"
            )
        if not self.checkpoint_files:
            lines.append("  tail:         no checkpoint file: truncation after the last in-log checkpoint is undetectable")
        if self.clean_end:
            lines.append("  end:          clean shutdown (final signed checkpoint)")
        else:
            lines.append(
                f"  end:          {self.unanchored} record(s) after the last checkpoint "
                "(host running, or stopped without its final checkpoint)"
            )
        if self.expired:
            lines.append(f"  retention:    {self.expired}")
        for finding in self.findings:
            lines.append(f"  finding:      {finding}")
        lines.extend(f"  warning:      {w}" for w in self.warnings)
        lines.append(f"  verified in {self.elapsed:.3f} s ({rate:,.0f} records/s, {self.jobs} process(es))")
        return "\n".join(lines)


@dataclass(slots=True)
class _SegmentPlan:
    """What is known about a segment file before its records are checked."""

    path: Path
    size: int
    #: Offset just after the last complete line (``size`` unless the file ends in a torn line).
    end: int
    fragment_sha256: str | None
    #: The first line, when complete.
    header: bytes | None
    #: The header's ``prev_hash`` (where a scan of the file starts from); zeros if unreadable.
    header_prev: bytes
    _ranges: list[tuple[int, int]] | None = None

    @classmethod
    def of(cls, path: Path) -> _SegmentPlan:
        tail = read_tail(path)
        fragment = hashlib.sha256(tail.fragment).hexdigest() if tail.fragment else None
        header = read_first_line(path) if tail.fragment_offset > 0 else None
        header_prev = ZERO_HASH
        if header is not None:
            with contextlib.suppress(msgspec.DecodeError, ValueError):  # reported when checked
                header_prev = bytes.fromhex(_segment_decoder.decode(header).prev_hash)
        return cls(path, tail.size, tail.fragment_offset, fragment, header, header_prev)

    def ranges(self, chunk_bytes: int) -> list[tuple[int, int]]:
        if self._ranges is None:
            self._ranges = plan_ranges(self.path, self.end, chunk_bytes)
        return self._ranges


class _Bad(Exception):
    def __init__(self, problem: Problem) -> None:
        self.problem = problem


_iso = iso_ms


def verify_log(
    directory: str | Path,
    *,
    public_keys: list[PublicKey] | None = None,
    checkpoint_files: list[Path] | None = None,
    clock_tolerance_ms: int = DEFAULT_CLOCK_TOLERANCE_MS,
    jobs: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> VerifyReport:
    """Verify the audit log in ``directory``.

    :param public_keys: pinned keys; only checkpoints signed by one of them are accepted. Without
        them the keys announced in the log are used (and the report says so).
    :param checkpoint_files: checkpoint files to check the log against (e.g. the off-host copy);
        ``None`` means ``<directory>/checkpoints.jsonl`` if it exists.
    :param clock_tolerance_ms: how far a timestamp may go back behind the newest earlier one.
    :param jobs: worker processes scanning runs of ``chunk_bytes`` in parallel (the checks that need
        the order, and the report, stay in this process); ``None``: as many as CPUs (at most 4) for
        logs of ``PARALLEL_MIN_BYTES`` or more, else 1.
    """
    verifier = _Verifier(Path(directory), public_keys, checkpoint_files, clock_tolerance_ms)
    verifier.jobs, verifier.chunk_bytes = jobs, chunk_bytes
    started = time.perf_counter()
    try:
        verifier.run()
    except _Bad as bad:
        verifier.report.problem = bad.problem
    verifier.report.elapsed = time.perf_counter() - started
    return verifier.report


class _Verifier:
    def __init__(
        self,
        directory: Path,
        public_keys: list[PublicKey] | None,
        checkpoint_files: list[Path] | None,
        tolerance: int,
    ) -> None:
        self.directory = directory
        self.tolerance = tolerance
        self.report = VerifyReport(directory=directory, clock_tolerance_ms=tolerance)
        self.pinned = {k.key_id: k for k in public_keys} if public_keys else None
        self.report.pinned = self.pinned is not None
        #: Keys whose checkpoint signatures are accepted.
        self.trusted: dict[str, PublicKey] = dict(self.pinned or {})
        #: Every key announced by a segment header: key id -> seq of the header.
        self.announced: dict[str, int] = {}
        self.used: dict[str, None] = {}
        #: (key id, signature, signed bytes) already verified.
        self.verified: set[tuple[str, str, bytes]] = set()
        if checkpoint_files is None:
            default = directory / CHECKPOINTS_FILE
            checkpoint_files = [default] if default.exists() else []
        self.checkpoint_files = checkpoint_files
        self.report.checkpoint_files = list(checkpoint_files)
        self.log_id: str | None = None
        self.seq: int | None = None
        self.prev = ZERO_HASH
        self.max_ts = -(1 << 62)
        self.segment_key: str | None = None
        #: Torn fragments not yet acknowledged: (segment, offset, length, sha256) -> description.
        self.torn: dict[tuple[str, int, int, str], str] = {}
        #: next seq -> hash that an expiry record vouches for, and the expired file names.
        self.anchors: dict[int, str] = {}
        self.expired_names: set[str] = set()
        self.start_anchor: tuple[int, str, str | None, str] | None = None
        self.wanted: set[int] = set()
        self.heads: dict[int, str] = {}
        self.last_checkpoint_size: int | None = None
        self.last_type = ""
        self.last_reason = ""
        self.jobs: int | None = None
        self.chunk_bytes = CHUNK_BYTES

    # -- driver ----------------------------------------------------------------------------------

    def run(self) -> None:
        if not self.directory.is_dir():
            raise _Bad(Problem(str(self.directory), None, "missing", "not a directory"))
        files = self._read_checkpoint_files()
        self.wanted = {note.size for notes in files for _, note in notes}
        segments = list_segments(self.directory)
        if not segments:
            raise _Bad(Problem(str(self.directory), None, "empty", "no segment files (segment-*.jsonl)"))
        plans = [_SegmentPlan.of(path) for path in segments]
        jobs = self.jobs
        if jobs is None:
            jobs = default_jobs() if sum(p.end for p in plans) >= PARALLEL_MIN_BYTES else 1
        self.report.jobs = jobs
        if jobs > 1:
            self._walk_parallel(plans, jobs)
        else:
            self._walk(plans, {})
        if self.seq is None:
            raise _Bad(Problem(str(self.directory), None, "empty", "no complete record in any segment"))
        if self.seq in self.wanted:
            self.heads[self.seq] = self.prev.hex()
        self._check_start()
        self._check_torn()
        for notes in files:
            last_size, last_ts = -1, -(1 << 62)
            for where, note in notes:
                self._check_note(where, note)
                if note.size < last_size or note.ts < last_ts - self.tolerance:
                    raise _Bad(Problem(where, None, "checkpoint_file", "signed checkpoints out of order: reordered"))
                last_size, last_ts = note.size, max(last_ts, note.ts)
        report = self.report
        report.last_seq = self.seq - 1
        report.keys_used = list(self.used)
        report.clean_end = self.last_type == "checkpoint" and self.last_reason == "shutdown"
        if self.last_checkpoint_size is None:
            report.unanchored = report.records
        else:
            report.unanchored = self.seq - self.last_checkpoint_size - 1

    # -- segments ----------------------------------------------------------------------------------

    def _walk_parallel(self, plans: list[_SegmentPlan], jobs: int) -> None:
        # fork: the workers need nothing but this module, already imported.
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork"))
        wanted = frozenset(self.wanted)
        futures: dict[tuple[str, int], Future[Scan]] = {}
        try:
            for plan in plans:
                for start, stop in plan.ranges(self.chunk_bytes):
                    prev = plan.header_prev if start == 0 else stored_hash_before(plan.path, start)
                    futures[(plan.path.name, start)] = pool.submit(
                        scan_range, plan.path, start, stop, prev, self.tolerance, wanted
                    )
            self._walk(plans, futures)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _walk(self, plans: list[_SegmentPlan], futures: dict[tuple[str, int], Future[Scan]]) -> None:
        """Check the segments in order; runs scanned ahead in ``futures`` are used when they fit."""
        prev_name: str | None = None
        for plan in plans:
            name = plan.path.name
            if plan.size == 0:
                raise _Bad(Problem(name, None, "empty_segment", "empty segment file (crash while creating it, or emptied)"))
            if plan.fragment_sha256 is not None:
                key = (name, plan.end, plan.size - plan.end, plan.fragment_sha256)
                self.torn[key] = f"{name} ends with a torn line at byte {plan.end} ({plan.size - plan.end} bytes)"
            if plan.header is not None:
                self.report.segments += 1
                self._header(name, prev_name, plan.header)
                if self.report.first_ts is None:
                    self.report.first_ts = _head_decoder.decode(plan.header).ts
                base = 0
                ranges = plan.ranges(self.chunk_bytes) if futures else [(0, plan.end)]
                for start, stop in ranges:
                    future = futures.get((name, start))
                    base += self._apply(name, base, self._scan(plan.path, start, stop, future))
            prev_name = name

    def _scan(self, path: Path, start: int, stop: int, future: Future[Scan] | None) -> Scan:
        assert self.seq is not None
        if future is not None:
            scan = future.result()
            if scan.continues(self.prev, self.seq, self.max_ts, self.tolerance):
                return scan
        # Sequential mode, or the run did not fit (a problem in it or at its start): scan it again
        # from the exact state, which also pinpoints the first bad line.
        return scan_lines(read_range(path, start, stop), self.prev, self.seq, self.max_ts, self.tolerance, self.wanted)

    def _apply(self, name: str, base: int, scan: Scan) -> int:
        """Take a scanned run: check its special records in order, then its first problem if any."""
        for index, seq, kind, line, prev in scan.specials:
            self.prev = prev
            self._special(name, base + index, kind, line, seq)
        if scan.error is not None:
            bad_index, bad_seq, bad_kind, reason = scan.error
            raise _Bad(Problem(f"{name} line {base + bad_index + 1}", bad_seq, bad_kind, reason))
        self.heads.update(scan.heads)
        if scan.count:
            assert scan.end_seq is not None
            self.report.records += scan.count
            self.prev, self.seq, self.last_type = scan.end_prev, scan.end_seq, scan.last_type
            self.max_ts = max(self.max_ts, scan.max_ts)
            self.report.last_ts = self.max_ts
        return scan.total

    def _header(self, name: str, prev_name: str | None, line: bytes) -> None:
        where = f"{name} line 1"
        try:
            header = _segment_decoder.decode(line)
        except _UNDECODABLE as exc:
            raise _Bad(Problem(where, None, "bad_header", f"the first line is not a segment header ({exc})")) from None
        if header.format != FORMAT_VERSION:
            raise _Bad(Problem(where, header.seq, "format", f"unsupported format {header.format}"))
        if header.segment != name:
            raise _Bad(Problem(where, header.seq, "renamed", f"the header names the file {header.segment!r}: renamed or moved"))
        if self.seq is None:
            self._first_header(where, header)
        else:
            if header.log != self.log_id:
                raise _Bad(Problem(where, header.seq, "foreign", f"belongs to another log ({header.log})"))
            if header.prev_segment != prev_name:
                raise _Bad(Problem(
                    where, header.seq, "segment_missing",
                    f"follows {header.prev_segment!r} but the previous file is {prev_name!r}: a segment was removed",
                ))
            if header.prev_hash != self.prev.hex():
                raise _Bad(Problem(
                    where, header.seq, "segment_missing",
                    "does not link to the last record of the previous segment: records or a segment were removed",
                ))
        self._header_key(where, header)

    def _first_header(self, where: str, header: SegmentRecord) -> None:
        self.log_id = self.report.log_id = header.log
        self.report.first_seq = header.seq
        if header.seq == 0:
            if header.prev_hash != _ZERO_HEX or header.prev_segment is not None or header.reason != "genesis":
                raise _Bad(Problem(where, 0, "bad_genesis", "seq 0 is not a genesis header"))
        else:
            self.start_anchor = (header.seq, header.prev_hash, header.prev_segment, where)
        try:
            self.prev = bytes.fromhex(header.prev_hash)
        except ValueError:
            raise _Bad(Problem(where, header.seq, "bad_header", "prev_hash is not hex")) from None
        self.seq = header.seq

    def _header_key(self, where: str, header: SegmentRecord) -> None:
        try:
            key = PublicKey.from_b64(header.public_key)
        except (ValueError, binascii.Error):
            raise _Bad(Problem(where, header.seq, "bad_key", "the announced public key is not an Ed25519 key")) from None
        if key.key_id != header.key_id:
            raise _Bad(Problem(where, header.seq, "bad_key", "key_id does not match the announced public key"))
        self.segment_key = key.key_id
        if key.key_id in self.announced:
            return
        self.announced[key.key_id] = header.seq
        if self.pinned is not None:
            return
        if not self.trusted:
            self.trusted[key.key_id] = key  # first key of the (remaining) log: trusted, unpinned
            return
        endorser = self.trusted.get(header.endorsed_by or "")
        if header.endorsement and endorser is not None:
            message = endorsement_message(header.log, key.key_id, key.b64)
            if not endorser.verify(base64.b64decode(header.endorsement), message):
                raise _Bad(Problem(where, header.seq, "bad_endorsement", f"the endorsement of key {key.key_id} is forged"))
            self.trusted[key.key_id] = key
        else:
            self.report.warnings.append(
                f"key {key.key_id} introduced at seq {header.seq} without an endorsement by the previous key"
            )

    def _special(self, name: str, index: int, kind: str, line: bytes, seq: int) -> None:
        try:
            if kind == "segment":
                if index != 0:
                    self._fail_line(name, index, seq, "bad_header", "a segment header in the middle of a file")
            elif kind == "checkpoint":
                self._checkpoint(name, index, line)
            elif kind == "finding":
                self._finding(line)
            elif kind == "expiry":
                self._expiry(line)
            else:
                self._fail_line(name, index, seq, "unknown_type", f"unknown record type {kind!r}")
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            self._fail_line(name, index, seq, "bad_record", f"a malformed {kind} record ({exc})")

    def _checkpoint(self, name: str, index: int, line: bytes) -> None:
        cp = _checkpoint_decoder.decode(line)
        where = (name, index, cp.seq)
        if cp.size != cp.seq:
            self._fail_line(*where, "checkpoint_mismatch",
                            f"the checkpoint claims {cp.size} records before it but sits at seq {cp.seq}")
        if cp.head != self.prev.hex():
            self._fail_line(*where, "checkpoint_mismatch",
                            "the signed head does not match the records before it: they were altered")
        if cp.log != self.log_id:
            self._fail_line(*where, "foreign", f"the checkpoint is for another log ({cp.log})")
        if cp.key_id != self.segment_key:
            self._fail_line(*where, "wrong_key",
                            f"signed with key {cp.key_id}, but this segment announces key {self.segment_key}")
        self._check_signature(f"{name} line {index + 1}", cp.seq, cp.key_id, cp.sig,
                              checkpoint_message(cp.log, cp.size, cp.head, cp.ts))
        self.last_checkpoint_size = cp.size
        self.last_reason = cp.reason
        self.report.checkpoints_in_log += 1

    def _check_signature(self, where: str, seq: int | None, key_id: str, sig: str, message: bytes) -> None:
        key = self.trusted.get(key_id)
        if key is None:
            if self.pinned is not None:
                reason = (f"signed with key {key_id}, which is not a pinned key ({', '.join(self.pinned)}): "
                          "forged or re-signed with another key")
            elif key_id in self.announced:
                reason = (f"signed with key {key_id}, introduced at seq {self.announced[key_id]} without an "
                          "endorsement by the previous key: pin it with --public-key if it was rotated deliberately")
            else:
                reason = f"signed with key {key_id}, which the log never announced: forged or re-signed"
            raise _Bad(Problem(where, seq, "untrusted_key", reason))
        if (key_id, sig, message) in self.verified:
            return  # the same checkpoint in the log and in a checkpoint file: verified once
        try:
            signature = base64.b64decode(sig, validate=True)
        except binascii.Error:
            signature = b""
        if not key.verify(signature, message):
            raise _Bad(Problem(where, seq, "bad_signature", "the checkpoint signature is invalid: forged or altered"))
        self.verified.add((key_id, sig, message))
        self.used[key_id] = None

    def _finding(self, line: bytes) -> None:
        finding = _finding_decoder.decode(line)
        details = finding.details
        if finding.kind == "torn_tail":
            key = (str(details.get("segment")), int(details.get("offset", -1)), int(details.get("length", -1)),
                   str(details.get("sha256")))
            acknowledged = self.torn.pop(key, None) is not None
            if not acknowledged and key[0] != CHECKPOINTS_FILE and (self.directory / key[0]).exists():
                self.report.warnings.append(
                    f"seq {finding.seq} acknowledges a torn line in {key[0]} at byte {key[1]} that is no longer there"
                )
            self.report.findings.append(f"torn_tail: {key[2]} bytes at the end of {key[0]} (seq {finding.seq})")
        else:
            summary = ", ".join(f"{k}={v}" for k, v in sorted(details.items()) if k != "fragment_b64")
            self.report.findings.append(f"{finding.kind}: {summary} (seq {finding.seq})")

    def _expiry(self, line: bytes) -> None:
        expiry = _expiry_decoder.decode(line)
        for seg in expiry.segments:
            self.expired_names.add(seg.name)
            if seg.last_seq is not None and seg.last_hash is not None:
                self.anchors[seg.last_seq + 1] = seg.last_hash

    # -- after the walk --------------------------------------------------------------------------

    def _check_start(self) -> None:
        if self.start_anchor is None:
            return
        first_seq, prev_hash, prev_segment, where = self.start_anchor
        if self.anchors.get(first_seq) != prev_hash or (
            prev_segment is not None and prev_segment not in self.expired_names
        ):
            raise _Bad(Problem(
                where, first_seq, "head_missing",
                f"the log starts at seq {first_seq} but no expiry record accounts for the records before it: "
                "leading segments were removed",
            ))
        self.report.expired = f"records before seq {first_seq} expired (anchored by an expiry record)"

    def _check_torn(self) -> None:
        if not self.torn:
            return
        (name, *_), description = next(iter(self.torn.items()))
        raise _Bad(Problem(
            name, None, "torn_tail",
            description + " that no later record acknowledges: the host crashed mid-write and has not "
            "restarted since (restarting records it), or the file was cut",
        ))

    def _read_checkpoint_files(self) -> list[list[tuple[str, CheckpointNote]]]:
        files = []
        for path in self.checkpoint_files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise _Bad(Problem(str(path), None, "checkpoint_file", f"cannot read: {exc.strerror}")) from None
            lines = data.split(b"\n")
            notes = []
            if lines[-1]:
                self.report.warnings.append(f"{path}: the last line is incomplete (written during a crash); ignored")
            for number, line in enumerate(lines[:-1], start=1):
                where = f"{path.name} line {number}"
                try:
                    note = _note_decoder.decode(line)
                except _UNDECODABLE as exc:
                    raise _Bad(Problem(where, None, "checkpoint_file", f"not a checkpoint ({exc})")) from None
                notes.append((where, note))
            files.append(notes)
            self.report.checkpoints_in_files += len(notes)
        return files

    def _check_note(self, where: str, note: CheckpointNote) -> None:
        if note.log != self.log_id:
            raise _Bad(Problem(where, None, "foreign", f"the checkpoint is for another log ({note.log})"))
        self._check_signature(where, None, note.key_id, note.sig,
                              checkpoint_message(note.log, note.size, note.head, note.ts))
        assert self.seq is not None
        if note.size > self.seq:
            raise _Bad(Problem(
                where, None, "truncated",
                f"a checkpoint signed at {_iso(note.ts)} covers {note.size:,} records but the log has only "
                f"{self.seq:,}: the log was truncated (records {self.seq:,}..{note.size - 1:,} are gone)",
            ))
        # Sizes from the first remaining record on were all recorded during the walk; smaller ones
        # cover expired records, checkable only where an expiry record gives the hash.
        head = self.heads.get(note.size, self.anchors.get(note.size))
        if head is not None and head != note.head:
            raise _Bad(Problem(
                where, note.size - 1, "checkpoint_mismatch",
                f"the log's hash at size {note.size:,} differs from the signed checkpoint: records before seq "
                f"{note.size:,} were altered or the log rewritten",
            ))

    def _fail_line(self, name: str, index: int, seq: int | None, kind: str, reason: str) -> NoReturn:
        raise _Bad(Problem(f"{name} line {index + 1}", seq, kind, reason))
