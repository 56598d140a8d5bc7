"""The bridge: from a chat message to an answer, through the gates, the cache and the backends.

``Bridge.handle(message)`` is what ``on_message`` returns. For one message::

    no text ─────────────────────────────▶ "I can only read text" (configurable, or nothing)
    /reset ──────────────────────────────▶ memory forgotten, confirmation
    route (command / conversation / default) and per-user rate limit ──▶ "please wait N s"
    admit (bounded queue) ───────────────▶ "busy, please retry" at once when full
    wait for the conversation's turn ────▶ merged into the next turn (merge policy): no reply
    build the request (system prompt + memory + message)
    cache hit ───────────────────────────▶ the cached answer
    identical request in flight ─────────▶ follow it (coalescing)
    wait for a call slot (global limit) ─▶ "busy" when the queue timeout passes
    call: route's backend, then the fallbacks; each with retries and its circuit breaker
       └─▶ stream of text: tokens as they come; a break mid-answer ends with the "incomplete" note;
           nothing at all ends with an apology (timeout, unavailable, failure)

When streaming, ``handle`` returns an async iterator and the host's worker drives the call by
iterating it; otherwise ``handle`` awaits the whole answer and returns a ``Reply``. Either way no
exception reaches the host and the user always gets an answer, an honest apology or, for merged
messages, the combined answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

import trio

from host import Message, Reply
from host.logs import logger
from host.metrics import Metrics
from host.model import ReplyResult
from host_nlp_bridge.admission import Admission, Ticket
from host_nlp_bridge.backends import Backend, create_backend
from host_nlp_bridge.breaker import BreakerState, CircuitBreaker
from host_nlp_bridge.cache import ResultCache, cache_key
from host_nlp_bridge.coalesce import Coalescer, Flight, FlightOutcome
from host_nlp_bridge.config import BackendConfig, BridgeSettings
from host_nlp_bridge.errors import BackendError, BackendTimeout, BadResponse, CircuitOpenError
from host_nlp_bridge.memory import ConversationMemory, Thread, estimate_tokens
from host_nlp_bridge.metrics import BridgeMetrics
from host_nlp_bridge.model import ChatMessage, ChatRequest, Usage
from host_nlp_bridge.ratelimit import UserRateLimiter
from host_nlp_bridge.retry import RetryPolicy
from host_nlp_bridge.routing import Route, Router, first_word
from host_nlp_bridge.stream import AnswerStream, collect

__all__ = ["BackendRuntime", "Bridge", "HostLimits"]

RESET_COMMAND = "/reset"
_FLIGHT_OUTCOMES: dict[str, FlightOutcome] = {"success": "success", "incomplete": "incomplete"}


@dataclass(frozen=True, slots=True)
class HostLimits:
    """The host's time limits on this plugin's answers (seconds)."""

    #: ``[host.timeouts] on_message`` for this plugin: bounds producing the result.
    message_timeout: float = 30.0
    #: ``[host] stream_timeout``: bounds a streamed reply.
    stream_timeout: float = 300.0

    def budget(self, streaming: bool) -> float:
        """Time we may use, keeping a margin to answer before the host cuts us off."""
        limit = self.stream_timeout if streaming else self.message_timeout
        return max(0.0, limit - min(2.0, limit * 0.1))


@dataclass(slots=True)
class BackendRuntime:
    """One configured backend with its resilience state."""

    name: str
    backend: Backend
    settings: BackendConfig
    breaker: CircuitBreaker
    policy: RetryPolicy


@dataclass(slots=True)
class _Turn:
    """One answer being produced."""

    ticket: Ticket
    route: Route
    request: ChatRequest
    conversation: str
    thread: Thread | None
    #: The question as remembered (merged messages joined, group members named).
    question: str
    key: str
    #: Seconds to cache the answer, or ``None`` when this request is not cached.
    cache_ttl: float | None
    deadline: float
    parts: list[str] = field(default_factory=list)
    #: success | incomplete | apology
    outcome: str = "pending"


async def _next_item(
    items: AsyncIterator[str | Usage], deadline: float, backend: str, final: bool
) -> str | Usage | None:
    """The next item, ``None`` at the end; ``BackendTimeout`` when ``deadline`` passes first."""
    # The cancel scope covers only this await: trio forbids yielding from inside one.
    with trio.move_on_at(deadline):
        try:
            return await items.__anext__()
        except StopAsyncIteration:
            return None
    raise BackendTimeout(backend, _deadline_detail(final))


def _deadline_detail(final: bool) -> str:
    return "the answer deadline passed" if final else "total_timeout passed"


class Bridge:
    """Answers chat messages through the configured NLP backends (see the module docstring)."""

    def __init__(
        self,
        settings: BridgeSettings,
        metrics: BridgeMetrics | None = None,
        *,
        limits: HostLimits | None = None,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        section = settings.section
        self.section = section
        self.messages = section.messages
        # Without the host's registry (embedding, benchmarks) the metrics go to a private one.
        self.metrics = metrics or BridgeMetrics(Metrics())
        self.limits = limits or HostLimits()
        self._clock = clock
        self._rng = rng or random.Random()
        self.backends: dict[str, BackendRuntime] = {}
        for name, config in settings.backends.items():
            self.backends[name] = BackendRuntime(
                name=name,
                backend=create_backend(name, config),
                settings=config,
                breaker=CircuitBreaker(
                    name,
                    failure_threshold=config.breaker_failures,
                    reset_timeout=config.breaker_reset,
                    clock=clock,
                    on_change=self._breaker_changed,
                ),
                policy=RetryPolicy(
                    max_attempts=config.max_attempts,
                    initial=config.backoff_initial,
                    maximum=config.backoff_max,
                    retry_after_max=config.retry_after_max,
                ),
            )
        self.router = Router(settings)
        memory = section.memory
        self.memory = ConversationMemory(
            max_turns=memory.max_turns,
            max_tokens=memory.max_tokens,
            idle_ttl=memory.idle_ttl,
            max_conversations=memory.max_conversations,
            clock=clock,
        )
        limits_config = section.limits
        self.admission = Admission(
            queue_size=limits_config.queue_size,
            max_concurrency=limits_config.max_concurrency,
            merge=limits_config.while_busy == "merge",
            clock=clock,
            on_dequeue=self._dequeued,
            max_waiting_per_conversation=limits_config.max_waiting_per_conversation,
        )
        self.rate_limiter = UserRateLimiter(
            per_minute=limits_config.user_rate_per_minute, burst=limits_config.user_burst, clock=clock
        )
        self.cache = ResultCache(max_entries=section.cache.max_entries, max_chars=section.cache.max_chars, clock=clock)
        self.flights = Coalescer()
        self.metrics.queue_depth.set_function(lambda: self.admission.waiting)
        self.metrics.in_flight.set_function(lambda: self.admission.in_flight)
        self.metrics.memory_conversations.set_function(lambda: len(self.memory))
        for name in self.backends:
            self.metrics.breaker_changed(name, "closed")

    # -- lifecycle -------------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """One line per backend, for the startup log."""
        return [runtime.backend.describe() for runtime in self.backends.values()]

    async def aclose(self) -> None:
        """Close every backend's connections."""
        for runtime in self.backends.values():
            try:
                await runtime.backend.aclose()
            except Exception as exc:
                logger.warning("nlp_bridge: closing backend {} failed: {!r}", runtime.name, exc)

    def statistics(self) -> dict[str, object]:
        """A snapshot for introspection and tests."""
        return {
            "waiting": self.admission.waiting,
            "in_flight": self.admission.in_flight,
            "conversations_busy": self.admission.lanes,
            "memory_conversations": len(self.memory),
            "cache_entries": len(self.cache),
            "flights": len(self.flights),
            "breakers": {name: r.breaker.state for name, r in self.backends.items()},
        }

    # -- handling a message ----------------------------------------------------------------------

    async def handle(self, message: Message) -> ReplyResult:
        """The answer to ``message``: a ``Reply``, a stream of text, or ``None`` (merged/ignored)."""
        text = message.text
        if not text:
            if not self.messages.non_text:
                return None
            self._count("non_text")
            return self._reply(message, self.messages.non_text)
        conversation = self._conversation_key(message)
        if text.startswith("/") and first_word(text)[0] == RESET_COMMAND:
            self.memory.forget(conversation)
            self._count("reset")
            logger.info("nlp_bridge: conversation memory cleared by /reset")
            return self._reply(message, self.messages.reset)
        route = self.router.route(message.conversation.id, text)
        if not route.text:
            return self._reply(message, self.messages.command_usage.format(command=route.command))

        wait = self.rate_limiter.acquire(self._user_key(message))
        if wait > 0:
            self._reject("rate_limited")
            return self._reply(message, self.messages.rate_limited.format(seconds=math.ceil(wait)))
        ticket = self.admission.admit(conversation, message.created_at_ms, message)
        if isinstance(ticket, str):
            self._reject(ticket)
            logger.warning(
                "nlp_bridge: {} ({} waiting in all); answered busy", ticket.replace("_", " "), self.admission.waiting
            )
            return self._reply(message, self.messages.busy)

        primary = self.backends[route.chain[0]]
        streaming = self.section.stream and primary.backend.can_stream
        now = self._clock()
        deadline = now + min(self.section.answer_timeout, self.limits.budget(streaming))
        # Waiting happens inside on_message, which the host bounds by its on_message timeout.
        queue_deadline = min(now + self.section.limits.queue_timeout, now + self.limits.budget(False), deadline)
        handed_over = False
        leading: Flight | None = None

        def end() -> None:
            # Runs once the answer is over, however it ended (also for a stream the host never read).
            ticket.release()
            if leading is not None and not leading.done:
                leading.finish("incomplete", self.messages.incomplete)
                self.flights.end(leading)

        try:
            turn_result = await ticket.wait_turn(queue_deadline)
            if turn_result == "merged":
                self._count("merged")
                return None
            if turn_result == "timeout":
                return self._busy(message, "queue_timeout")
            turn = self._prepare(ticket, route, message, conversation, streaming, deadline)

            if turn.cache_ttl is not None:
                cached = self.cache.get(turn.key)
                if cached is not None:
                    ticket.leave_queue()
                    self.metrics.cache_hits.inc()
                    self._remember(turn, cached)
                    self._count("cached")
                    return self._reply(message, cached)
                self.metrics.cache_misses.inc()

            coalesce = self.section.cache.coalesce
            flight = self.flights.join(turn.key) if coalesce else None
            if flight is not None:
                ticket.leave_queue()
                self.metrics.coalesced.inc()
                chunks = self._follow(turn, flight)
            else:
                leading = self.flights.lead(turn.key) if coalesce else None
                if not await ticket.acquire_slot(queue_deadline):
                    if leading is not None:
                        leading.finish("failed", self.messages.busy)
                        self.flights.end(leading)
                    return self._busy(message, "queue_timeout")
                ticket.leave_queue()
                chunks = self._lead(turn, leading)

            if streaming:
                handed_over = True
                return AnswerStream(chunks, end)
            answer = await collect(chunks)
            return self._reply(message, answer)
        finally:
            if not handed_over:
                end()

    # -- building the request --------------------------------------------------------------------

    def _prepare(
        self, ticket: Ticket, route: Route, message: Message, conversation: str, streaming: bool, deadline: float
    ) -> _Turn:
        merged: list[Message] = [t.payload for t in ticket.merged]
        texts = [route.text, *(m.text for m in merged)]
        shared_group = message.conversation.type == "group" and self.section.memory.group_scope == "conversation"
        if shared_group:
            # In a shared group memory the model needs to know who said what.
            question = "\n".join(f"{m.sender.name or 'someone'}: {t}" for m, t in zip([message, *merged], texts, strict=True))
        else:
            question = "\n".join(texts)
        thread = None if route.stateless else self.memory.thread(conversation, route.id)
        history = thread.history(self.section.memory.max_tokens) if thread is not None else []
        context: list[ChatMessage] = [ChatMessage("system", route.system_prompt)] if route.system_prompt else []
        context += history
        context.append(ChatMessage("user", question))
        request = ChatRequest(
            messages=tuple(context),
            text="\n".join(texts),
            stream=streaming,
            conversation_id=message.conversation.id,
            user_id=self._user_key(message),
            user_name=message.sender.name,
            request_id=message.request_id,
            history=tuple(history),
        )
        primary = self.backends[route.chain[0]]
        mode = primary.settings.cache
        cacheable = mode == "on" or (mode == "auto" and route.stateless)
        key = cache_key(
            primary.name,
            primary.backend.model,
            {**primary.settings.params, "_extra": list(primary.backend.key_extra(request))},
            context,
        )
        return _Turn(
            ticket=ticket,
            route=route,
            request=request,
            conversation=conversation,
            thread=thread,
            question=question,
            key=key,
            cache_ttl=primary.settings.cache_ttl if cacheable else None,
            deadline=deadline,
        )

    # -- producing the answer --------------------------------------------------------------------

    async def _lead(self, turn: _Turn, flight: Flight | None) -> AsyncGenerator[str, None]:
        """Call the backends and publish every chunk to the followers of ``flight``."""
        completed = False
        try:
            async with aclosing(self._call(turn)) as chunks:
                async for chunk in chunks:
                    if flight is not None:
                        flight.publish(chunk)
                    yield chunk
            completed = True
        finally:
            if flight is not None:
                if completed:
                    flight.finish(_FLIGHT_OUTCOMES.get(turn.outcome, "failed"))
                else:
                    flight.finish("incomplete", self.messages.incomplete)
                self.flights.end(flight)
            if not completed:
                self._count("incomplete")
        if turn.outcome == "success":
            answer = "".join(turn.parts)
            self._remember(turn, answer)
            if turn.cache_ttl is not None:
                self.cache.put(turn.key, answer, turn.cache_ttl)
        self._count({"success": "answered", "incomplete": "incomplete"}.get(turn.outcome, "apology"))

    async def _follow(self, turn: _Turn, flight: Flight) -> AsyncGenerator[str, None]:
        """Replay an identical request's answer as it is produced."""
        parts: list[str] = []
        async with aclosing(flight.follow()) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                parts.append(chunk)
                yield chunk
        if flight.outcome == "success":
            self._remember(turn, "".join(parts))
        self._count("coalesced")

    async def _call(self, turn: _Turn) -> AsyncGenerator[str, None]:
        """The answer's text from the first backend of the route's chain that gives one.

        Sets ``turn.outcome``. Never raises a backend error: a failure before any text ends with an
        apology chunk, a failure after some text with the "incomplete" note.
        """
        last_error: BackendError | None = None
        for name in turn.route.chain:
            runtime = self.backends[name]
            if not runtime.breaker.allow():
                self._call_done(name, "rejected")
                last_error = CircuitOpenError(name, f"circuit open; next probe in {runtime.breaker.retry_in():.0f}s")
                logger.debug("nlp_bridge: {}", last_error)
                continue
            started = self._clock()
            first_text = True
            usage: Usage | None = None
            attempt = 0
            while True:
                attempt += 1
                got_text = False
                error: BackendError | None = None
                now = self._clock()
                attempt_deadline = min(now + runtime.settings.total_timeout, turn.deadline)
                final = attempt_deadline >= turn.deadline
                try:
                    if now >= turn.deadline:
                        raise BackendTimeout(name, "the answer deadline passed")
                    stall = runtime.backend.stall_timeout
                    async with aclosing(runtime.backend.generate(turn.request)) as items:  # type: ignore[type-var]
                        # A backend that never waits (stall timeout 0: echo without delays) needs no
                        # scope even for its first item; any other gets one until it has answered.
                        guarded = stall != 0.0
                        while True:
                            if guarded:
                                item = await _next_item(items, attempt_deadline, name, final)
                            else:
                                # A cancel scope per chunk is the biggest cost of streaming. While the
                                # deadline is further away than the backend's own stall timeout, that
                                # timeout catches a silent stream first, and the clock check below a
                                # talkative one: no scope needed.
                                try:
                                    item = await items.__anext__()
                                except StopAsyncIteration:
                                    item = None
                            if item is None:
                                break
                            now = self._clock()
                            if now >= attempt_deadline:
                                raise BackendTimeout(name, _deadline_detail(final))
                            guarded = stall is None or now + stall >= attempt_deadline
                            if isinstance(item, Usage):
                                usage = item
                                continue
                            if not item:
                                continue
                            if first_text:
                                first_text = False
                                self.metrics.first_token(name, now - started)
                            got_text = True
                            turn.parts.append(item)
                            yield item
                except BackendError as exc:
                    error = exc
                except Exception as exc:
                    # A bug in a backend must not take the answer down with it: log it, fail over.
                    logger.opt(exception=exc).error("nlp_bridge: backend {} raised unexpectedly: {!r}", name, exc)
                    error = BadResponse(name, f"internal error: {exc!r}")
                except BaseException:
                    # Cancelled, or the stream closed by the host: says nothing about the backend.
                    runtime.breaker.release()
                    raise

                if error is None:
                    runtime.breaker.record_success()
                    turn.outcome = "success"
                    self._call_done(name, "success", started)
                    self._count_tokens(name, turn, usage)
                    logger.debug("nlp_bridge: answered by {} in {:.3f}s (attempt {})", name, self._clock() - started, attempt)
                    return
                if error.counts_against_backend:
                    runtime.breaker.record_failure()
                else:
                    runtime.breaker.release()
                if got_text:
                    logger.warning("nlp_bridge: backend {} broke off mid-answer: {}", name, error.detail)
                    turn.outcome = "incomplete"
                    self._call_done(name, "incomplete", started)
                    yield self.messages.incomplete
                    return
                delay = runtime.policy.delay_after(attempt, error, self._rng)
                if delay is not None and (runtime.breaker.state != "closed" or self._clock() + delay >= turn.deadline):
                    delay = None
                if delay is None:
                    logger.warning("nlp_bridge: backend {} failed (attempt {}): {}", name, attempt, error.detail)
                    self._call_done(name, "timeout" if isinstance(error, BackendTimeout) else "error", started)
                    last_error = error
                    break
                logger.info("nlp_bridge: backend {} attempt {} failed ({}); retrying in {:.2f}s", name, attempt, error.detail, delay)
                self.metrics.retry(name, error.kind)
                await trio.sleep(delay)
                if not runtime.breaker.allow():
                    self._call_done(name, "rejected", started)
                    last_error = CircuitOpenError(name, "circuit opened while retrying")
                    break
        turn.outcome = "apology"
        yield self._apology(last_error)

    def _apology(self, error: BackendError | None) -> str:
        if isinstance(error, CircuitOpenError):
            return self.messages.unavailable
        if isinstance(error, BackendTimeout):
            return self.messages.timeout
        return self.messages.failure

    # -- small helpers ---------------------------------------------------------------------------

    def _remember(self, turn: _Turn, answer: str) -> None:
        if turn.thread is not None:
            turn.thread.remember(turn.question, answer)

    def _conversation_key(self, message: Message) -> str:
        conv = message.conversation
        key = f"{message.connector}:{conv.type}:{conv.id}"
        if conv.type == "group" and self.section.memory.group_scope == "user":
            key += f":{self._user_key(message)}"
        return key

    @staticmethod
    def _user_key(message: Message) -> str:
        sender = message.sender
        user = sender.identity or next(iter(sorted(sender.platform_ids.items())), ("", ""))[1]
        return f"{message.platform}:{user or message.conversation.id}"

    def _reply(self, message: Message, text: str) -> Reply:
        reply = Reply.markdown(text) if self.section.reply_format == "markdown" else Reply.text_(text)
        reply.mention_sender = self.section.mention_sender and message.conversation.type == "group"
        return reply

    def _busy(self, message: Message, reason: str) -> Reply:
        self._reject(reason)
        logger.warning("nlp_bridge: message waited past the queue timeout; answered busy")
        return self._reply(message, self.messages.busy)

    def _reject(self, reason: str) -> None:
        self.metrics.reject(reason)
        self._count("rate_limited" if reason == "rate_limited" else "busy")

    def _count(self, outcome: str) -> None:
        self.metrics.answer(outcome)

    def _call_done(self, backend: str, outcome: str, started: float | None = None) -> None:
        self.metrics.call(backend, outcome, None if started is None else self._clock() - started)

    def _count_tokens(self, backend: str, turn: _Turn, usage: Usage | None) -> None:
        if usage is None:
            usage = Usage(
                sum(estimate_tokens(m.content) for m in turn.request.messages), estimate_tokens("".join(turn.parts))
            )
        self.metrics.used_tokens(backend, usage.prompt_tokens, usage.completion_tokens)

    def _dequeued(self, waited: float) -> None:
        self.metrics.queue_wait.observe(waited)

    def _breaker_changed(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        if new == "open":
            logger.warning(
                "nlp_bridge: circuit of backend {} opened after {} failure(s); calls refused for {}s",
                breaker.name,
                breaker.failures,
                breaker.reset_timeout,
            )
        else:
            logger.info("nlp_bridge: circuit of backend {} is now {} (was {})", breaker.name, new, old)
        self.metrics.breaker_changed(breaker.name, new)
