"""Peak shaving: a bounded queue, a global concurrency limit and per-conversation ordering.

There is no queue object and no worker pool of our own: the host's workers already call
``on_message`` concurrently, so each message's own call *is* its worker, and the bridge only decides
when it may proceed. A message goes through three gates::

    admit()          synchronous: refused at once (-> "busy" reply) when ``queue_size`` messages
                     are already waiting beyond those a free call slot will take, or when its
                     conversation already has ``max_waiting_per_conversation`` waiting; otherwise
                     it joins its conversation's lane
    wait_turn()      its conversation's lane: one message answered at a time, in order
    acquire_slot()   the global limiter: at most ``max_concurrency`` backend calls at once (FIFO)

"Waiting" (the queue depth) counts messages between ``admit`` and ``leave_queue``, which the bridge
calls once the message stops waiting: it got a slot, or was served from the cache or by coalescing,
or was merged, or timed out. ``release`` ends everything a ticket holds and is idempotent, so every
path out of a message (answer, failure, cancellation, a stream the host never read) calls it.

Ordering: a lane is sorted by the message's creation time (the platform's timestamp) and then by
arrival. Messages the host hands over in the same scheduling batch may reach the bridge in any
order (trio shuffles each batch), so ``wait_turn`` yields once before looking at the lane, to let
them all join it first.

While a conversation is being answered, later messages wait in its lane. With ``merge`` the first
of them to get the turn takes all the others waiting at that moment and is answered as one turn;
the merged messages end without a reply of their own (the combined answer covers them).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Any, Literal

import trio

__all__ = ["Admission", "Refusal", "Ticket", "TurnResult"]

TurnResult = Literal["go", "merged", "timeout"]
Refusal = Literal["queue_full", "conversation_full"]


class _Lane:
    __slots__ = ("active", "changed", "waiting")

    def __init__(self) -> None:
        self.waiting: list[Ticket] = []
        self.active: Ticket | None = None
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Ticket:
    """One admitted message on its way through the gates."""

    __slots__ = (
        "_admission",
        "_lane",
        "_state",
        "admitted_at",
        "holds_slot",
        "in_queue",
        "lane_key",
        "merged",
        "merged_into",
        "order",
        "payload",
    )

    def __init__(self, admission: Admission, lane_key: str, lane: _Lane, order: tuple[int, int], payload: Any) -> None:
        self._admission = admission
        self._lane = lane
        self._state: Literal["queued", "active", "merged", "done"] = "queued"
        self.lane_key = lane_key
        self.order = order
        self.payload = payload
        self.admitted_at = admission.clock()
        self.in_queue = True
        self.holds_slot = False
        #: Tickets merged into this one (``merge`` policy), oldest first.
        self.merged: list[Ticket] = []
        self.merged_into: Ticket | None = None

    async def wait_turn(self, deadline: float) -> TurnResult:
        """Wait until it is this message's conversation's turn (or ``deadline``, trio time)."""
        lane = self._lane
        # Let messages handed over in the same scheduling batch join the lane before we look.
        await trio.lowlevel.checkpoint()
        if (result := self._try_turn(lane)) is not None:
            return result
        with trio.move_on_at(deadline):
            while True:
                await lane.changed.wait()
                if (result := self._try_turn(lane)) is not None:
                    return result
        return "timeout"

    def _try_turn(self, lane: _Lane) -> TurnResult | None:
        if self.merged_into is not None:
            return "merged"
        if lane.active is None and lane.waiting and lane.waiting[0] is self:
            lane.waiting.pop(0)
            lane.active = self
            self._state = "active"
            if self._admission.merge and lane.waiting:
                self._absorb(lane)
            return "go"
        return None

    async def acquire_slot(self, deadline: float) -> bool:
        """Wait for one of the ``max_concurrency`` call slots; ``False`` if ``deadline`` came first."""
        limiter = self._admission.limiter
        # A free slot needs no waiting (wait_turn already checkpointed). acquire..._nowait refuses
        # while others wait, so the limiter stays first come, first served.
        try:
            limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            pass
        else:
            self.holds_slot = True
            return True
        with trio.move_on_at(deadline):
            await self._admission.limiter.acquire_on_behalf_of(self)
            self.holds_slot = True
            return True
        return False

    def leave_queue(self) -> None:
        """This message has stopped waiting (idempotent)."""
        if self.in_queue:
            self.in_queue = False
            self._admission.dequeued(self)

    def release(self) -> None:
        """Give back everything this ticket holds (idempotent)."""
        if self._state == "done":
            return
        self.leave_queue()
        if self.holds_slot:
            self.holds_slot = False
            self._admission.limiter.release_on_behalf_of(self)
        lane = self._lane
        if lane.active is self:
            lane.active = None
            lane.notify()
        elif self._state == "queued" and self in lane.waiting:
            lane.waiting.remove(self)
            lane.notify()
        self._state = "done"
        self._admission.forget_lane_if_idle(self.lane_key, lane)

    def _absorb(self, lane: _Lane) -> None:
        for other in lane.waiting:
            other.merged_into = self
            other._state = "merged"
            other.leave_queue()
            self.merged.append(other)
        lane.waiting.clear()
        lane.notify()


class Admission:
    """The gates every message goes through (see the module docstring)."""

    def __init__(
        self,
        *,
        queue_size: int,
        max_concurrency: int,
        merge: bool,
        clock: Callable[[], float],
        on_dequeue: Callable[[float], None] | None = None,
        max_waiting_per_conversation: int = 10,
    ) -> None:
        self.queue_size = queue_size
        self.max_waiting_per_conversation = max_waiting_per_conversation
        self.merge = merge
        self.clock = clock
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.waiting = 0
        self._on_dequeue = on_dequeue
        self._lanes: dict[str, _Lane] = {}
        self._arrivals = itertools.count()

    def admit(self, lane_key: str, created_at_ms: int, payload: Any = None) -> Ticket | Refusal:
        """Admit a message into its conversation's lane, or say why not.

        ``queue_full``: ``queue_size`` messages already wait (messages that can start at once, a call
        slot being free for them, do not count). ``conversation_full``: its conversation already has
        ``max_waiting_per_conversation`` messages waiting (each one holds a host worker while it
        waits; one flooding group must not take them all).
        """
        if self.waiting >= self.queue_size + self.limiter.available_tokens:
            return "queue_full"
        lane = self._lanes.get(lane_key)
        # With nobody being answered, the first in the lane is about to start: it is not waiting.
        if lane is not None and len(lane.waiting) - (lane.active is None) >= self.max_waiting_per_conversation:
            return "conversation_full"
        if lane is None:
            lane = self._lanes[lane_key] = _Lane()
        ticket = Ticket(self, lane_key, lane, (created_at_ms, next(self._arrivals)), payload)
        bisect.insort(lane.waiting, ticket, key=lambda t: t.order)
        self.waiting += 1
        return ticket

    @property
    def in_flight(self) -> int:
        """Backend calls holding a slot now."""
        return int(self.limiter.borrowed_tokens)

    @property
    def lanes(self) -> int:
        """Conversations with a message waiting or being answered."""
        return len(self._lanes)

    def dequeued(self, ticket: Ticket) -> None:
        self.waiting -= 1
        if self._on_dequeue is not None:
            self._on_dequeue(self.clock() - ticket.admitted_at)

    def forget_lane_if_idle(self, key: str, lane: _Lane) -> None:
        if lane.active is None and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]
