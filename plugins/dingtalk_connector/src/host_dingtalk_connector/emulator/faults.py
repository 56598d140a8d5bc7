"""Fault injection, switchable at run time (Python: ``emulator.faults``; HTTP: ``/_emulator/faults``).

==================== ====================================================================================
registration         ``connections/open`` answers 401 ``authFailed``, a 5xx, or hangs (timeout) -
                     for the next ``count`` calls or until cleared
zombie               a connection stays open at TCP level but passes nothing (no frames, no pongs),
                     or (``pongs=True``) still answers pings while pushes to it are lost
drop                 abrupt TCP reset without a close frame (client sees 1006)
close                close a connection with a given close code and reason (1000, 1001, 1011...)
malformed            send a malformed frame (not JSON, binary, data as object, numeric time...)
oversized            push a valid bot message whose frame exceeds ``max_frame_bytes``
duplicates           the next ``count`` pushes are delivered twice (same or new messageId)
lost_acks            the next ``count`` ACKs from the client are lost on the way (never recorded)
qps                  the next ``count`` OpenAPI calls (optionally of one API) fail with 403
                     ``Forbidden.AccessDenied.QpsLimitForAppkeyAndApi``
card_delivery        the next ``count`` card deliveries report ``success: false`` per space
download             the next ``count`` file downloads (URLs from messageFiles/download) fail
expire_sessions      every (or one conversation's) sessionWebhook expires now
expire_tokens        every access token expires now
expire_tickets       every unused ticket expires now
clock                move the emulator clock forward (tickets, sessions, tokens, URLs expire)
disconnect / ping    SYSTEM frames on demand (also plain emulator features)
==================== ====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio

from .errors import EmulatorError

if TYPE_CHECKING:
    from .server import Emulator

__all__ = ["MALFORMED_KINDS", "FaultSwitches", "Faults", "RegistrationFault"]

RegistrationFault = Literal["auth", "error", "timeout"]

#: Kinds of malformed frame ``Faults.malformed`` can send.
MALFORMED_KINDS = ("not_json", "binary", "not_object", "data_object", "numeric_time",
                   "missing_message_id", "unknown_type", "truncated")


@dataclass
class FaultSwitches:
    """Current fault state (plain data, read by the request handlers)."""

    registration: RegistrationFault | None = None
    registration_status: int = 503
    registration_remaining: int | None = None  # None = until cleared
    registration_release: trio.Event = field(default_factory=trio.Event)
    duplicate_remaining: int = 0
    duplicate_same_message_id: bool = True
    lost_acks_remaining: int = 0
    qps_remaining: int = 0
    qps_api: str | None = None
    card_delivery_remaining: int = 0
    card_delivery_error: str = "deliver failed"
    download_remaining: int = 0

    def take_registration(self) -> RegistrationFault | None:
        """The registration fault to apply to this call (consumes one of ``count``)."""
        if self.registration is None:
            return None
        mode = self.registration
        if self.registration_remaining is not None:
            self.registration_remaining -= 1
            if self.registration_remaining <= 0:
                self.registration = None
                self.registration_remaining = None
        return mode

    def take_qps(self, api: str) -> bool:
        if self.qps_remaining > 0 and (self.qps_api is None or self.qps_api == api):
            self.qps_remaining -= 1
            return True
        return False

    def take_duplicate(self) -> bool:
        if self.duplicate_remaining > 0:
            self.duplicate_remaining -= 1
            return True
        return False

    def take_lost_ack(self) -> bool:
        if self.lost_acks_remaining > 0:
            self.lost_acks_remaining -= 1
            return True
        return False

    def take_card_delivery(self) -> str | None:
        if self.card_delivery_remaining > 0:
            self.card_delivery_remaining -= 1
            return self.card_delivery_error
        return None

    def take_download_failure(self) -> bool:
        if self.download_remaining > 0:
            self.download_remaining -= 1
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "registration": None if self.registration is None else {
                "mode": self.registration, "status": self.registration_status,
                "remaining": self.registration_remaining},
            "duplicates": {"remaining": self.duplicate_remaining,
                           "sameMessageId": self.duplicate_same_message_id},
            "lostAcks": {"remaining": self.lost_acks_remaining},
            "qps": {"remaining": self.qps_remaining, "api": self.qps_api},
            "cardDelivery": {"remaining": self.card_delivery_remaining,
                             "errorMsg": self.card_delivery_error},
            "downloads": {"remaining": self.download_remaining},
        }


class Faults:
    """Every fault of the issue, as methods. ``connection_id=None`` means every open connection."""

    def __init__(self, emulator: Emulator) -> None:
        self._emu = emulator
        self.switches = FaultSwitches()

    # --- registration -----------------------------------------------------------------------
    def refuse_registration(self, mode: RegistrationFault = "auth", *, status: int | None = None,
                            count: int | None = None) -> None:
        """Make ``connections/open`` fail: ``auth`` (401 authFailed), ``error`` (``status``,
        default 503) or ``timeout`` (no answer until cleared). ``count`` None = until cleared."""
        if mode not in ("auth", "error", "timeout"):
            raise EmulatorError(f"registration fault mode must be auth, error or timeout, not {mode!r}")
        if status is not None and not 500 <= status <= 599:
            raise EmulatorError(f"registration fault status must be a 5xx, not {status!r}")
        if count is not None and count < 1:
            raise EmulatorError("count must be >= 1 (or None for 'until cleared')")
        sw = self.switches
        sw.registration, sw.registration_remaining = mode, count
        sw.registration_status = status or 503

    def clear_registration(self) -> None:
        """Registration works again; calls hanging in ``timeout`` mode are answered normally."""
        sw = self.switches
        sw.registration, sw.registration_remaining = None, None
        sw.registration_release.set()
        sw.registration_release = trio.Event()

    # --- connections ------------------------------------------------------------------------
    def zombie(self, connection_id: str | None = None, *, pongs: bool = False) -> list[str]:
        """The connection stays open at TCP level but nothing is delivered any more. With
        ``pongs=False`` nothing passes at all (no frames, no pongs: a dead NAT flow); with
        ``pongs=True`` WebSocket pings are still answered but pushes are silently lost (the
        "stale channel" reports). Returns the connection ids."""
        return [c.id for c in self._emu.gateway.make_zombie(connection_id, pongs=pongs)]

    async def drop(self, connection_id: str | None = None) -> list[str]:
        """Reset the TCP connection without a close frame."""
        return [c.id for c in await self._emu.gateway.drop(connection_id)]

    async def close(self, connection_id: str | None = None, code: int = 1000,
                    reason: str = "") -> list[str]:
        """Close with a WebSocket close frame carrying ``code`` and ``reason``."""
        return [c.id for c in await self._emu.gateway.close(connection_id, code, reason)]

    async def malformed(self, connection_id: str | None = None,
                        kind: str = "not_json") -> list[dict[str, Any]]:
        """Send a malformed frame of ``kind`` (see ``MALFORMED_KINDS``)."""
        if kind not in MALFORMED_KINDS:
            raise EmulatorError(f"malformed kind must be one of {', '.join(MALFORMED_KINDS)}; got {kind!r}")
        return [f.to_dict() for f in await self._emu.gateway.send_malformed(connection_id, kind)]

    async def oversized(self, size: int | None = None, **message: Any) -> dict[str, Any]:
        """Push a valid bot message whose frame is larger than ``size`` bytes
        (default ``max_frame_bytes`` + 1 KiB)."""
        target = size or self._emu.settings.max_frame_bytes + 1024
        text = (message.pop("text", "oversized ") + "x" * target)[:target]
        return await self._emu.send_user_message(text=text, _allow_oversized=True, **message)

    def duplicates(self, count: int = 1, *, same_message_id: bool = True) -> None:
        """Deliver each of the next ``count`` EVENT/CALLBACK pushes twice."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self.switches.duplicate_remaining = count
        self.switches.duplicate_same_message_id = same_message_id

    def lose_acks(self, count: int = 1) -> None:
        """The next ``count`` ACKs the client sends are lost on the way: the frame stays un-ACKed
        for DingTalk (and is redelivered when redelivery is on), though the client did ACK it."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self.switches.lost_acks_remaining = count

    # --- OpenAPI ----------------------------------------------------------------------------
    def qps_errors(self, count: int = 1, *, api: str | None = None) -> None:
        """The next ``count`` OpenAPI calls (only of ``api``, e.g. "PUT /v1.0/card/streaming",
        when given) answer 403 QpsLimitForAppkeyAndApi."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self.switches.qps_remaining, self.switches.qps_api = count, api

    def card_delivery_failures(self, count: int = 1, *, error_msg: str = "deliver failed") -> None:
        """The next ``count`` card deliveries answer HTTP 200 with ``success: false`` per space."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self.switches.card_delivery_remaining = count
        self.switches.card_delivery_error = error_msg

    def download_failures(self, count: int = 1) -> None:
        """The next ``count`` downloads of file URLs (from ``messageFiles/download``) fail with 500."""
        if count < 0:
            raise EmulatorError("count must be >= 0")
        self.switches.download_remaining = count

    # --- expiries and the clock -------------------------------------------------------------
    def expire_sessions(self, conversation_id: str | None = None) -> int:
        """Expire every sessionWebhook (of one conversation when given). Returns how many."""
        state, n = self._emu.state, 0
        now = state.clock.now()
        for session in state.sessions.values():
            if conversation_id is None or session.conversation_id == conversation_id:
                if session.expires_at > now:
                    n += 1
                session.expires_at = min(session.expires_at, now)
                session.expired_by_fault = True
        return n

    def expire_tokens(self) -> int:
        """Expire every access token now. Returns how many were valid."""
        state = self._emu.state
        now, n = state.clock.now(), 0
        for token in state.tokens.values():
            if token.expires_at > now:
                n += 1
                token.expires_at = now
        return n

    def expire_tickets(self) -> int:
        """Expire every unused ticket now."""
        n = 0
        for ticket in self._emu.state.tickets.values():
            if not ticket.used and not ticket.expired_by_fault:
                ticket.expired_by_fault = True
                n += 1
        return n

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator clock forward; returns the total offset."""
        self._emu.state.clock.advance(seconds)
        return self._emu.state.clock.offset

    def reset(self) -> None:
        """Clear every switchable fault (registration, duplicates, lost ACKs, qps, card delivery,
        downloads)."""
        self.clear_registration()
        fresh = FaultSwitches(registration_release=self.switches.registration_release)
        for name in fresh.__dataclass_fields__:
            setattr(self.switches, name, getattr(fresh, name))  # in place: handlers hold this object

    def to_dict(self) -> dict[str, Any]:
        data = self.switches.to_dict()
        data["clockOffset"] = self._emu.state.clock.offset
        return data
