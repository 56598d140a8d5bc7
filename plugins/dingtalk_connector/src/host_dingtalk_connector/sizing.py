"""Size rules of DingTalk content, in UTF-8 bytes (what DingTalk counts).

* AI card streaming content: about 1 KB per call and 3 KB in total recommended (reference 7.5, 9.2);
* a card parameter value: at most 1 KB (7.1);
* a robot message's ``msgParam``: at most 15 000 bytes for group sends (6.3).

``utf8_prefix`` cuts text to a byte budget without splitting a character; ``split_text`` cuts a long
answer into messages at paragraph, then line, then word boundaries, so nothing is lost.
"""

from __future__ import annotations

__all__ = ["split_text", "utf8_len", "utf8_prefix"]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that fits in ``max_bytes`` UTF-8 bytes."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", errors="ignore")


def _cut(text: str, max_bytes: int) -> int:
    """Where to cut ``text`` (a character index) so the head fits ``max_bytes``, at a nice boundary."""
    head = utf8_prefix(text, max_bytes)
    if len(head) == len(text):
        return len(text)
    # Prefer a paragraph break, then a line break, then a space, in the second half of the head.
    floor = len(head) // 2
    for separator in ("\n\n", "\n", " "):
        at = head.rfind(separator, floor)
        if at > 0:
            return at + len(separator)
    return max(1, len(head))


def split_text(text: str, max_bytes: int) -> list[str]:
    """``text`` in pieces of at most ``max_bytes`` UTF-8 bytes each, joined back they give ``text``."""
    if max_bytes < 4:
        raise ValueError("max_bytes must be at least 4 (one UTF-8 character)")
    pieces: list[str] = []
    while text:
        at = _cut(text, max_bytes)
        pieces.append(text[:at])
        text = text[at:]
    return pieces
