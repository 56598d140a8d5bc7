"""Streamed replies: AI cards (reference dingtalk-protocol.md 7), or one message at the end.

With ``[dingtalk.cards] template_id`` set, a streamed reply becomes an AI card:

1. ``POST /v1.0/card/instances/createAndDeliver`` with an empty content variable: the user sees the
   card at once ("processing"). ``deliverResults[*].success`` is checked (HTTP 200 can still carry a
   failed delivery);
2. ``PUT /v1.0/card/streaming`` (``isFull: true``, the whole text so far, as DingTalk needs for
   markdown variables) while the answer grows. Updates are **coalesced**: each card sends at most one
   update per ``min_interval`` and only when a token of its app's budget is free (``budget.TokenBucket``,
   ``updates_per_second`` + ``burst`` below DingTalk's 20 QPS per app and API, fair between cards,
   halved and paused on every ``403 QpsLimit``), always with the latest text, so twenty cards
   streaming at once share the budget instead of storming it;
3. the last call carries ``isFinalize: true`` (answer complete) or ``isError: true`` (failed: the
   text so far plus the host's note). It goes ahead of every other card's update in the budget and is
   retried on transient errors and QpsLimit (same ``guid``, so a retry is idempotent).

A card **always ends finalized or failed**: ``finish``/``fail`` are called by the host exactly once
whatever happens to the plugin (exceptions, timeouts, shutdown); and should one still be open at
shutdown, ``CardService.end_all`` (the plugin's ``on_shutdown``) marks it failed. When a card cannot be
finalized, or could not be created, the answer is sent as a message instead, so the user still gets
it.

Size rules: the card shows at most ``max_bytes`` (UTF-8, default 3000: DingTalk recommends at most
3 KB of streamed content); a longer answer ends the card with "(continued below)" and the rest
follows as messages. If DingTalk still answers "content is too large", the card's budget is halved
and the rest goes to messages too.

Without a template, a streamed reply is collected and sent as one markdown message when it ends
(``CollectedStream``), through the session webhook or the OpenAPI like any reply.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from host.logs import logger
from host.model import Message, Reply
from host_dingtalk_connector.budget import TokenBucket
from host_dingtalk_connector.errors import OpenApiError, ReplyError
from host_dingtalk_connector.retry import RetrySettings
from host_dingtalk_connector.sizing import utf8_len, utf8_prefix
from host_dingtalk_connector.tasks import TaskRunner

if TYPE_CHECKING:
    from host_dingtalk_connector.metrics import OutboundMetrics
    from host_dingtalk_connector.openapi import OpenApiClient

__all__ = [
    "CREATE_AND_DELIVER",
    "STREAMING",
    "AICardStream",
    "CardService",
    "CardSettings",
    "CollectedStream",
]

CREATE_AND_DELIVER = "/v1.0/card/instances/createAndDeliver"
DELIVER = "/v1.0/card/instances/deliver"
#: createAndDeliver retried after an attempt whose answer was lost, but which created the card.
_ALREADY_EXISTS = "param.cardAlreadyExist"
STREAMING = "/v1.0/card/streaming"
_STREAMING_API = f"PUT {STREAMING}"
#: DingTalk's code for a streamed content over its size limit (reference 7.5).
_TOO_LARGE = "200092"
_CONTINUED = "\n\n*(continued below)*"
_MORE = "\n\n…"

Deliver = Callable[[Reply], Awaitable[None]]


class CardSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.cards]``: AI card streaming."""

    #: The AI card template id (``xxxx.schema``) from the card platform; empty: streamed replies are
    #: sent as one markdown message when complete. ``[dingtalk.apps.<name>] card_template_id`` wins.
    template_id: str = ""
    #: The template variable bound to the streaming (markdown) component.
    content_key: str = "msgContent"
    #: Other card variables set when the card is created (e.g. ``msgTitle``), each at most 1 KB.
    params: dict[str, str] = msgspec.field(default_factory=dict)
    #: Streaming updates per second per app, all cards together (DingTalk allows 20 per API).
    updates_per_second: float = 8.0
    #: Updates allowed at once above that rate; ``updates_per_second + burst`` stays below 20.
    burst: float = 4.0
    #: Seconds between two updates of the same card at least (later text is coalesced).
    min_interval: float = 0.3
    #: The card holds at most this many UTF-8 bytes; longer answers continue in messages.
    max_bytes: int = 3000
    #: Seconds the last update (finalize / fail) may take, retries included.
    finalize_timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.updates_per_second <= 0 or self.burst < 1:
            raise ValueError("updates_per_second must be > 0 and burst >= 1")
        if self.updates_per_second + self.burst > 20:
            raise ValueError(
                "updates_per_second + burst: must stay within DingTalk's 20 calls per second"
            )
        if self.min_interval < 0:
            raise ValueError("min_interval: must be >= 0")
        if not 200 <= self.max_bytes <= 20_000:
            raise ValueError("max_bytes: must be between 200 and 20000")
        if self.finalize_timeout <= 0:
            raise ValueError("finalize_timeout: must be > 0")
        if not self.content_key:
            raise ValueError("content_key: must not be empty")
        for key, value in self.params.items():
            if utf8_len(value) > 1024:
                raise ValueError(f"params.{key}: card values are limited to 1 KB")


