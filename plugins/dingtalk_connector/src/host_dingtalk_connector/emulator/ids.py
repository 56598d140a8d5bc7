"""Identifiers shaped like DingTalk's (so connector parsers meet realistic values)."""

from __future__ import annotations

import random
import string
import uuid

__all__ = ["IdFactory"]

_B64 = string.ascii_letters + string.digits + "+/"
_ALNUM = string.ascii_letters + string.digits


class IdFactory:
    """Makes ids from one random source (seeded by ``EmulatorSettings.random_seed``)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _pick(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def _hex(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def message_id(self, epoch_ms: int) -> str:
        """Frame ``headers.messageId``, e.g. ``212ca9d7_974_1898c159aa6_1783b``."""
        bits = self.rng.getrandbits  # one call per part: this runs on every push
        return f"{bits(32):08x}_{bits(12):03x}_{epoch_ms:011x}_{bits(20):05x}"

    def msg_id(self) -> str:
        """Bot message ``msgId`` (encrypted-looking, ends in ``==``)."""
        return "msg" + self._pick(_B64, 19) + "=="

    def conversation_id(self) -> str:
        return "cid" + self._pick(_B64, 21) + "="

    def encrypted_user_id(self) -> str:
        return "$:LWCP_v1:$" + self._pick(_B64, 30) + "=="

    def union_id(self) -> str:
        return self._pick(_ALNUM, 22) + "iE"

    def session(self) -> str:
        return self._hex(32)

    def token(self) -> str:
        return self._hex(32)

    def event_id(self) -> str:
        return self._hex(32)

    def process_query_key(self) -> str:
        return self._pick(_B64, 40) + "="

    def download_code(self) -> str:
        return self._pick(_B64, 64) + "="

    def media_id(self) -> str:
        return "@lA" + self._pick(_ALNUM, 20)

    def opaque(self) -> str:
        return self.uuid()
