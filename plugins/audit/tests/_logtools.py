"""Helpers for the audit tests: generating logs, reading them, and tampering like an attacker would.

``rewrite`` plays an attacker who can edit files and recompute SHA-256 (no secret is needed for the
chain) but may or may not hold a signing key: it re-chains every record after the edit, renumbers
if asked, and either re-signs checkpoints with the key it is given or leaves their signatures.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from host_audit.keys import SigningKey, checkpoint_message
from host_audit.log import AuditLog
from host_audit.records import seal
from host_audit.segments import CHECKPOINTS_FILE, list_segments
from host_audit.settings import LogSettings

from host.model import AuditEntry

_encoder = msgspec.json.Encoder(order="sorted")

START_MS = 1_700_000_000_000


class FakeClock:
    """Epoch milliseconds that advance by ``step`` on every reading (deterministic timestamps)."""

    def __init__(self, start: int = START_MS, step: int = 1) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


def entry(i: int, **details: Any) -> AuditEntry:
    return AuditEntry(
        category="permission" if i % 3 else "config",
        action="grant" if i % 2 else "change",
        actor=f"user:{i % 17}",
        target=f"role:{i % 5}",
        details={"n": i, "reason": f"ticket {i}", **details},
        request_id=f"{i:016x}",
        at_ms=START_MS + i,
    )


def generate_log(directory: Path, entries: int, **overrides: Any) -> LogSettings:
    """A valid log over two runs, rotated by records, with checkpoints every 500 records."""
    options: dict[str, Any] = {"segment_max_records": 2500, "checkpoint_every_records": 500}
    options.update(overrides)
    settings = LogSettings.for_directory(directory, **options)
    clock = FakeClock()
    half = entries // 2
    log = AuditLog.open(settings, clock=clock)
    for i in range(half):
        log.append(entry(i))
    log.close()
    log = AuditLog.open(settings, clock=clock)
    for i in range(half, entries):
        log.append(entry(i))
    log.close()
    return settings


# -- reading ---------------------------------------------------------------------------------------


def lines_of(path: Path) -> list[bytes]:
    """Complete lines of a file, without newlines."""
    data = path.read_bytes()
    return data.split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def record(line: bytes) -> dict[str, Any]:
    value: dict[str, Any] = msgspec.json.decode(line)
    return value


def all_records(directory: Path) -> list[dict[str, Any]]:
    return [record(line) for path in list_segments(directory) for line in lines_of(path)]


def entries_of(directory: Path) -> list[dict[str, Any]]:
    return [r for r in all_records(directory) if r["type"] == "entry"]


def locate(directory: Path, predicate: Callable[[dict[str, Any]], bool], nth: int = 0) -> tuple[Path, int]:
    """(segment, line index) of the ``nth`` record matching ``predicate``."""
    found = 0
    for path in list_segments(directory):
        for index, line in enumerate(lines_of(path)):
            if predicate(record(line)):
                if found == nth:
                    return path, index
                found += 1
    raise LookupError("no such record")


# -- tampering like an attacker ------------------------------------------------------------------

Segments = list[tuple[Path, list[dict[str, Any]]]]


def load(directory: Path) -> Segments:
    segments = []
    for path in list_segments(directory):
        recs = []
        for line in lines_of(path):
            rec = record(line)
            rec.pop("h")
            recs.append(rec)
        segments.append((path, recs))
    return segments


def rewrite(
    directory: Path,
    mutate: Callable[[Segments], None],
    *,
    renumber: bool = False,
    key: SigningKey | None = None,
    replace_announced_key: bool = False,
    rewrite_checkpoint_file: bool = True,
) -> None:
    """Apply ``mutate`` to the decoded records, then re-chain (and maybe renumber/re-sign) and save.

    Checkpoint ``head``/``size`` fields are updated to the re-chained values (so the only thing left
    wrong is what needs the real key: the signature), unless the attacker has ``key``, in which case
    they are re-signed with it. ``replace_announced_key`` also swaps the public key in every segment
    header for ``key``'s. The local ``checkpoints.jsonl`` is rewritten from the log's checkpoints.
    """
    segments = load(directory)
    mutate(segments)
    prev = bytes.fromhex(segments[0][1][0]["prev_hash"])
    seq = segments[0][1][0]["seq"]
    notes = []
    for path, recs in segments:
        out = []
        for rec in recs:
            if renumber:
                rec["seq"] = seq
            if rec["type"] == "segment":
                rec["prev_hash"] = prev.hex()
                if replace_announced_key and key is not None:
                    rec["public_key"] = key.public.b64
                    rec["key_id"] = key.key_id
            elif rec["type"] == "checkpoint":
                rec["size"] = rec["seq"]
                rec["head"] = prev.hex()
                if key is not None:
                    rec["key_id"] = key.key_id
                    message = checkpoint_message(rec["log"], rec["size"], rec["head"], rec["ts"])
                    rec["sig"] = base64.b64encode(key.sign(message)).decode()
                notes.append({k: v for k, v in rec.items() if k not in ("seq", "type")})
            line, prev = seal(prev, _encoder.encode(rec))
            out.append(line)
            seq = rec["seq"] + 1
        path.write_bytes(b"".join(out))
    if rewrite_checkpoint_file:
        (directory / CHECKPOINTS_FILE).write_bytes(b"".join(_encoder.encode(n) + b"\n" for n in notes))
