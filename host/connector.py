"""The contract between the host and connectors (the bridges to chat platforms).

A connector is any object with the attributes and methods of ``Connector`` (a ``typing.Protocol``:
no base class to inherit). Plugins contribute connectors through the ``register_connectors`` hook.
The host drives a connector like this::

    await task_group.start(connector.serve, intake)   # start: returns once it is taking messages
    ...                                              # connector calls intake.offer(message)
    await connector.deliver(message, reply)          # the host answers a message
    stream = await connector.open_stream(message)    # or streams an answer
    await connector.send(target, reply)              # proactive message, no inbound message
    await connector.stop()                           # stop: stop intake, close cleanly, serve returns

Backpressure: ``intake.offer`` never blocks. It returns ``False`` when the host's queue is full or the
host is shutting down; the connector must then leave the message unacknowledged (so the platform
redelivers it) or hold it and ``await intake.wait_for_room()``; never drop it, never buffer without
bound. See docs/connectors.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from trio import TaskStatus

    from host.model import Conversation, Event, Message, Reply

__all__ = ["Connector", "Intake", "ReplyStream", "Target"]


class Intake(Protocol):
    """The host side a connector feeds; given to ``Connector.serve``."""

    def offer(self, message: Message) -> bool:
        """Hand a message to the host without blocking.

        ``True``: accepted (queued, request id assigned): acknowledge it to the platform now.
        ``False``: the queue is full or the host is stopping: do not acknowledge.
        """
        ...

    async def wait_for_room(self) -> None:
        """Return when ``offer`` would accept a message (or the host is stopping)."""
        ...

    async def submit_event(self, event: Event) -> bool:
        """Run ``on_event`` for ``event`` now; ``True`` when every implementation succeeded."""
        ...

    @property
    def closed(self) -> bool:
        """``True`` once the host stopped taking messages."""
        ...


class ReplyStream(Protocol):
    """A reply that grows as chunks arrive (an AI card on DingTalk). Always ended exactly once."""

    async def append(self, chunk: str) -> None:
        """Add text. Connectors may coalesce updates to respect platform rate limits."""
        ...

    async def finish(self) -> None:
        """Finalize with all text appended so far."""
        ...

    async def fail(self, note: str) -> None:
        """Finalize as failed: the text so far plus ``note`` (e.g. "answer incomplete")."""
        ...


class Target(Protocol):
    """Where a proactive message goes; ``host.model.Conversation`` satisfies it."""

    id: str
    type: str


@runtime_checkable
class Connector(Protocol):
    """A chat platform connection. ``name`` is unique per host; ``platform`` e.g. ``dingtalk``."""

    name: str
    platform: str

    async def serve(self, intake: Intake, *, task_status: TaskStatus[None]) -> None:
        """Connect and take messages until ``stop()``; call ``task_status.started()`` when ready.

        Must return (not raise) after ``stop()``. Transient platform failures are handled inside
        (reconnect); an exception escaping ``serve`` is logged by the host and the connector is
        marked failed while the rest of the host keeps running.
        """
        ...

    async def stop(self) -> None:
        """Stop taking messages, hand back what is unacknowledged, close the connection cleanly."""
        ...

    def is_ready(self) -> bool:
        """``True`` while connected and able to receive (used by ``/readyz``)."""
        ...

    async def deliver(self, message: Message, reply: Reply) -> None:
        """Answer ``message`` (in its conversation). Raises ``DeliveryError`` when it cannot."""
        ...

    async def open_stream(self, message: Message) -> ReplyStream:
        """Start a streamed answer to ``message``."""
        ...

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        """Send a proactive message (no inbound message to answer)."""
        ...
