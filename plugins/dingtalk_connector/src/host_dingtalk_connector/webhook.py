"""Webhook mode: DingTalk bot messages received as signed HTTP callbacks on the host's HTTP server.

In HTTP mode (reference dingtalk-protocol.md 8.1) DingTalk POSTs each bot message, the same JSON as
a Stream frame's ``data`` (section 4), to our callback URL with ``timestamp`` and ``sign`` headers.
``WebhookReceiver.endpoint`` is that URL (``[dingtalk.webhook] path``, default
``/dingtalk/callback``, added with ``host.http.add_route``). For each request, cheapest check first:

====================================  ======  ==============================================
check                                 status  body ``{"error": reason, "detail": ...}``
====================================  ======  ==============================================
``timestamp``/``sign`` absent         401     ``missing_headers``
``timestamp`` not epoch milliseconds  401     ``bad_timestamp``
``timestamp`` outside the window      401     ``outside_window``
``sign`` matches no app's AppSecret   401     ``bad_sign``
body larger than ``max_body_bytes``   413     ``too_large``
same signature and body seen before   409     ``replay``
same signature, different body        503     ``signature_reused`` (Retry-After; see below)
replay memory full                    503     ``replay_cache_full`` (fail closed)
body not JSON / not an object         400     ``bad_json`` / ``not_object``
``robotCode`` of another robot        400     ``robot_mismatch``
not a usable bot message              400     ``bad_payload`` (the detail names the field)
connector not serving (stopping)      503     ``not_serving`` (Retry-After)
host queue full for ``busy_wait`` s   503     ``busy`` (Retry-After)
``msgId`` already accepted            200     ``{"msgtype": "empty"}`` (not processed again)
accepted                              200     the reply, or ``{"msgtype": "empty"}``
====================================  ======  ==============================================

Answers follow the protocol: when a plugin answers within ``inline_reply_timeout`` seconds the
reply (text, markdown or actionCard) is the HTTP response body itself; otherwise the response is
``{"msgtype": "empty"}`` and the reply goes later through the message's session webhook (the
connector's normal reply path). DingTalk gives HTTP pushes about 2.5 s.

``signature_reused`` answers 503 because two genuine callbacks DingTalk signed in the same
millisecond carry the same signature (it covers only the timestamp, see ``signing``): a status
DingTalk may retry is the only way not to lose the second one, and it gives an attacker nothing.

Every refusal is counted in ``dingtalk_webhook_requests_total{outcome}``, logged with its reason
(at most one line per ``log_interval`` per reason, with how many were suppressed), and audited as
``security``/``webhook_rejected``: the first refusal of each ``audit_interval`` at once, the rest
as one ``webhook_rejected_summary`` per interval, so a flood cannot fill the audit log. Nothing
logged or audited contains the AppSecret, the ``sign`` header or the body.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from host.logs import logger
from host.metrics import Metrics
from host_dingtalk_connector.convert import convert_bot_message, msgtype_label
from host_dingtalk_connector.dedup import DedupCache
from host_dingtalk_connector.errors import PayloadError
from host_dingtalk_connector.signing import ReplayGuard, SignatureError, match_signature

if TYPE_CHECKING:
    from host.connector import Intake
    from host.model import Message
    from host_dingtalk_connector.config import AppConfig
    from host_dingtalk_connector.identity import IdentityResolver

__all__ = ["EMPTY_ANSWER", "REJECTION_STATUS", "WebhookMetrics", "WebhookReceiver", "WebhookSettings"]

#: The callback answer that means "no reply in this response" (reference 6.1).
EMPTY_ANSWER: dict[str, Any] = {"msgtype": "empty"}

#: HTTP status of each refusal reason (the table in the module docstring).
REJECTION_STATUS: dict[str, int] = {
    "missing_headers": 401,
    "bad_timestamp": 401,
    "outside_window": 401,
    "bad_sign": 401,
    "too_large": 413,
    "replay": 409,
    "signature_reused": 503,
    "replay_cache_full": 503,
    "bad_json": 400,
    "not_object": 400,
    "robot_mismatch": 400,
    "bad_payload": 400,
    "not_serving": 503,
    "busy": 503,
    "internal_error": 500,
}
#: Refusals that are not attacks or DingTalk mistakes but our own state: not audited as security events.
_NOT_SECURITY = frozenset({"not_serving", "busy", "replay_cache_full", "internal_error"})
#: Key of a message's inline-answer slot in ``Message.context``.
_INLINE_KEY = "webhook_inline"
#: Distinct remote addresses kept per audit summary (a sample, so a flood stays small).
_REMOTES_SAMPLE = 10


class WebhookSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.webhook]``: the HTTP callback endpoint (used when ``[dingtalk] mode`` is
    ``webhook`` or ``both``)."""

    #: Path on the host's HTTP server; the callback URL to enter in the DingTalk developer console is
    #: ``https://<your host><path>``.
    path: str = "/dingtalk/callback"
    #: A ``timestamp`` further than this from our clock (either direction) is refused. DingTalk's
    #: documentation says one hour; a shorter window narrows replay exposure if clocks are in sync.
    window_seconds: float = 3600.0
    #: Wait this long for the answer to put it in the HTTP response; later answers go through the
    #: session webhook. DingTalk waits about 2.5 s for the response. 0 disables inline answers.
    inline_reply_timeout: float = 1.5
    #: When the host's queue is full, hold the request this long for room before answering 503.
    busy_wait: float = 0.5
    #: How long DingTalk waits for the HTTP response to a callback (2.5 s per its documentation). An
    #: inline answer written later reaches nobody, so ``busy_wait + inline_reply_timeout`` must stay
    #: below it. Raise it only if DingTalk is known to wait longer (or for a local test client).
    callback_response_timeout: float = 2.5
    #: Larger bodies are refused with 413 (a bot message is a few KB).
    max_body_bytes: int = 1_048_576
    #: Signatures remembered for replay protection; when full, new callbacks get 503 (fail closed).
    replay_cache_max: int = 100_000
    #: At most one individual ``webhook_rejected`` audit record per this many seconds; the rest are
    #: summarised once per interval.
    audit_interval: float = 60.0
    #: At most one log line per refusal reason per this many seconds (with a suppressed count).
    log_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or self.path.rstrip("/") in ("", "/metrics", "/healthz", "/readyz"):
            raise ValueError(f"path: must start with '/' and not be a built-in path, got {self.path!r}")
        if not 1 <= self.window_seconds <= 86_400:
            raise ValueError(f"window_seconds: must be between 1 and 86400, got {self.window_seconds}")
        if not 0 <= self.inline_reply_timeout <= 30:
            raise ValueError(f"inline_reply_timeout: must be between 0 and 30, got {self.inline_reply_timeout}")
        if not 0 <= self.busy_wait <= 30:
            raise ValueError(f"busy_wait: must be between 0 and 30, got {self.busy_wait}")
        if self.busy_wait + self.inline_reply_timeout >= self.callback_response_timeout:
            raise ValueError(
                f"inline_reply_timeout: busy_wait + inline_reply_timeout ({self.busy_wait} + "
                f"{self.inline_reply_timeout} s) must be below callback_response_timeout "
                f"({self.callback_response_timeout} s, how long DingTalk waits for the response): "
                "an inline answer written later is lost"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: must be at least 1024, got {self.max_body_bytes}")
        if self.replay_cache_max < 100:
            raise ValueError(f"replay_cache_max: must be at least 100, got {self.replay_cache_max}")
        if self.audit_interval < 1 or self.log_interval <= 0:
            raise ValueError("audit_interval must be >= 1 and log_interval > 0")


class WebhookMetrics:
    """The webhook endpoint's metrics (``host_`` prefixed by ``host.metrics``; bounded labels)."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "dingtalk_webhook_requests_total",
            "HTTP callbacks by outcome (accepted, duplicate, or the refusal reason).",
            ["outcome"],
        )
        self.answers = metrics.counter(
            "dingtalk_webhook_answers_total",
            "Accepted callbacks by how they were answered (inline reply in the response, or empty).",
            ["how"],
        )
        self.messages = metrics.counter(
            "dingtalk_messages_total",
            "Bot messages by msgtype and outcome (accepted, deferred, duplicate, refused, bad).",
            ["app", "msgtype", "outcome"],
        )
        self.replay_entries = metrics.gauge(
            "dingtalk_webhook_replay_entries", "Signatures remembered for replay protection."
        )


AuditSink = Callable[..., None]


class RejectionReporter:
    """Logs and audits refusals without letting a flood fill either (see the module docstring).

    ``audit`` is ``host.audit_soon``; ``run`` is the service that writes the per-interval summaries.
    """

    def __init__(
        self,
        audit: AuditSink | None,
        *,
        target: str,
        audit_interval: float,
        log_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audit = audit
        self._target = target
        self.audit_interval = audit_interval
        self.log_interval = log_interval
        self._clock = clock
        self._next_audit = 0.0
        self._suppressed: Counter[str] = Counter()
        self._remotes: set[str] = set()
        self._next_log: dict[str, float] = {}
        self._log_suppressed: Counter[str] = Counter()
        self.audited = 0

    def record(self, reason: str, detail: str, remote: str) -> None:
        now = self._clock()
        if now >= self._next_log.get(reason, 0.0):
            self._next_log[reason] = now + self.log_interval
            suppressed = self._log_suppressed.pop(reason, 0)
            suffix = f" ({suppressed} more since the last line)" if suppressed else ""
            logger.warning("dingtalk webhook: refused a callback from {} ({}): {}{}", remote, reason, detail, suffix)
        else:
            self._log_suppressed[reason] += 1
        if self._audit is None or reason in _NOT_SECURITY:
            return
        if now >= self._next_audit:
            self._next_audit = now + self.audit_interval
            self._emit("webhook_rejected", actor=f"remote:{remote}", details={"reason": reason, "remote": remote})
        else:
            self._suppressed[reason] += 1
            if len(self._remotes) < _REMOTES_SAMPLE:
                self._remotes.add(remote)

    def flush(self) -> None:
        """Audit one summary of the refusals not audited individually since the last flush."""
        if not self._suppressed or self._audit is None:
            return
        counts, remotes = dict(self._suppressed), sorted(self._remotes)
        self._suppressed.clear()
        self._remotes.clear()
        self._emit(
            "webhook_rejected_summary",
            actor="dingtalk_connector",
            details={"counts": counts, "total": sum(counts.values()), "remotes_sample": remotes,
                     "interval_seconds": self.audit_interval},
        )  # fmt: skip

    def _emit(self, action: str, *, actor: str, details: dict[str, Any]) -> None:
        assert self._audit is not None
        try:
            self._audit("security", action, actor=actor, target=self._target, details=details)
            self.audited += 1
        except Exception as exc:  # auditing must never break the endpoint
            logger.error("dingtalk webhook: could not audit a refused callback: {!r}", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write a summary every ``audit_interval`` seconds while there is something to summarise."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.audit_interval)
                self.flush()
        finally:
            self.flush()  # what was suppressed before stopping is not lost


@dataclass
class _InlineSlot:
    """The HTTP response waiting for a message's answer."""

    answered: trio.Event = field(default_factory=trio.Event)
    body: dict[str, Any] | None = None
    closed: bool = False


class _Refusal(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class WebhookReceiver:
    """The callback endpoint of one connector (every app: the signature tells which one).

    Serves requests only between ``open(intake)`` and ``close()`` (503 ``not_serving`` otherwise).
    The connector calls ``answer_inline`` before sending a reply the usual way, and ``release``
    when it streams an answer (a stream cannot be an inline answer).
    """

    def __init__(
        self,
        *,
        connector_name: str,
        apps: Mapping[str, AppConfig],
        settings: WebhookSettings,
        resolver: IdentityResolver,
        metrics: Metrics,
        dedup_ttl: float = 900.0,
        dedup_max_entries: int = 20_000,
        audit: AuditSink | None = None,
        on_accepted: Callable[[Message], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connector_name = connector_name
        self.apps = dict(apps)
        self.settings = settings
        self.resolver = resolver
        self.metrics = WebhookMetrics(metrics)
        self.on_accepted = on_accepted
        self._clock = clock
        self.replay = ReplayGuard(
            window_seconds=settings.window_seconds, max_entries=settings.replay_cache_max, clock=clock
        )
        self.metrics.replay_entries.set_function(self.replay.__len__)
        self.dedup = {name: DedupCache(ttl=dedup_ttl, max_entries=dedup_max_entries) for name in self.apps}
        self.reporter = RejectionReporter(
            audit, target=settings.path, audit_interval=settings.audit_interval, log_interval=settings.log_interval
        )
        self._intake: Intake | None = None
        self._slots: dict[str, _InlineSlot] = {}
        self._accepting: set[str] = set()  # msgIds being offered right now (waiting for room)
        self._outcomes: Counter[str] = Counter()

    # -- lifecycle (driven by the connector) ---------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._intake is not None

    def open(self, intake: Intake) -> None:
        """Start handing callbacks to ``intake``."""
        self._intake = intake

    def close(self) -> None:
        """Stop taking callbacks (503 from now on); waiting responses answer empty at once."""
        self._intake = None
        for slot in self._slots.values():
            slot.answered.set()

    # -- replies (called by the connector) ------------------------------------------------------------

    def waiting(self, message: Message) -> bool:
        """Whether the HTTP request that brought ``message`` still waits for its answer."""
        slot = self._slots.get(message.context.get(_INLINE_KEY, ""))
        return slot is not None and not slot.closed and not slot.answered.is_set()

    def answer_inline(self, message: Message, body: dict[str, Any]) -> bool:
        """Put ``body`` (a session-webhook message body) in the waiting HTTP response.

        ``False`` when the response is gone (timed out, answered, or released): send it the usual way.
        """
        if not self.waiting(message):
            return False
        slot = self._slots[message.context[_INLINE_KEY]]
        slot.body = body
        slot.answered.set()
        return True

    def release(self, message: Message) -> None:
        """Answer the waiting HTTP response of ``message`` with ``empty`` now (the reply goes another way)."""
        slot = self._slots.get(message.context.get(_INLINE_KEY, ""))
        if slot is not None:
            slot.answered.set()

    # -- the endpoint --------------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        """The Starlette endpoint: verify, deduplicate, convert, hand to the host, answer."""
        remote = request.client.host if request.client else "unknown"
        try:
            return await self._handle(request)
        except _Refusal as refusal:
            return self._refuse(refusal.reason, refusal.detail, remote)
        except ClientDisconnect:
            return self._refuse("bad_json", "the client went away while sending the body", remote)
        except Exception as exc:
            # A bug (ours, or a custom identity resolver's): say so plainly, never a traceback.
            logger.opt(exception=exc).error("dingtalk webhook: handling a callback failed: {!r}", exc)
            return self._refuse("internal_error", "the connector failed to handle this callback", remote)

    async def _handle(self, request: Request) -> Response:
        timestamp, sign = request.headers.get("timestamp"), request.headers.get("sign")
        secrets_by_app = {name: app.client_secret.reveal() for name, app in self.apps.items()}
        try:
            app_name, ts = match_signature(
                timestamp, sign, secrets_by_app, window_seconds=self.settings.window_seconds, now=self._clock
            )
        except SignatureError as exc:
            raise _Refusal(exc.reason, exc.detail) from None
        assert sign is not None  # match_signature refuses a missing one
        body = await self._read_body(request)
        verdict = self.replay.check(app_name, ts, sign, body)
        if verdict == "replay":
            raise _Refusal("replay", "this exact callback was already received (same signature and body)")
        if verdict == "reused":
            raise _Refusal("signature_reused", "this signature was already used with another body")
        if verdict == "full":
            raise _Refusal("replay_cache_full", f"{self.replay.max_entries} signatures remembered; try again later")
        try:
            return await self._accept(app_name, body)
        except _Refusal as refusal:
            if refusal.reason in ("busy", "not_serving"):
                # Not processed: a retry of this very request is not a replay.
                self.replay.forget(app_name, ts, sign)
            raise

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _Refusal("too_large", f"body of {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refusal("too_large", f"body larger than the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _accept(self, app_name: str, body: bytes) -> Response:
        app = self.apps[app_name]
        try:
            data = msgspec.json.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise _Refusal("bad_json", f"the body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise _Refusal("not_object", f"the body is a JSON {type(data).__name__}, not an object")
        msgtype = msgtype_label(data.get("msgtype"))
        robot_code = data.get("robotCode")
        if robot_code is not None and robot_code != app.robot_code:
            self._count_message(app_name, msgtype, "refused")
            raise _Refusal("robot_mismatch", f"robotCode is not the robot of app {app_name!r}")
        msg_id = data.get("msgId")
        if isinstance(msg_id, str) and msg_id in self._accepting:
            # A redelivery while the first copy still waits for room: let DingTalk retry it later.
            raise _Refusal("busy", "the same message is being accepted right now")
        if isinstance(msg_id, str) and self.dedup[app_name].seen("msg", msg_id):
            self._count_message(app_name, msgtype, "duplicate")
            self._count("duplicate")
            logger.info("dingtalk webhook: redelivery of {} acknowledged, not processed again", msg_id)
            return JSONResponse(EMPTY_ANSWER)
        try:
            message = convert_bot_message(
                data, connector=self.connector_name, app=app_name, resolver=self.resolver,
                frame_message_id="http-callback",
            )  # fmt: skip
        except PayloadError as exc:
            self._count_message(app_name, msgtype, "bad")
            raise _Refusal("bad_payload", exc.detail) from None
        message.context["inbound"] = "http_callback"
        if msgtype in ("other", "unknownMsgType") or not message.parts:
            logger.warning(
                "dingtalk webhook: message {} of msgtype {!r} has no content we can convert; passing it on raw",
                message.id, data.get("msgtype"),
            )  # fmt: skip
        slot: _InlineSlot | None = None
        if self.settings.inline_reply_timeout > 0:
            token = secrets.token_hex(8)
            slot = self._slots[token] = _InlineSlot()
            message.context[_INLINE_KEY] = token
        self._accepting.add(message.id)
        try:
            try:
                await self._offer(message, app_name, msgtype)
            finally:
                self._accepting.discard(message.id)
            self.dedup[app_name].add("msg", message.id)
            self._count_message(app_name, msgtype, "accepted")
            self._count("accepted")
            if self.on_accepted is not None:
                self.on_accepted(message)
            if slot is not None:
                with trio.move_on_after(self.settings.inline_reply_timeout):
                    await slot.answered.wait()
        finally:
            if slot is not None:
                slot.closed = True
                self._slots.pop(message.context.get(_INLINE_KEY, ""), None)
        if slot is not None and slot.body is not None:
            self.metrics.answers.labels("inline").inc()
            return JSONResponse(slot.body)
        self.metrics.answers.labels("empty").inc()
        return JSONResponse(EMPTY_ANSWER)

    async def _offer(self, message: Message, app_name: str, msgtype: str) -> None:
        """Hand ``message`` to the host, waiting up to ``busy_wait`` for room; ``_Refusal`` if not."""
        with trio.move_on_after(self.settings.busy_wait):
            while True:
                intake = self._intake
                if intake is None or intake.closed:
                    break
                if intake.offer(message):
                    return
                await intake.wait_for_room()
                await trio.lowlevel.checkpoint()
        self._count_message(app_name, msgtype, "deferred")
        if self._intake is None or self._intake.closed:
            raise _Refusal("not_serving", "the connector is not taking messages (starting or stopping)")
        raise _Refusal("busy", f"the host's queue stayed full for {self.settings.busy_wait} s")

    # -- bookkeeping ---------------------------------------------------------------------------------

    def _count(self, outcome: str) -> None:
        self._outcomes[outcome] += 1
        self.metrics.requests.labels(outcome).inc()

    def _count_message(self, app: str, msgtype: str, outcome: str) -> None:
        self.metrics.messages.labels(app, msgtype, outcome).inc()

    def _refuse(self, reason: str, detail: str, remote: str) -> Response:
        self._count(reason)
        self.reporter.record(reason, detail, remote)
        status = REJECTION_STATUS[reason]
        headers = {"Retry-After": "1"} if status == 503 else None
        return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)

    def statistics(self) -> dict[str, Any]:
        """Outcome counts, waiting responses and replay memory, for introspection and tests."""
        return {
            "outcomes": dict(self._outcomes),
            "waiting": len(self._slots),
            "replay": self.replay.statistics(),
            "open": self.is_open,
            "audited": self.reporter.audited,
        }
