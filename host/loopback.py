"""The built-in in-memory connector: messages in by method call, replies recorded in a list.

Used by ``host.testing`` and by tests of plugins that do not care which platform they run on. It
implements the full ``Connector`` protocol, including backpressure (``send_message`` waits for room
when the host's queue is full, exactly as a well-behaved platform connector would).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

from host.model import Conversation, Event, Message, Reply, Sender, TextPart

if TYPE_CHECKING:
    from host.connector import Intake

__all__ = ["Delivery", "LoopbackConnector"]


@dataclass
class Delivery:
    """One reply the host delivered through the loopback connector."""

    conversation_id: str
    reply: Reply
    in_reply_to: str | None = None
    streamed: bool = False
    chunks: list[str] = field(default_factory=list)
    state: Literal["sent", "streaming", "finished", "failed"] = "sent"

    @property
    def text(self) -> str:
        return self.reply.text


class _LoopbackStream:
    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery

    async def append(self, chunk: str) -> None:
        if self.delivery.state != "streaming":
            raise RuntimeError("stream already ended")
        self.delivery.chunks.append(chunk)
        self.delivery.reply.text += chunk

    async def finish(self) -> None:
        if self.delivery.state == "streaming":
            self.delivery.state = "finished"

    async def fail(self, note: str) -> None:
        if self.delivery.state == "streaming":
            self.delivery.reply.text += note
            self.delivery.state = "failed"


class LoopbackConnector:
    """An in-memory connector. ``deliveries`` lists every reply in order."""

    platform = "loopback"

    def __init__(self, name: str = "loopback") -> None:
        self.name = name
        self.deliveries: list[Delivery] = []
        self._intake: Intake | None = None
        self._stopped = trio.Event()
        self._ids = itertools.count(1)
        self.ready = False

    async def serve(self, intake: Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._intake = intake
        self.ready = True
        task_status.started()
        await self._stopped.wait()
        self.ready = False

    async def stop(self) -> None:
        self._stopped.set()

    def is_ready(self) -> bool:
        return self.ready

    def make_message(
        self,
        text: str,
        *,
        conversation_id: str = "conv-1",
        group: bool = False,
        sender_id: str = "user-1",
        sender_name: str = "Test User",
        message_id: str | None = None,
    ) -> Message:
        return Message(
            id=message_id or f"loop-{next(self._ids)}",
            platform=self.platform,
            connector=self.name,
            conversation=Conversation(id=conversation_id, type="group" if group else "single"),
            sender=Sender(platform_ids={"user_id": sender_id}, name=sender_name, identity=sender_id),
            parts=[TextPart(text=text)],
        )

    async def send_message(self, message: Message) -> None:
        """Offer ``message`` to the host, waiting for room when the queue is full."""
        if self._intake is None:
            raise RuntimeError("loopback connector is not serving")
        while not self._intake.offer(message):
            if self._intake.closed:
                raise RuntimeError("host is not accepting messages")
            await self._intake.wait_for_room()

    def try_send_message(self, message: Message) -> bool:
        """Offer without waiting; ``False`` when the host refused (queue full or stopping)."""
        if self._intake is None:
            raise RuntimeError("loopback connector is not serving")
        return self._intake.offer(message)

    async def send_event(self, event_type: str, payload: dict[str, object] | None = None) -> bool:
        if self._intake is None:
            raise RuntimeError("loopback connector is not serving")
        event = Event(
            id=f"evt-{next(self._ids)}",
            platform=self.platform,
            connector=self.name,
            type=event_type,
            payload=dict(payload or {}),
        )
        return await self._intake.submit_event(event)

    async def deliver(self, message: Message, reply: Reply) -> None:
        self.deliveries.append(Delivery(message.conversation.id, reply, in_reply_to=message.id))

    async def open_stream(self, message: Message) -> _LoopbackStream:
        delivery = Delivery(
            message.conversation.id,
            Reply(kind="markdown", text=""),
            in_reply_to=message.id,
            streamed=True,
            state="streaming",
        )
        self.deliveries.append(delivery)
        return _LoopbackStream(delivery)

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        self.deliveries.append(Delivery(target.id, reply))

    def replies_to(self, message_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.in_reply_to == message_id]
