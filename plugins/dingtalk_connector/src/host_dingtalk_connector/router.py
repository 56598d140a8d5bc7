"""What to do with each frame of one app: answer, deduplicate, convert, hand to the host, ACK.

The reader of a connection calls ``FrameRouter.handle`` for every WebSocket message and awaits it,
so ``handle`` must never wait on plugins: the only thing it may await is room in the connection's
ACK queue (``Link.send`` queues; the ACK writer of ``acks.py`` does the socket writes).

* SYSTEM ``ping``: ACK echoing ``data`` (the ``opaque``). ``disconnect``: ACK, then tell the link
  (the connection engine opens the replacement first and keeps this socket until it closes).
* CALLBACK bot message: frame ``messageId`` already seen -> ACK again; ``robotCode`` not ours ->
  refused (logged, counted, ACK 400); ``msgId`` already accepted -> redelivery (ACK, not processed
  again); otherwise convert and ``intake.offer``: accepted -> remember both ids and ACK at once
  (long before any plugin answers); refused by the host (queue full or stopping) -> **no ACK**, so
  DingTalk redelivers it later, and nothing is remembered.
* CALLBACK card callback, EVENT: run ``intake.submit_event`` in a bounded set of tasks that
  outlive the connection (``max_inflight_events`` per app; when full the frame stays un-ACKed and
  DingTalk redelivers). Card callbacks are ACKed on acceptance (DingTalk gives them 2 s); EVENTs
  are ACKed ``SUCCESS`` or ``LATER`` from the outcome of ``on_event``.
* Anything unusable: logged with its ``messageId``, counted in ``dingtalk_bad_frames_total``,
  ACKed 400 (404 for a topic or type we do not handle) when it had a ``messageId``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from host.logs import logger
from host_dingtalk_connector import frames
from host_dingtalk_connector.convert import (
    card_callback_event,
    convert_bot_message,
    event_from_frame,
    msgtype_label,
)
from host_dingtalk_connector.errors import FrameError

if TYPE_CHECKING:
    from host.connector import Intake
    from host.model import Event, Message
    from host_dingtalk_connector.config import AppConfig, StreamSettings
    from host_dingtalk_connector.dedup import DedupCache
    from host_dingtalk_connector.identity import IdentityResolver
    from host_dingtalk_connector.metrics import ConnectorMetrics

__all__ = ["FrameRouter", "Link"]


class Link(Protocol):
    """The connection a frame came in on, as the router sees it."""

    #: Short label for logs (``app#3``).
    label: str

    async def send(self, text: str) -> bool:
        """Queue one text frame (an ACK) for writing; ``False`` when the connection is already closed."""
        ...

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` as a task that may outlive this connection (bounded by the router)."""
        ...

    def on_disconnect(self, reason: str) -> None:
        """The gateway sent SYSTEM ``disconnect``: replace this connection (make before break)."""
        ...


