"""Segment files: names, listing, and reading the ends of a file without loading all of it.

A segment is ``segment-<index>.jsonl`` (index zero-padded to 8 digits, +1 per new segment), so the
lexical order of the names is the order of the chain. Its first line is a ``segment`` record.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINTS_FILE",
    "LOCK_FILE",
    "Tail",
    "list_segments",
    "read_first_line",
    "read_tail",
    "segment_index",
    "segment_name",
]

#: Checkpoints as written, one JSON line each; meant to be copied off the host.
CHECKPOINTS_FILE = "checkpoints.jsonl"
#: Held (``flock``) by the process writing the log.
LOCK_FILE = ".lock"

_NAME = re.compile(r"^segment-(\d{8,})\.jsonl$")


def segment_name(index: int) -> str:
    return f"segment-{index:08d}.jsonl"


def segment_index(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def list_segments(directory: Path) -> list[Path]:
    """Segment files of ``directory`` in chain order."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            index = segment_index(entry.name)
            if index is not None:
                found.append((index, Path(entry.path)))
    return [path for _, path in sorted(found)]


@dataclass(frozen=True, slots=True)
class Tail:
    """The end of a file of newline-terminated lines."""

    #: The last complete line (without its newline), or ``None`` when there is none.
    last_line: bytes | None
    #: Bytes after the last newline: a line torn by a crash mid-write (empty when clean).
    fragment: bytes
    #: Offset of ``fragment`` in the file.
    fragment_offset: int
    size: int


def read_tail(path: Path, chunk: int = 1 << 16) -> Tail:
    """Read backwards from the end until the last complete line is found."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        buf = b""
        pos = size
        while True:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start) + buf
            pos = start
            last_nl = buf.rfind(b"\n")
            if last_nl >= 0:
                prev_nl = buf.rfind(b"\n", 0, last_nl)
                if prev_nl >= 0 or pos == 0:
                    fragment = buf[last_nl + 1 :]
                    return Tail(buf[prev_nl + 1 : last_nl], fragment, size - len(fragment), size)
            elif pos == 0:
                return Tail(None, buf, 0, size)
            chunk *= 2


def read_first_line(path: Path, chunk: int = 1 << 12) -> bytes | None:
    """The first complete line of a file (without newline), or ``None``."""
    with open(path, "rb") as f:
        buf = b""
        while True:
            data = f.read(chunk)
            if not data:
                return None
            buf += data
            nl = buf.find(b"\n")
            if nl >= 0:
                return buf[:nl]
            chunk *= 2