class CollectedStream:
    """A streamed reply collected and sent as one markdown message when it ends."""

    def __init__(
        self,
        deliver: Deliver,
        *,
        empty_text: str,
        on_end: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._deliver = deliver
        self._empty_text = empty_text
        self._on_end = on_end
        self._chunks: list[str] = []
        self._ended = False

    async def append(self, chunk: str) -> None:
        if self._ended:
            raise ReplyError("the streamed reply already ended")
        self._chunks.append(chunk)

    async def finish(self) -> None:
        text = "".join(self._chunks)
        # Blank lines only would be a blank message: say the answer was empty instead.
        await self._end(text if text.strip() else self._empty_text)

    async def fail(self, note: str) -> None:
        await self._end(("".join(self._chunks) + note).strip() or self._empty_text)

    async def _end(self, text: str) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._deliver(Reply.markdown(text))
        finally:
            if self._on_end is not None:
                await self._on_end()


class AICardStream:
    """One AI card being streamed. Created by ``CardService.open``; the host calls append/finish/fail."""

    def __init__(
        self,
        service: CardService,
        client: OpenApiClient,
        message: Message,
        *,
        fallback: Deliver,
        empty_text: str,
    ) -> None:
        self.service = service
        self.client = client
        self.message = message
        self.settings = service.settings
        self.out_track_id = f"card_{uuid.uuid4().hex}"
        self._fallback = fallback
        self._empty_text = empty_text
        self._text = ""
        self._shown = ""  # what the card displays now (the last accepted content)
        self._max_bytes = self.settings.max_bytes
        self._pending = trio.Event()
        self._lock = trio.Lock()  # one call in flight per card, in order
        self._last_sent = -1e9
        self._final: tuple[str, bool] = ("", False)
        #: ``finish``/``fail`` was called; ``completed``: the last update was sent (or given up).
        self.ended = False
        self.completed = False
        self.broken = False
        #: Intermediate updates accepted by DingTalk (for statistics and tests).
        self.updates = 0

    def __repr__(self) -> str:
        return f"AICardStream({self.out_track_id}, ended={self.ended}, updates={self.updates})"

    @property
    def app(self) -> str:
        return self.client.app.name

    # -- creation ------------------------------------------------------------------------------------

    def _target(self) -> dict[str, Any] | None:
        """openSpaceId and deliver model of the message's conversation (None: cannot address it)."""
        message, robot = self.message, self.client.app.robot_code
        if message.conversation.type == "group":
            model: dict[str, Any] = {"robotCode": robot}
            mention = self.service.mention_for(message)
            if mention:
                model["atUserIds"] = {mention: message.sender.name or mention}
            return {
                "openSpaceId": f"dtv1.card//IM_GROUP.{message.conversation.id}",
                "imGroupOpenDeliverModel": model,
                "userIdType": 1,
            }
        staff_id = message.sender.platform_ids.get("staffId")
        union_id = message.sender.platform_ids.get("unionId")
        user, id_type = (staff_id, 1) if staff_id else (union_id, 2)
        if not user:
            return None
        return {
            "openSpaceId": f"dtv1.card//IM_ROBOT.{user}",
            "imRobotOpenDeliverModel": {"spaceType": "IM_ROBOT", "robotCode": robot},
            "userIdType": id_type,
        }

    async def create(self, template_id: str) -> bool:
        """Create and deliver the card; ``False`` (logged, counted) when that failed."""
        target = self._target()
        if target is None:
            logger.info(
                "reply to {}: the sender has no staffId/unionId; no card, one message instead",
                self.message.id,
            )
            return False
        body = {
            "cardTemplateId": template_id,
            "outTrackId": self.out_track_id,
            "cardData": {"cardParamMap": {**self.settings.params, self.settings.content_key: ""}},
            "callbackType": "STREAM",
            "imGroupOpenSpaceModel": {"supportForward": True},
            "imRobotOpenSpaceModel": {"supportForward": True},
            **target,
        }
        what = f"card for {self.message.id}"
        on_qps = self.service.qps_counter(self.app)
        try:
            try:
                answer = await self.client.call(
                    "POST", CREATE_AND_DELIVER, body, what=what, on_qps=on_qps
                )
            except OpenApiError as exc:
                if exc.code != _ALREADY_EXISTS:
                    raise
                # Our outTrackId is new, so an earlier attempt (answer lost: 5xx, timeout) created
                # the card: deliver it (idempotent) rather than leave it "generating" beside a message.
                deliver = {"outTrackId": self.out_track_id, **target}
                answer = await self.client.call("POST", DELIVER, deliver, what=what, on_qps=on_qps)
                answer = {"result": {"deliverResults": answer.get("result")}}
        except OpenApiError as exc:
            self.service.count(self.app, "create_failed")
            logger.warning(
                "reply to {}: could not create the AI card ({}); sending one message instead",
                self.message.id,
                exc,
            )
            return False
        result = answer.get("result") if isinstance(answer.get("result"), dict) else {}
        results = result.get("deliverResults") if isinstance(result, dict) else None
        failed = [r for r in results or [] if isinstance(r, dict) and not r.get("success")]
        if not results or failed:
            reason = failed[0].get("errorMsg") if failed else "no delivery result"
            self.service.count(self.app, "create_failed")
            logger.warning(
                "reply to {}: the AI card was not delivered ({}); sending one message instead",
                self.message.id,
                reason,
            )
            return False
        self.service.count(self.app, "created")
        return True

    # -- the ReplyStream protocol --------------------------------------------------------------------

    async def append(self, chunk: str) -> None:
        """Add text; the card shows it with the next update its budget allows."""
        if self.ended:
            raise ReplyError("the streamed reply already ended")
        self._text += chunk
        self._pending.set()

    async def finish(self) -> None:
        """Finalize the card with the whole answer (``isFinalize``)."""
        await self._end(self._text, error=False)

    async def fail(self, note: str) -> None:
        """Mark the card failed (``isError``) showing the text so far plus ``note``."""
        await self._end(self._text + note, error=True)

    # -- updates -------------------------------------------------------------------------------------

    def _display(self, text: str, *, final: bool) -> tuple[str, str]:
        """(card content, overflow for messages) of ``text`` within the card's byte budget."""
        if utf8_len(text) <= self._max_bytes:
            return text, ""
        tail = _CONTINUED if final else _MORE
        head = utf8_prefix(text, self._max_bytes - utf8_len(tail))
        # Cut at a line or word boundary when there is one in the last quarter.
        for separator in ("\n", " "):
            at = head.rfind(separator, len(head) * 3 // 4)
            if at > 0:
                head = head[:at]
                break
        return head.rstrip() + tail, text[len(head) :].lstrip("\n")

    async def pump(self) -> None:
        """Send intermediate updates until the stream ends (runs in the plugin's ``TaskRunner``)."""
        try:
            await self._pump()
        except Exception as exc:  # a bug here must not take the other cards' loops down
            self.broken = True
            logger.opt(exception=exc).error(
                "card {}: update loop failed: {!r}", self.out_track_id, exc
            )

    async def _pump(self) -> None:
        bucket = self.service.bucket(self.client)
        while not self.ended and not self.broken:
            await self._pending.wait()
            if self.ended:
                return
            wait = self._last_sent + self.settings.min_interval - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            await bucket.acquire()
            if self.ended:
                return
            async with self._lock:
                if self.ended:
                    return
                self._pending = trio.Event()
                content, _ = self._display(self._text, final=False)
                if content == self._shown or not content.strip():  # never show a blank card
                    continue
                await self._send_update(content, bucket)

    async def _send_update(self, content: str, bucket: TokenBucket) -> None:
        body = self._body(content, finalize=False, error=False)
        try:
            await self.client.call(
                "PUT", STREAMING, body, what=f"card update for {self.message.id}", acquire=False,
                retry=_ONE_ATTEMPT, on_qps=self.service.qps_counter(self.app),
            )  # fmt: skip
        except OpenApiError as exc:
            self._last_sent = trio.current_time()
            if exc.transient:
                # The next update carries this text too: nothing is lost by skipping one.
                self._pending.set()
                return
            if exc.code == _TOO_LARGE:
                self._shrink()
                self._pending.set()
                return
            self.broken = True
            self.service.count(self.app, "error")
            logger.warning(
                "card {}: update refused ({}); the answer will be sent when complete",
                self.out_track_id,
                exc,
            )
            return
        self._last_sent = trio.current_time()
        self._shown = content
        self.updates += 1
        self.service.count(self.app, "update")

    def _shrink(self) -> None:
        self._max_bytes = max(200, self._max_bytes // 2)
        logger.info(
            "card {}: DingTalk found the content too large; card budget now {} bytes",
            self.out_track_id,
            self._max_bytes,
        )

    def _body(self, content: str, *, finalize: bool, error: bool) -> dict[str, Any]:
        return {
            "outTrackId": self.out_track_id,
            "guid": uuid.uuid4().hex,
            "key": self.settings.content_key,
            "content": content,
            "isFull": True,
            "isFinalize": finalize,
            "isError": error,
        }

    async def _end(self, text: str, *, error: bool) -> None:
        if self.ended:
            return
        self.ended = True
        # Whitespace only would finish a blank card (a common complaint): show empty_text instead.
        self._final = (text if text.strip() else self._empty_text, error)
        self._pending.set()  # wake the pump so it exits
        await self._complete()

    async def _complete(self) -> None:
        """Send the last update (once), then the overflow, or the whole answer if the card failed."""
        async with self._lock:
            if self.completed:
                return
            text, error = self._final
            overflow = await self._finalize(text, error=error)
            # Only now: a cancelled finalize leaves the card open for the service's last sweep.
            self.completed = True
        await self.service.closed(self)
        # The card could not be ended: the user still gets the whole answer as a message.
        rest = text if overflow is None else overflow
        if rest.strip():
            await self._fallback(Reply.markdown(rest))

    async def _finalize(self, text: str, *, error: bool) -> str | None:
        """Send the last update; returns the overflow text (None when the card could not be ended)."""
        while True:
            content, overflow = self._display(text, final=True)
            body = self._body(content, finalize=not error, error=error)
            try:
                await self.client.call(
                    "PUT", STREAMING, body, what=f"card end for {self.message.id}", priority=True,
                    retry=self.service.final_retry, on_qps=self.service.qps_counter(self.app),
                )  # fmt: skip
            except OpenApiError as exc:
                if exc.code == _TOO_LARGE and self._max_bytes > 200:
                    self._shrink()
                    continue
                self.service.count(self.app, "error")
                logger.error(
                    "card {}: could not be ended ({}); sending the answer as a message",
                    self.out_track_id,
                    exc,
                )
                return None
            self.service.count(self.app, "failed" if error else "finalized")
            return overflow

    async def abandon(self, note: str) -> None:
        """End the card now: the host shuts down and the card is still open."""
        try:
            if not self.ended:
                logger.warning(
                    "card {}: still open at shutdown; marking it failed",
                    self.out_track_id,
                )
                await self.fail(note)
            elif not self.completed:
                await self._complete()
        except Exception as exc:  # one card's failure must not keep the others from being ended
            logger.opt(exception=exc).error(
                "card {}: could not be ended: {!r}", self.out_track_id, exc
            )


_ONE_ATTEMPT = RetrySettings(attempts=1, deadline=30.0)


class CardService:
    """Opens streamed replies; runs each AI card's coalescing update loop in a ``TaskRunner``.

    The runner (``attach``) is a host service of the plugin: it outlives the connector, so cards keep
    streaming while the host drains its replies at shutdown. Without a runner, cards still work but
    show the answer only when it is complete. ``end_all`` ends every card still open (the plugin's
    ``on_shutdown``); ``retire`` (plugin reload) lets open streams finish and then calls ``on_idle``.
    """

    def __init__(
        self,
        settings: CardSettings,
        metrics: OutboundMetrics,
        *,
        mention_for: Callable[[Message], str | None] = lambda message: None,
        template_for: Callable[[str], str] | None = None,
        empty_text: str = "(The answer was empty.)",
        shutdown_note: str = "\n\n(This answer was interrupted because the bot is restarting. Please ask again.)",
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.mention_for = mention_for
        self._template_for = template_for or (lambda app: settings.template_id)
        self.empty_text = empty_text
        self.shutdown_note = shutdown_note
        self.final_retry = RetrySettings(
            attempts=6, base_delay=0.25, max_delay=2.0, deadline=settings.finalize_timeout
        )
        self.runner: TaskRunner | None = None
        self._open: set[AICardStream] = set()
        self._collected = 0
        self._buckets: dict[int, TokenBucket] = {}
        self._on_idle: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def attach(self, runner: TaskRunner) -> None:
        """Run card update loops in ``runner`` from now on."""
        self.runner = runner

    @property
    def open_streams(self) -> int:
        """Streamed replies not ended yet (AI cards not finalized, collected replies not sent)."""
        return len(self._open) + self._collected

    def when_idle(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call ``callback`` once no stream is open (at once if none is)."""
        self._on_idle = callback

    async def check_idle(self) -> None:
        """Call the ``when_idle`` callback if no stream is open any more."""
        if self._on_idle is not None and self.open_streams == 0:
            callback, self._on_idle = self._on_idle, None
            await callback()

    async def end_all(self) -> None:
        """End every card still open, marked failed with the shutdown note (bounded, shielded).

        The host normally ended every stream before (it finalizes streams it cancels); this is the
        safety net for a stream whose last update was cut short.
        """
        if not self._open:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.finalize_timeout):
            async with trio.open_nursery() as nursery:
                for stream in list(self._open):
                    nursery.start_soon(stream.abandon, self.shutdown_note)

    @property
    def running(self) -> bool:
        """Whether intermediate updates run (a runner is attached and running)."""
        return self.runner is not None and self.runner.running

    def template_for(self, app: str) -> str:
        return self._template_for(app)

    def bucket(self, client: OpenApiClient) -> TokenBucket:
        """The streaming budget of ``client``'s app (shared by all its cards)."""
        bucket = self._buckets.get(id(client))
        if bucket is None:
            bucket = TokenBucket(
                self.settings.updates_per_second,
                self.settings.burst,
                min_rate=min(1.0, self.settings.updates_per_second),
                recovery_interval=client.budget_settings.recovery_interval,
            )
            self._buckets[id(client)] = bucket
            client.set_budget(_STREAMING_API, bucket)
        return bucket

    def count(self, app: str, outcome: str) -> None:
        self.metrics.card_updates.labels(app, outcome).inc()

    def qps_counter(self, app: str) -> Callable[[], None]:
        counter = self.metrics.card_qps_rejections.labels(app)
        return counter.inc

    async def closed(self, stream: AICardStream) -> None:
        self._open.discard(stream)
        await self.check_idle()

    async def _collected_ended(self) -> None:
        self._collected -= 1
        await self.check_idle()

    # -- opening -------------------------------------------------------------------------------------

    async def open(
        self, client: OpenApiClient, message: Message, *, deliver: Deliver
    ) -> AICardStream | CollectedStream:
        """A streamed reply to ``message``: an AI card when the app has a template, else collected."""
        template = self.template_for(client.app.name)
        if template:
            stream = AICardStream(
                self, client, message, fallback=deliver, empty_text=self.empty_text
            )
            self.bucket(client)
            if await stream.create(template):
                self._open.add(stream)
                if self.runner is None or not self.runner.spawn(
                    stream.pump, name=f"card {stream.out_track_id}"
                ):
                    logger.debug(
                        "card {}: no card runner; the card shows the answer when complete",
                        stream.out_track_id,
                    )
                return stream
        self._collected += 1
        return CollectedStream(deliver, empty_text=self.empty_text, on_end=self._collected_ended)

    def statistics(self) -> dict[str, Any]:
        return {
            "open_cards": len(self._open),
            "open_collected": self._collected,
            "running": self.running,
            "budgets": {str(k): b.statistics() for k, b in self._buckets.items()},
        }
