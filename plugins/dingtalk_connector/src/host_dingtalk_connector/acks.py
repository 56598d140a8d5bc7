"""Writing ACKs: those queued together leave in one write.

A Stream connection ACKs every frame. Writing each ACK on its own costs a system call and, worse, a
wake-up of the gateway per message; under load the connection then runs in lock step with the
gateway, one frame and one ACK at a time. So the connection's reader only *queues* ACKs
(``AckWriter.put``, which never waits on the network unless the queue is full) and the connection's
``AckWriter.run`` task writes them: it lets the reader go on while other work is ready to run in
this process (at most ``gather_rounds`` scheduler rounds, or until ``batch`` ACKs are queued), then
sends every queued ACK through trio-websocket inside ``HoldableStream.held()``, so they reach the
socket as a single write. At moderate rates an ACK leaves as soon as nothing else in the process is
ready to run (the next round or two: the ACK latency at 200 msg/s did not change measurably).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from host.logs import logger

__all__ = ["AckStats", "AckWriter", "HoldableStream"]


@dataclass
class AckStats:
    """ACKs written and the socket writes they took (one per app, over all its connections);
    ``lost``: ACKs queued but never written because their connection closed first (DingTalk
    redelivers those frames)."""

    sent: int = 0
    writes: int = 0
    lost: int = 0


class HoldableStream(trio.abc.HalfCloseableStream):
    """The TCP/TLS stream under trio-websocket, able to hold writes and send them as one.

    Outside ``held()`` it passes everything straight through.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._held: list[bytes] | None = None
        # A held batch is written outside trio-websocket's own send lock: other writes (pings,
        # close) must wait for it rather than collide with it.
        self._write_lock = trio.StrictFIFOLock()

    @asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Everything written inside the block (by any task) is sent in one ``send_all`` at its end.

        If the block fails, what was written in it is still sent (unless cancelled): those writes
        count as done for their writers (trio-websocket's answer to the gateway's close frame, a
        pong, the messages before the failure), as they would have been without holding."""
        self._held = []
        try:
            yield
        except Exception:
            held, self._held = self._held, None
            if held:
                async with self._write_lock:
                    await self.inner.send_all(b"".join(held))  # a failure here replaces the first
            raise
        except BaseException:
            self._held = None
            raise
        held, self._held = self._held, None
        if held:
            async with self._write_lock:
                await self.inner.send_all(b"".join(held))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is None:
            async with self._write_lock:
                await self.inner.send_all(data)
        else:
            # No checkpoint here: trio-websocket's send lock already yields once per message; a
            # second scheduler round per held ACK would cost about as much as the write it saves.
            self._held.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()
        else:  # TLS has no half-close
            raise trio.ClosedResourceError("this stream cannot half-close")

    async def aclose(self) -> None:
        await self.inner.aclose()


class AckWriter:
    """Queues the ACK texts of one connection and writes them in batches (see the module doc)."""

    def __init__(self, ws: WebSocketConnection, stream: HoldableStream, *, stats: AckStats | None = None,
                 batch: int = 256, gather_rounds: int = 8, max_queued: int = 4096) -> None:
        self._ws = ws
        self._stream = stream
        self.batch = batch
        self.gather_rounds = gather_rounds
        self.max_queued = max_queued
        self._queue: list[str] = []
        self._ready = trio.Event()
        self._room = trio.Event()
        self._flushing = trio.Lock()  # the run task and the connection's final flush
        self.closed = False
        self.stats = stats or AckStats()

    async def put(self, text: str) -> bool:
        """Queue one ACK; ``False`` when the connection is closed. Waits only while ``max_queued``
        ACKs are already waiting (the socket is not taking our writes)."""
        while len(self._queue) >= self.max_queued and not self.closed:
            await self._room.wait()
        if self.closed:
            return False
        self._queue.append(text)
        self._ready.set()
        return True

    async def run(self) -> None:
        """Write queued ACKs until the connection closes (in the connection's nursery)."""
        while not self.closed:
            await self._ready.wait()
            await self._gather()
            await self.flush()

    async def _gather(self) -> None:
        # Let the reader queue the ACKs of the frames it already has, while there is such work.
        for _ in range(self.gather_rounds):
            if len(self._queue) >= self.batch or not trio.lowlevel.current_statistics().tasks_runnable:
                return
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self) -> None:
        """Write everything queued now, in one write."""
        async with self._flushing:
            queue, self._queue = self._queue, []
            self._ready = trio.Event()
            self._room.set()
            self._room = trio.Event()
            if not queue or self.closed:
                return
            written = 0
            try:
                async with self._stream.held():
                    for text in queue:
                        await self._ws.send_message(text)
                        written += 1
            except ConnectionClosed:
                # Closed during the batch: the ACKs before that still went out (see held()).
                self._count_lost(len(queue) - written, sent=written)
                self.close()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._count_lost(len(queue), sent=0)  # the socket took none of them
                self.close()
                return
            self.stats.writes += 1
            self.stats.sent += len(queue)

    def _count_lost(self, lost: int, *, sent: int) -> None:
        if sent:
            self.stats.writes += 1
            self.stats.sent += sent
        if lost:
            self.stats.lost += lost
            # The reader sees the connection end too; un-ACKed frames are redelivered by DingTalk.
            logger.warning("{} ACK(s) not written: the Stream connection closed first (DingTalk redelivers those frames)", lost)

    def close(self) -> None:
        """No more ACKs (``put`` answers ``False``; a waiting ``put`` is released)."""
        self.closed = True
        self._count_lost(len(self._queue), sent=0)
        self._queue.clear()
        self._room.set()
        self._ready.set()
