"""Single-flight: identical requests in flight at the same time share one backend call.

The first request for a key becomes the *leader*: it calls the backend and publishes each chunk of
the answer into a ``Flight``. Requests for the same key that arrive before the leader has finished
*follow* it: they replay what was published so far, then receive the rest as it arrives, and end
the way the leader ended (complete, incomplete or failed, with the same closing text).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal

import trio

__all__ = ["Coalescer", "Flight", "FlightOutcome"]

FlightOutcome = Literal["pending", "success", "incomplete", "failed"]


class Flight:
    """The chunks of one answer being produced, readable by any number of followers."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.chunks: list[str] = []
        self.outcome: FlightOutcome = "pending"
        self.followers = 0
        self._changed = trio.Event()

    @property
    def done(self) -> bool:
        return self.outcome != "pending"

    def publish(self, chunk: str) -> None:
        self.chunks.append(chunk)
        self._wake()

    def finish(self, outcome: FlightOutcome, note: str = "") -> None:
        """End the flight (idempotent); ``note`` is published first, for followers only."""
        if self.done:
            return
        if note:
            self.chunks.append(note)
        self.outcome = outcome
        self._wake()

    async def follow(self) -> AsyncIterator[str]:
        """Every chunk, from the first, until the flight ends."""
        index = 0
        while True:
            changed = self._changed
            while index < len(self.chunks):
                yield self.chunks[index]
                index += 1
            if self.done:
                return
            await changed.wait()

    def _wake(self) -> None:
        # Only followers ever wait on the event: without them, skip the per-chunk Event churn.
        if self.followers:
            self._changed.set()
            self._changed = trio.Event()


class Coalescer:
    """The flights in progress, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def join(self, key: str) -> Flight | None:
        """The flight in progress for ``key`` (now counting one more follower), if any."""
        flight = self._flights.get(key)
        if flight is None or flight.done:
            return None
        flight.followers += 1
        return flight

    def lead(self, key: str) -> Flight:
        flight = Flight(key)
        self._flights[key] = flight
        return flight

    def end(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
