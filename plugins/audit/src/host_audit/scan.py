"""The verifier's hot loop, as a pure function over a run of lines, so it can run in worker processes.

``scan_lines`` checks, for each line: it decodes (JSON with ``seq``, ``ts``, ``type``, ``h``), its
``seq`` follows, its ``h`` recomputes from the previous hash, its ``ts`` is within the tolerance of the
newest earlier one. It stops at the first problem and returns what the caller needs to carry on: the
last hash, sequence and newest timestamp, the non-``entry`` records (checked by the caller, in order),
and the hashes at the sizes checkpoint files ask about.

Every line carries its own hash, so a run starting mid-file can be scanned on its own from the hash
stored at the end of the line before it (``stored_hash_before``); the caller then confirms the run
started where the previous one ended (``Scan.continues``) or rescans it with the exact state.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from host_audit.records import HASH_SUFFIX_LEN

__all__ = [
    "Scan",
    "default_jobs",
    "iso_ms",
    "plan_ranges",
    "read_range",
    "scan_lines",
    "scan_range",
    "stored_hash_before",
]

_NO_TS = -(1 << 62)


class _Line(msgspec.Struct, gc=False):
    """What is decoded from every line (gc=False: these never form reference cycles)."""

    seq: int
    ts: int
    type: str
    h: str


_decode = msgspec.json.Decoder(_Line).decode
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError)


@dataclass(slots=True)
class Scan:
    """The outcome of scanning a run of lines (indexes are relative to the run)."""

    #: The state the run was scanned from.
    start_prev: bytes
    start_seq: int | None
    start_max_ts: int
    #: Lines in the run, and how many passed before ``error``.
    total: int = 0
    count: int = 0
    end_prev: bytes = b""
    end_seq: int | None = None
    max_ts: int = _NO_TS
    min_ts: int = 1 << 62
    last_type: str = ""
    #: ``(index, seq, type, line, hash before it)`` of every record that is not an ``entry``.
    specials: list[tuple[int, int, str, bytes, bytes]] = field(default_factory=list)
    #: size -> hex hash of record ``size - 1``, for the sizes asked for.
    heads: dict[int, str] = field(default_factory=dict)
    #: ``(index, seq, kind, reason)`` of the first bad line.
    error: tuple[int, int | None, str, str] | None = None

    def continues(self, prev: bytes, seq: int, max_ts: int, tolerance: int) -> bool:
        """Whether this run, scanned on its own, is valid right after state (prev, seq, max_ts)."""
        return (
            self.error is None
            and self.start_prev == prev
            and (self.start_seq is None or self.start_seq == seq)
            and (self.count == 0 or self.min_ts >= max_ts - tolerance)
        )


def scan_lines(
    lines: list[bytes],
    prev: bytes,
    seq: int | None,
    max_ts: int,
    tolerance: int,
    wanted: frozenset[int] | set[int],
) -> Scan:
    """Scan ``lines`` from hash ``prev``; ``seq=None`` takes the first line's sequence number."""
    scan = Scan(start_prev=prev, start_seq=seq, start_max_ts=max_ts, total=len(lines))
    sha256 = hashlib.sha256
    decode = _decode
    suffix = HASH_SUFFIX_LEN
    specials = scan.specials
    min_ts = scan.min_ts
    kind = ""
    index = -1
    for index, line in enumerate(lines):  # index is used after the loop
        # A valid JSON object whose "h" member is the hash of everything before its last 72 bytes:
        # any edit of the line breaks one of the three.
        try:
            head = decode(line)
        except _UNDECODABLE as exc:
            scan.error = (index, seq, "malformed", f"not a valid record ({exc}): edited, or a line was split or joined")
            break
        if seq is None:
            seq = scan.start_seq = head.seq
        elif head.seq != seq:
            scan.error = (index, seq, "sequence", _sequence_reason(seq, head.seq))
            break
        if seq in wanted:
            scan.heads[seq] = prev.hex()
        digest = sha256(b"\x00" + prev + line[:-suffix]).digest()
        if head.h != digest.hex():
            scan.error = (index, seq, "hash_mismatch", "its hash does not match its contents: this record was modified")
            break
        ts = head.ts
        if ts > max_ts:
            max_ts = ts
        elif ts < max_ts - tolerance:
            scan.error = (
                index, seq, "time_reversed",
                f"timestamp {iso_ms(ts)} is {max_ts - ts} ms before an earlier record's "
                f"(tolerance {tolerance} ms): records reordered or timestamps altered",
            )
            break
        if ts < min_ts:
            min_ts = ts
        kind = head.type
        if kind != "entry":
            specials.append((index, seq, kind, line, prev))
        prev = digest
        seq += 1
    else:
        index += 1
    scan.count = index
    scan.end_prev, scan.end_seq, scan.max_ts, scan.min_ts = prev, seq, max_ts, min_ts
    scan.last_type = kind
    return scan


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _sequence_reason(expected: int, found: int) -> str:
    if found > expected:
        return f"expected seq {expected} but found {found}: record(s) {expected}..{found - 1} are missing (deleted)"
    return f"expected seq {expected} but found {found} again: a record was inserted or records reordered"


def read_range(path: Path, start: int, end: int) -> list[bytes]:
    """The complete lines in bytes ``[start, end)`` of ``path`` (``end`` just after a newline)."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    lines.pop()  # what follows the last newline: nothing
    return lines


def scan_range(path: Path, start: int, end: int, prev: bytes, tolerance: int, wanted: frozenset[int]) -> Scan:
    """Worker entry point: scan bytes ``[start, end)`` of ``path`` on their own (no prior state)."""
    return scan_lines(read_range(path, start, end), prev, None, _NO_TS, tolerance, wanted)


def stored_hash_before(path: Path, offset: int) -> bytes:
    """The hash stored at the end of the line that ends just before ``offset`` (zeros if unreadable)."""
    with open(path, "rb") as f:
        f.seek(max(0, offset - 67))
        tail = f.read(67)  # <64 hex>"}\n
    try:
        return bytes.fromhex(tail[:64].decode())
    except (ValueError, UnicodeDecodeError):
        return bytes(32)  # a damaged line: the scan of the previous run reports it


def plan_ranges(path: Path, end: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split bytes ``[0, end)`` of ``path`` (``end`` just after a newline) into runs of whole lines."""
    ranges = []
    start = 0
    with open(path, "rb") as f:
        while start < end:
            stop = start + chunk_bytes
            if stop >= end:
                stop = end
            else:
                f.seek(stop)
                while True:
                    block = f.read(1 << 16)
                    newline = block.find(b"\n")
                    if newline >= 0 or not block:
                        stop = f.tell() - len(block) + newline + 1 if newline >= 0 else end
                        break
                stop = min(stop, end)
            ranges.append((start, stop))
            start = stop
    return ranges


def default_jobs() -> int:
    """Worker processes for a large log: the CPUs available to us, at most 4."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, 4))
