"""Small but real media files for inbound picture/audio/video/file messages.

The emulator serves these bytes behind ``messageFiles/download``, so a connector that downloads and
inspects attachments meets well-formed files (a decodable PNG, a playable WAV, an MP4 header).
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["png", "sample_file", "wav"]


def png(width: int = 32, height: int = 32, rgb: tuple[int, int, int] = (22, 119, 255)) -> bytes:
    """A solid-colour RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def wav(duration_ms: int = 1000, rate: int = 8000) -> bytes:
    """Mono 8-bit silence."""
    n = rate * duration_ms // 1000
    data = b"\x80" * n
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    return header + fmt + b"data" + struct.pack("<I", n) + data


def mp4() -> bytes:
    """An ISO BMFF file with an ``ftyp`` box and an empty ``mdat`` (identifies as MP4)."""
    ftyp = b"ftypisom" + struct.pack("!I", 0x200) + b"isomiso2avc1mp41"
    return struct.pack("!I", 8 + len(ftyp)) + ftyp + struct.pack("!I", 8) + b"mdat"


def sample_file(msgtype: str) -> tuple[bytes, str, str]:
    """``(content, file name, MIME type)`` for an inbound message of ``msgtype``."""
    if msgtype in ("picture", "richText"):
        return png(), "image.png", "image/png"
    if msgtype == "audio":
        return wav(), "voice.wav", "audio/wav"
    if msgtype == "video":
        return mp4(), "video.mp4", "video/mp4"
    return b"Quarterly report (emulator sample file)\n", "report.txt", "text/plain"