class _RateLimitedWarning:
    """Logs a warning at most once per ``interval`` seconds, with how many were suppressed."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        self._suppressed = 0
        self._next = now + self.interval
        logger.warning(text + suffix, *args)


class FrameRouter:
    """Routes the frames of one app (shared by all of that app's connections)."""

    def __init__(
        self,
        *,
        app: AppConfig,
        connector_name: str,
        settings: StreamSettings,
        intake: Intake,
        resolver: IdentityResolver,
        dedup: DedupCache,
        metrics: ConnectorMetrics,
        on_accepted: Callable[[Message], None] | None = None,
        events_running: set[str] | None = None,
    ) -> None:
        self.app = app
        self.connector_name = connector_name
        self.settings = settings
        self.intake = intake
        self.resolver = resolver
        self.dedup = dedup
        self.metrics = metrics
        self.on_accepted = on_accepted
        self.events_in_flight = 0
        #: Events / card callbacks being handled (by key); shared with the router this one replaces on
        #: a hot reload, whose handlers outlive it, so a redelivery meanwhile is not run twice.
        self._events_running: set[str] = events_running if events_running is not None else set()
        self._deferred_warning = _RateLimitedWarning()
        self._log = logger.bind(app=app.name)
        name = app.name
        # Pre-bound metric children: the hot path then costs a dict lookup less per frame.
        self._ack_ok = {kind: metrics.acks.labels(name, kind, "200") for kind in ("bot", "event", "card", "system")}
        self._latency = {kind: metrics.ack_latency.labels(kind) for kind in ("bot", "event", "card", "system")}
        self._frame_hits = metrics.dedup_hits.labels(name, "frame")
        self._msg_hits = metrics.dedup_hits.labels(name, "msg")
        self._event_hits = metrics.dedup_hits.labels(name, "event")
        self._redeliveries = metrics.redeliveries.labels(name)
        self._pings = metrics.pings.labels(name)
        self._message_counters: dict[tuple[str, str], Any] = {}

    def _count_message(self, msgtype: str, outcome: str) -> None:
        child = self._message_counters.get((msgtype, outcome))
        if child is None:
            child = self._message_counters[(msgtype, outcome)] = self.metrics.messages.labels(
                self.app.name, msgtype, outcome
            )
        child.inc()

    # -- entry point ---------------------------------------------------------------------------

    async def handle(self, link: Link, raw: str | bytes, received: float) -> None:
        """Handle one WebSocket message; ``received`` is its ``time.perf_counter()`` arrival time."""
        try:
            frame = frames.decode_frame(raw, max_size=self.settings.max_frame_bytes)
        except FrameError as exc:
            await self._bad_frame(link, exc)
            return
        try:
            if frame.type == "CALLBACK":
                if frame.topic in frames.BOT_TOPICS:
                    await self._bot_message(link, frame, received)
                elif frame.topic == frames.CARD_CALLBACK_TOPIC:
                    await self._event_frame(link, frame, received, card=True)
                else:
                    raise FrameError("unknown_topic", f"no handler for CALLBACK topic {frame.topic!r}", message_id=frame.message_id)
            elif frame.type == "EVENT":
                await self._event_frame(link, frame, received, card=False)
            else:
                await self._system(link, frame, received)
        except FrameError as exc:
            await self._bad_frame(link, exc)
        except Exception as exc:
            # A bug (ours, or a custom identity resolver's) must not take the connection down.
            self.metrics.bad_frames.labels(self.app.name, "internal_error").inc()
            self._log.opt(exception=exc).error(
                "{}: handling frame {} failed: {!r}", link.label, frame.message_id, exc
            )
            if await link.send(frames.ack_error(frame.message_id, 500, "client internal error")):
                self.metrics.acks.labels(self.app.name, "error", "500").inc()

    async def _ack(self, link: Link, kind: str, text: str, received: float) -> None:
        if await link.send(text):
            self._ack_ok[kind].inc()
            self._latency[kind].observe(time.perf_counter() - received)

    async def _bad_frame(self, link: Link, exc: FrameError) -> None:
        self.metrics.bad_frames.labels(self.app.name, exc.reason).inc()
        self._log.warning(
            "{}: bad frame ({}): {}; messageId={}", link.label, exc.reason, exc.detail, exc.message_id or "-"
        )
        if exc.message_id:
            code, text = (404, "not supported") if exc.reason in ("unknown_topic", "unknown_type") else (400, exc.reason)
            if await link.send(frames.ack_error(exc.message_id, code, text)):
                self.metrics.acks.labels(self.app.name, "error", str(code)).inc()

    # -- SYSTEM ------------------------------------------------------------------------------------

    async def _system(self, link: Link, frame: frames.Frame, received: float) -> None:
        topic = frame.topic
        if topic == "ping":
            self._pings.inc()
            await self._ack(link, "system", frames.ack_system(frame.message_id, frame.data), received)
        elif topic == "disconnect":
            reason = "?"
            with contextlib.suppress(FrameError):
                reason = str(frame.payload().get("reason", "?"))
            self._log.info("{}: gateway asked to disconnect ({}); opening a replacement first", link.label, reason)
            # ACK before anything else: the Go SDK learned that closing first made the server resend it.
            await self._ack(link, "system", frames.ack_system(frame.message_id, frame.data), received)
            link.on_disconnect(reason)
        else:
            self._log.debug("{}: SYSTEM frame with topic {!r} acknowledged", link.label, topic)
            await self._ack(link, "system", frames.ack_system(frame.message_id, frame.data), received)

    # -- bot messages --------------------------------------------------------------------------------

    async def _bot_message(self, link: Link, frame: frames.Frame, received: float) -> None:
        message_id = frame.message_id
        name = self.app.name
        if self.dedup.seen("frame", message_id):
            self._frame_hits.inc()
            self._count_message("other", "duplicate")
            await self._ack(link, "bot", frames.ack_callback(message_id), received)
            return
        data = frame.payload()
        msgtype = msgtype_label(data.get("msgtype"))
        robot_code = data.get("robotCode")
        if robot_code is not None and robot_code != self.app.robot_code:
            self._count_message(msgtype, "refused")
            self._log.warning(
                "{}: refused bot message {} for robotCode {!r}; this app's robot is {!r}",
                link.label, message_id, robot_code, self.app.robot_code,
            )  # fmt: skip
            self.dedup.add("frame", message_id)
            if await link.send(frames.ack_error(message_id, 400, "robotCode is not this app's robot")):
                self.metrics.acks.labels(name, "bot", "400").inc()
            return
        msg_id = data.get("msgId")
        if isinstance(msg_id, str) and self.dedup.seen("msg", msg_id):
            self._msg_hits.inc()
            self._redeliveries.inc()
            self._count_message(msgtype, "duplicate")
            self._log.info("{}: redelivery of {} (frame {}) acknowledged, not processed again", link.label, msg_id, message_id)
            self.dedup.add("frame", message_id)
            await self._ack(link, "bot", frames.ack_callback(message_id), received)
            return
        message = convert_bot_message(
            data, connector=self.connector_name, app=name, resolver=self.resolver, frame_message_id=message_id
        )
        if msgtype in ("other", "unknownMsgType") or not message.parts:
            self._log.warning(
                "{}: bot message {} of msgtype {!r} has no content we can convert; passing it on with its raw payload",
                link.label, message_id, data.get("msgtype"),
            )  # fmt: skip
        if not self.intake.offer(message):
            # Backpressure: no ACK, nothing remembered; DingTalk delivers it again later.
            self._count_message(msgtype, "deferred")
            self._deferred_warning(
                "{}: host is not accepting messages (queue full or stopping); left {} un-acknowledged for redelivery",
                link.label, message_id,
            )  # fmt: skip
            return
        self.dedup.add("frame", message_id)
        self.dedup.add("msg", message.id)
        self._count_message(msgtype, "accepted")
        if self.on_accepted is not None:
            self.on_accepted(message)
        await self._ack(link, "bot", frames.ack_callback(message_id), received)

    # -- events and card callbacks -------------------------------------------------------------------

    async def _event_frame(self, link: Link, frame: frames.Frame, received: float, *, card: bool) -> None:
        message_id = frame.message_id
        name = self.app.name
        kind = "card" if card else "event"
        event_key = message_id if card else (frame.headers.get("eventId") or message_id)
        if self.dedup.seen("frame", message_id) or self.dedup.seen("event", event_key):
            self._event_hits.inc()
            self.metrics.events.labels(name, "duplicate").inc()
            text = frames.ack_callback(message_id) if card else frames.ack_event(message_id, success=True)
            await self._ack(link, kind, text, received)
            return
        if event_key in self._events_running:
            # The same event is being handled right now (redelivered while on_event runs): that run
            # ACKs its own frame; this copy stays un-ACKed and a later redelivery gets the outcome.
            self._event_hits.inc()
            self.metrics.events.labels(name, "duplicate").inc()
            return
        data = frame.payload()
        if card:
            event = card_callback_event(frame.headers, data, connector=self.connector_name, app=name)
        else:
            event = event_from_frame(frame.headers, data, connector=self.connector_name, app=name)
        if self.events_in_flight >= self.settings.max_inflight_events or self.intake.closed:
            self.metrics.events.labels(name, "deferred").inc()
            self._deferred_warning(
                "{}: {} event handlers busy (or stopping); left {} un-acknowledged for redelivery",
                link.label, self.events_in_flight, message_id,
            )  # fmt: skip
            return
        self.events_in_flight += 1
        self._events_running.add(event_key)

        async def run() -> None:
            await self._run_event(link, event, event_key, message_id, received, card=card)

        # Spawned before the card's ACK is awaited: the handler is what undoes the two lines above,
        # so it must exist even if the connection dies during that await.
        link.spawn(run)
        if card:
            # Card callbacks must be answered within 2 s: ACK on acceptance, handle after.
            self.dedup.add("frame", message_id)
            await self._ack(link, "card", frames.ack_callback(message_id), received)

    async def _run_event(
        self, link: Link, event: Event, event_key: str, message_id: str, received: float, *, card: bool
    ) -> None:
        ok = False
        try:
            ok = await self.intake.submit_event(event)
        except Exception as exc:
            self._log.opt(exception=exc).error("{}: on_event dispatch for {} failed: {!r}", link.label, message_id, exc)
        finally:
            self.events_in_flight -= 1
            self._events_running.discard(event_key)
        self.metrics.events.labels(self.app.name, "success" if ok else "later").inc()
        if ok:
            self.dedup.add("event", event_key)
            self.dedup.add("frame", message_id)
        if card:
            if not ok:
                self._log.warning("{}: card callback {} was not handled successfully", link.label, message_id)
            return
        if not ok:
            self._log.warning("{}: event {} ({}) not consumed; ACK LATER for redelivery", link.label, event_key, event.type)
        await self._ack(link, "event", frames.ack_event(message_id, success=ok), received)
