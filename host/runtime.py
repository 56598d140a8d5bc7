"""The running host: intake queue, workers, reply delivery, lifecycle.

::

    connector.serve ──offer()──▶ bounded queue ──▶ N workers ──▶ middleware chain ──▶ on_message
         ▲                        (full: offer                                        │
         └──── deliver / stream ◀── returns False)  ◀── Reply | str | async iterator ─┘

Everything runs inside one trio nursery tree owned by ``Host.run``: no detached tasks. Shutdown
(``request_shutdown``, SIGINT/SIGTERM in the CLI): close intake, stop connectors, let workers drain the
queue until ``[host] shutdown_timeout``, cancel what is left (streamed replies are finalized as
interrupted, never left open), flush the audit queue, run ``on_shutdown``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import trio
import trio.lowlevel

from host import tls
from host.access import AccessControl
from host.admin import AdminApi
from host.config import Config, redact
from host.connector import Connector, ReplyStream
from host.dispatch import Dispatcher, Outcome
from host.http import HttpServer
from host.logs import current_plugin, current_request_id, logger
from host.metrics import HookStatsCollector, Metrics
from host.model import AuditEntry, Conversation, Event, Message, Reply
from host.plugins import PluginManager, PluginRecord, escaped_from_plugin

__all__ = ["Host", "build_host"]

Middleware = Callable[[Message, Callable[[Message], Awaitable[None]]], Awaitable[None]]

_STATE_VALUES = ("loaded", "failed", "disabled", "incompatible")


class Host:
    """The host object every hook receives as ``host``."""

    def __init__(self, config: Config, plugins: PluginManager, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.metrics = metrics or Metrics()
        self.dispatcher = Dispatcher(plugins, config.host)
        #: The HTTP server (/metrics, /healthz, /readyz); plugins add routes to it. Started by ``run``.
        self.http = HttpServer(self, config.section("http"))
        #: The built-in access-control middleware (``[access]``), always the outermost one.
        self.access = AccessControl(self, config.access)
        #: The admin API (``[admin]``), served under ``/admin`` when enabled.
        self.admin = AdminApi(self)
        self.connectors: dict[str, Connector] = {}
        #: connector name -> the plugin that registered it ("" for connectors added directly).
        self.connector_owners: dict[str, str] = {}
        #: config section -> (owning plugin, schema), for configuration reload.
        self.section_schemas: dict[str, tuple[str, Any]] = {}
        self.middleware: list[tuple[str, Middleware]] = []
        self._serving: trio.Nursery | None = None
        self._services: trio.Nursery | None = None
        self._plugin_nurseries: dict[str, trio.Nursery] = {}
        self._plugin_scope_done: dict[str, trio.Event] = {}
        self._connector_done: dict[int, trio.Event] = {}
        settings = config.host
        self._queue_send, self._queue_recv = trio.open_memory_channel[Message](settings.queue_size)
        self._closed = False
        self._room = trio.Event()
        self._room.set()
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._shutdown = trio.Event()
        self._started = False
        self._audit_backlog: list[AuditEntry] = []
        self._audit_wakeup = trio.Event()
        self._audit_ready = trio.Event()
        self._audit_lock = trio.Lock()
        self._audit_holds = 0
        self._chain: Callable[[Message], Awaitable[None]] = self._answer
        self._worker_slots: list[_WorkerSlot] = []
        self._state_versions: dict[str, str] = {}  # plugin -> the version its state series carry
        self._setup_metrics()
        plugins.listeners.append(self._on_plugin_state)
        for record in plugins.records.values():
            self._on_plugin_state(record)
        from host.reload import Reloader  # reload imports runtime types; keep the import cycle lazy

        #: Hot reload of plugins and configuration (``reloader.reload_plugin(name)``).
        self.reloader = Reloader(self)

    # -- metrics -----------------------------------------------------------------------------

    def _setup_metrics(self) -> None:
        m = self.metrics
        self.m_received = m.counter("messages_received_total", "Messages offered by connectors.", ["connector"])
        self.m_rejected = m.counter(
            "intake_rejected_total", "Messages refused because the queue was full or closed.", ["connector", "reason"]
        )
        self.m_handled = m.counter(
            "messages_handled_total",
            "Messages handled, by outcome (answered, apology, fallback, unanswered, abandoned).",
            ["connector", "outcome"],
        )
        self.m_latency = m.histogram(
            "message_latency_seconds", "From receipt to the first reply delivered.", ["connector"]
        )
        self.m_queue_wait = m.histogram("queue_wait_seconds", "Time messages waited for a worker.")
        self.m_delivery_failures = m.counter(
            "delivery_failures_total", "Replies a connector could not deliver.", ["connector"]
        )
        self.m_events = m.counter("events_total", "Events by outcome.", ["connector", "outcome"])
        self.m_service_failures = m.counter(
            "plugin_service_failures_total", "Plugin services (host.start_service) that ended with an error.",
            ["plugin"],
        )
        self.m_plugin_state = m.gauge(
            "plugin_state", "1 for the current state of each plugin.", ["plugin", "version", "state"]
        )
        queue_depth = m.gauge("queue_depth", "Messages waiting for a worker.")
        queue_depth.set_function(lambda: self._queue_send.statistics().current_buffer_used)
        m.gauge("in_flight_messages", "Messages queued or being handled.").set_function(lambda: self._pending)
        m.register_collector(HookStatsCollector(self.dispatcher.statistics()))

    def _on_plugin_state(self, record: PluginRecord) -> None:
        version = record.version or ""
        previous = self._state_versions.get(record.name)
        if previous is not None and previous != version:
            # An upgraded (or rolled back) plugin: its old version must not stay reported "loaded".
            for state in _STATE_VALUES:
                self.m_plugin_state.remove(record.name, previous, state)
        self._state_versions[record.name] = version
        for state in _STATE_VALUES:
            self.m_plugin_state.labels(record.name, version, state).set(1 if state == record.state else 0)
        details: dict[str, Any] = {"version": record.version, "distribution": record.distribution}
        if record.error:
            details["error"] = record.error
        action = {"loaded": "load", "failed": "fail", "disabled": "disable", "incompatible": "refuse"}[
            record.state
        ]
        self.audit_soon("plugin", action, target=record.name, details=details)

    # -- setup -------------------------------------------------------------------------------

    def configure(self) -> None:
        """Validate plugin config sections, collect connectors and middleware.

        Raises ``ConfigError`` for an invalid section (startup must stop); a plugin whose
        registration hook raises is marked failed instead.
        """
        # Security settings first: the admin API takes /admin before any plugin can.
        self.prepare_core_reload(self.config)()
        sections: list[tuple[str, str, Any]] = []

        def register_section(name: str, schema: Any) -> None:
            sections.append((current_plugin.get(), name, schema))

        for outcome in self.dispatcher.call_sync("register_config_sections", register=register_section):
            if outcome.error is not None:
                self.plugins.mark_failed(outcome.plugin, f"register_config_sections raised: {outcome.error!r}")
        for plugin, name, schema in sections:
            self.config.validate_section(name, schema)
            self.section_schemas[name] = (plugin, schema)
        for name in self.config.unknown_sections():
            logger.warning("{}: section [{}] belongs to no loaded plugin; ignored", self.config.source, name)

        def register_connector(connector: Connector) -> None:
            if connector.name in self.connectors:
                raise ValueError(f"connector name {connector.name!r} is already taken")
            self.connectors[connector.name] = connector
            self.connector_owners[connector.name] = current_plugin.get()

        for outcome in self.dispatcher.call_sync("register_connectors", host=self, register=register_connector):
            if outcome.error is not None:
                logger.error("plugin {} could not register its connectors", outcome.plugin)

        middleware: list[tuple[str, Middleware]] = []

        def register_middleware(func: Middleware) -> None:
            middleware.append((current_plugin.get(), func))

        self.dispatcher.call_sync("register_middleware", host=self, register=register_middleware)
        # Access control runs first: a refused message reaches no plugin, not even its middleware.
        self.set_middleware([("", self.access), *middleware])

    def prepare_core_reload(self, config: Config) -> Callable[[], None]:
        """Check the live-applicable core sections of ``config`` (``[tls]``, ``[admin]``, ``[access]``);
        return the function that applies them. ``ConfigError`` when one cannot be used (a missing
        CA bundle or key file): then nothing was changed."""
        ca_file = config.tls.ca_file
        if ca_file:
            tls.client_context(ca_file)  # raises TlsPolicyError naming the file
        admin_auth = AdminApi.prepare(config.admin)
        access = config.access

        def apply() -> None:
            tls.configure(ca_file)
            self.admin.apply(admin_auth)
            self.access.update(access)

        return apply

    def add_connector(self, connector: Connector) -> None:
        """Add a connector directly (tests, embedding). Before ``run`` only."""
        if connector.name in self.connectors:
            raise ValueError(f"connector name {connector.name!r} is already taken")
        self.connectors[connector.name] = connector
        self.connector_owners[connector.name] = ""

    def connectors_of(self, plugin: str) -> list[Connector]:
        return [c for name, c in self.connectors.items() if self.connector_owners.get(name) == plugin]

    async def start_connector(self, connector: Connector, *, owner: str) -> None:
        """Start a connector while running (hot reload). It takes over the name at once."""
        if self._serving is None:
            raise RuntimeError("the host is not running")
        self.connectors[connector.name] = connector
        self.connector_owners[connector.name] = owner
        await self._serving.start(self._serve_connector, connector)

    async def stop_connector(self, connector: Connector, *, deadline_seconds: float = 30.0) -> None:
        """Stop one connector and wait until its ``serve`` returned (bounded).

        Routing by name moves to a successor if one took the name (hot reload).
        """
        done = self._connector_done.get(id(connector))
        await self._stop_connector(connector)
        if done is not None:
            with trio.move_on_after(deadline_seconds) as scope:
                await done.wait()
            if scope.cancelled_caught:
                logger.warning("connector {} did not close within {}s", connector.name, deadline_seconds)
        if self.connectors.get(connector.name) is connector:
            del self.connectors[connector.name]
            self.connector_owners.pop(connector.name, None)

    async def stop_connectors_of(self, plugin: str) -> None:
        for connector in self.connectors_of(plugin):
            await self.stop_connector(connector)

    # -- plugin services ---------------------------------------------------------------------

    async def start_service(self, func: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> Any:
        """Run a background task owned by the calling plugin: ``await nursery.start(func, *args)``.

        ``func`` must accept ``task_status`` (trio's convention) and call ``task_status.started()``
        once ready. The task is cancelled when the plugin is unloaded or reloaded, and when the host
        stops (after ``on_shutdown``), so a plugin can never leave tasks behind. Call it from
        ``on_startup`` or later.

        A service that raises before ``task_status.started()`` makes this call raise. One that raises
        after it ends alone: the error is logged, audited (``plugin`` / ``service_failed``) and counted
        in ``host_plugin_service_failures_total{plugin}``; the plugin's other services and the rest
        of the host go on.
        """
        plugin = current_plugin.get() or "host"
        nursery = await self._plugin_nursery(plugin)
        label = name or getattr(func, "__qualname__", repr(func))
        return await nursery.start(self._run_service, plugin, label, func, args, name=name or label)

    async def _run_service(
        self,
        plugin: str,
        label: str,
        func: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        *,
        task_status: trio.TaskStatus[Any],
    ) -> None:
        started = False

        class _Status:
            def started(self, value: Any = None) -> None:
                nonlocal started
                started = True
                task_status.started(value)

        try:
            await func(*args, task_status=_Status())
        except BaseException as exc:
            # Raised after started: it would fail the plugin's nursery, then the host's (the whole bot).
            if not started or not escaped_from_plugin(exc):
                raise
            self.m_service_failures.labels(plugin).inc()
            logger.opt(exception=exc).error("service {} of plugin {} failed: {!r}", label, plugin, exc)
            self.audit_soon("plugin", "service_failed", target=plugin, details={"service": label, "error": repr(exc)})

    async def _plugin_nursery(self, plugin: str) -> trio.Nursery:
        nursery = self._plugin_nurseries.get(plugin)
        if nursery is not None:
            return nursery
        if self._services is None:
            raise RuntimeError("plugin services can only be started while the host runs")

        done = trio.Event()

        async def scope(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
            try:
                async with trio.open_nursery() as own:
                    task_status.started(own)
                    await trio.sleep_forever()
            finally:
                done.set()

        started: trio.Nursery = await self._services.start(scope)
        self._plugin_nurseries[plugin] = started
        self._plugin_scope_done[plugin] = done
        return started

    async def cancel_services(self, plugin: str) -> None:
        """Cancel every service task of ``plugin`` and wait until they are gone."""
        nursery = self._plugin_nurseries.pop(plugin, None)
        if nursery is not None:
            nursery.cancel_scope.cancel()
            # The scope task exits at its next checkpoint; yield until the nursery has no children.
            while nursery.child_tasks:
                await trio.lowlevel.checkpoint()

    def set_middleware(self, middleware: list[tuple[str, Middleware]]) -> None:
        """(Re)build the middleware chain; the first entry is the outermost."""
        self.middleware = middleware
        chain: Callable[[Message], Awaitable[None]] = self._answer
        for plugin, func in reversed(middleware):
            chain = _bind_middleware(plugin, func, chain)
        self._chain = chain

    # -- the Intake protocol (what connectors call) ------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, message: Message) -> bool:
        if self._closed:
            self.m_rejected.labels(message.connector, "closed").inc()
            return False
        if not message.request_id:
            message.request_id = secrets.token_hex(8)
        try:
            self._queue_send.send_nowait(message)
        except trio.WouldBlock:
            if self._room.is_set():
                self._room = trio.Event()
                logger.warning("intake queue full ({}); connectors told to wait", self.config.host.queue_size)
            self.m_rejected.labels(message.connector, "full").inc()
            return False
        message.context["_queued_at"] = time.perf_counter()
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        self.m_received.labels(message.connector).inc()
        return True

    async def wait_for_room(self) -> None:
        await self._room.wait()

    async def submit_event(self, event: Event) -> bool:
        if not event.request_id:
            event.request_id = secrets.token_hex(8)
        token = current_request_id.set(event.request_id)
        try:
            outcomes = await self.dispatcher.call("on_event", host=self, event=event)
        finally:
            current_request_id.reset(token)
        ok = all(o.ok for o in outcomes)
        self.m_events.labels(event.connector, "consumed" if ok else "failed").inc()
        return ok

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything, serve until ``request_shutdown``, then stop gracefully."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._audit_flusher)
            services = await nursery.start(_open_services_nursery)
            self._services = services
            if self.http.enabled:
                await nursery.start(self.http.run)  # stopped by the cancel at the end of run
            await self._startup()
            self._audit_ready.set()
            async with trio.open_nursery() as workers:
                for _ in range(self.config.host.concurrency):
                    workers.start_soon(self._worker)
                workers.start_soon(self._watchdog)
                async with trio.open_nursery() as serving:
                    self._serving = serving
                    for connector in list(self.connectors.values()):
                        await serving.start(self._serve_connector, connector)
                    await serving.start(self.reloader.run)
                    if not self.connectors:
                        logger.warning("no connector is installed: the host has nothing to serve")
                    self._started = True
                    logger.info(
                        "host started: {} plugin(s) loaded, connectors: {}",
                        len(self.plugins.loaded()),
                        ", ".join(self.connectors) or "none",
                    )
                    task_status.started()
                    await self._shutdown.wait()
                    logger.info("shutting down: intake closed, draining {} message(s)", self._pending)
                    self._closed = True
                    self._room.set()
                    with trio.move_on_after(self.config.host.shutdown_timeout):
                        for connector in list(self.connectors.values()):
                            await self._stop_connector(connector)
                    serving.cancel_scope.cancel()
                self._serving = None
                self._queue_send.close()
                with trio.move_on_after(self.config.host.shutdown_timeout) as drain:
                    await self.wait_idle()
                if drain.cancelled_caught:
                    logger.warning(
                        "shutdown deadline ({}s) passed with {} message(s) unfinished; cancelling them",
                        self.config.host.shutdown_timeout,
                        self._pending,
                    )
                workers.cancel_scope.cancel()
            self._started = False
            await self._flush_audit()
            await self.dispatcher.call("on_shutdown", host=self)
            await self._flush_audit()
            services.cancel_scope.cancel()
            self._services = None
            nursery.cancel_scope.cancel()
        logger.info("host stopped")

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from any task)."""
        self._shutdown.set()

    @property
    def started(self) -> bool:
        return self._started

    def is_ready(self) -> bool:
        """Started, and every connector is connected."""
        return self._started and all(c.is_ready() for c in self.connectors.values())

    async def wait_idle(self) -> None:
        """Return when no message is queued or being handled."""
        while self._pending:
            await self._idle.wait()

    async def _startup(self) -> None:
        for outcome in await self.dispatcher.call("on_startup", host=self):
            if not outcome.ok:
                reason = "timed out" if outcome.timed_out else repr(outcome.error)
                self.plugins.mark_failed(outcome.plugin, f"on_startup failed: {reason}")
        # A plugin failed in on_startup may have registered middleware: rebuild without it.
        live = {r.name for r in self.plugins.loaded()}
        self.set_middleware([(p, f) for p, f in self.middleware if p in live or p == ""])

    async def _serve_connector(self, connector: Connector, *, task_status: trio.TaskStatus[None]) -> None:
        done = self._connector_done[id(connector)] = trio.Event()
        try:
            await self._serve_connector_inner(connector, task_status)
        finally:
            done.set()
            self._connector_done.pop(id(connector), None)

    async def _serve_connector_inner(self, connector: Connector, task_status: trio.TaskStatus[None]) -> None:
        started = False

        class _Status:
            def started(self, value: None = None) -> None:
                nonlocal started
                started = True
                task_status.started()

        try:
            await connector.serve(self, task_status=_Status())
        except BaseException as exc:  # a connector's sys.exit() ends that connector, not the host
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("connector {} failed: {!r}", connector.name, exc)
            self.audit_soon("connector", "fail", target=connector.name, details={"error": repr(exc)})
        if not started:
            task_status.started()

    async def _stop_connector(self, connector: Connector) -> None:
        try:
            await connector.stop()
        except BaseException as exc:
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("connector {} failed to stop: {!r}", connector.name, exc)

    async def _worker(self) -> None:
        slot = _WorkerSlot()
        self._worker_slots.append(slot)
        try:
            while True:
                # The watchdog cancels this scope to end one overdue message; the worker goes on.
                with trio.CancelScope() as slot.scope:
                    async for message in self._queue_recv:
                        if not self._room.is_set():
                            self._room.set()
                        queued_at = message.context.pop("_queued_at", None)
                        if queued_at is not None:
                            self.m_queue_wait.observe(time.perf_counter() - queued_at)
                        slot.message, slot.since = message, trio.current_time()
                        try:
                            await self.handle(message)
                        finally:
                            slot.message = slot.since = None
                            self._pending -= 1
                            if self._pending == 0:
                                self._idle.set()
                    return
        finally:
            self._worker_slots.remove(slot)

    async def _watchdog(self) -> None:
        """Cancel the handling of a message that ran past ``_handling_deadline`` (a middleware or a
        connector that never returns): the sender gets the apology and the worker is freed. A check
        every few seconds rather than a cancel scope per message, which would cost ~15 µs each."""
        while True:
            await trio.sleep(_WATCHDOG_SECONDS)
            limit = self._handling_deadline()
            now = trio.current_time()
            for slot in self._worker_slots:
                if slot.since is not None and slot.message is not None and now - slot.since > limit:
                    slot.message.context["_overdue"] = True
                    slot.since = None
                    assert slot.scope is not None
                    slot.scope.cancel()

    # -- handling ----------------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Run one message through the middleware chain and ``on_message``; never raises."""
        token = current_request_id.set(message.request_id)
        message.context["_outcome"] = "unanswered"
        try:
            await self._chain(message)
        except trio.Cancelled:
            message.context["_outcome"] = "abandoned"
            raise
        except BaseException as exc:  # SystemExit & co from a plugin or middleware: not the host's end
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("message handling failed: {!r}", exc)
            # An answer already delivered (a middleware failed after call_next) gets no apology after it.
            if "_answered_at" not in message.context:
                await self._apologize(message)
        finally:
            if message.context.pop("_overdue", False):  # cancelled by the watchdog (_watchdog)
                logger.error(
                    "handling the message took longer than {:.0f}s (a middleware or connector that never"
                    " returns?); cancelled it", self._handling_deadline(),
                )
                if "_answered_at" not in message.context:
                    with _shielded_for(_APOLOGY_SECONDS):  # the connector may be what hangs
                        await self._apologize(message)
            self.m_handled.labels(message.connector, message.context.pop("_outcome")).inc()
            message.context.pop("_answered_at", None)
            current_request_id.reset(token)

    def _handling_deadline(self) -> float:
        """Seconds one message may take through the whole chain: the longest wait at a reload gate,
        the slowest ``on_message`` timeout, then ``[host] stream_timeout``, plus 5 minutes for the
        rest. Only a middleware (or connector) that never returns reaches it; without a bound, each
        such message would hold a worker forever and ``concurrency`` of them would silence the bot."""
        dispatcher = self.dispatcher
        slowest = max(
            (dispatcher.timeout_for(p, "on_message") for p in dispatcher.implementers("on_message")),
            default=0.0,
        )
        # A call may first wait at a plugin's reload gate.
        return dispatcher.gate_bound() + slowest + self.config.host.stream_timeout + _DELIVERY_SLACK_SECONDS

    async def _answer(self, message: Message) -> None:
        if "_answered_at" in message.context:
            # A middleware called call_next again (a retry done wrong): one message, one answer.
            logger.error(
                "plugin {} called call_next again for a message already answered; not answering twice",
                current_plugin.get(),
            )
            return
        outcomes = await self.dispatcher.call("on_message", host=self, message=message)
        answered = failed = False
        try:
            for outcome in outcomes:
                if not outcome.ok:
                    failed = True
                elif outcome.value is not None:
                    delivered = await self._deliver_result(message, outcome)
                    answered = answered or delivered
        finally:
            for outcome in outcomes:
                if outcome.held:  # a stream never read (cancelled before its turn)
                    outcome.held = False
                    with _shielded_for(1):
                        await _aclose(outcome.value)
                    self.dispatcher.release(outcome.plugin)
        if answered:
            message.context["_outcome"] = "answered"
        elif failed:
            await self._apologize(message)
        elif self.config.host.fallback_reply and await self._deliver(
            message, Reply.text_(self.config.host.fallback_reply)
        ):
            message.context["_outcome"] = "fallback"

    async def _apologize(self, message: Message) -> None:
        message.context["_outcome"] = "apology"
        await self._deliver(message, Reply.text_(self.config.host.apology))

    async def _deliver_result(self, message: Message, outcome: Outcome) -> bool:
        plugin, value = outcome.plugin, outcome.value
        if isinstance(value, str):
            return await self._deliver(message, Reply.text_(value))
        if isinstance(value, Reply):
            return await self._deliver(message, value)
        if isinstance(value, AsyncIterator):
            # The dispatcher holds the plugin (drain) for every stream; _stream releases it.
            outcome.held = False
            return await self._stream(message, plugin, value)
        logger.error(
            "plugin {} returned {} from on_message; expected Reply, str, async iterator or None",
            plugin,
            type(value).__name__,
        )
        await self._apologize(message)
        return True

    def _connector_for(self, message: Message) -> Connector | None:
        connector = self.connectors.get(message.connector)
        if connector is None:
            logger.error("message came from unknown connector {!r}; cannot answer", message.connector)
        return connector

    def _mark_answered(self, message: Message) -> None:
        if "_answered_at" not in message.context:
            message.context["_answered_at"] = True
            latency = max(0.0, time.time() - message.received_at_ms / 1000)
            self.m_latency.labels(message.connector).observe(latency)

    async def _deliver(self, message: Message, reply: Reply) -> bool:
        connector = self._connector_for(message)
        if connector is None:
            return False
        try:
            await connector.deliver(message, reply)
        except BaseException as exc:
            if not escaped_from_plugin(exc):
                raise
            self.m_delivery_failures.labels(message.connector).inc()
            logger.opt(exception=exc).error("delivery through {} failed: {!r}", message.connector, exc)
            return False
        self._mark_answered(message)
        return True

    async def _stream(self, message: Message, plugin: str, chunks: AsyncIterator[str]) -> bool:
        """Read a plugin's stream into the connector; ``plugin`` is held (drain) and released here."""
        try:
            connector = self._connector_for(message)
            if connector is None:
                await _aclose(chunks)
                return False
            try:
                stream = await connector.open_stream(message)
            except BaseException as exc:
                if not escaped_from_plugin(exc):
                    raise
                # No streaming surface: collect the whole answer and send it as one markdown message.
                logger.warning("connector {} cannot stream ({!r}); sending the answer whole", message.connector, exc)
                text, note = await self._collect(plugin, chunks)
                return await self._deliver(message, Reply.markdown(text + note))
            return await self._pump(message, plugin, chunks, stream)
        finally:
            self.dispatcher.release(plugin)

    async def _collect(self, plugin: str, chunks: AsyncIterator[str]) -> tuple[str, str]:
        parts: list[str] = []
        token = current_plugin.set(plugin)
        try:
            with trio.move_on_after(self.config.host.stream_timeout) as scope:
                async for chunk in chunks:
                    parts.append(chunk)
            note = _TIMEOUT_NOTE if scope.cancelled_caught else ""
        except BaseException as exc:  # the plugin's stream raised (even SystemExit): keep what it wrote
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("plugin {} stream broke: {!r}", plugin, exc)
            note = _BROKEN_NOTE
        finally:
            current_plugin.reset(token)
            await _aclose(chunks)
        return "".join(parts), note

    async def _pump(self, message: Message, plugin: str, chunks: AsyncIterator[str], stream: ReplyStream) -> bool:
        """Feed chunks into ``stream``; it is finished or failed exactly once, whatever happens."""
        ended = False
        token = current_plugin.set(plugin)
        try:
            with trio.move_on_after(self.config.host.stream_timeout) as scope:
                first = True
                async for chunk in chunks:
                    if not chunk:
                        continue
                    await stream.append(chunk)
                    if first:
                        first = False
                        self._mark_answered(message)
            if scope.cancelled_caught:
                logger.error("plugin {} stream exceeded stream_timeout; finalizing", plugin)
                await stream.fail(_TIMEOUT_NOTE)
            else:
                await stream.finish()
            ended = True
            self._mark_answered(message)
            return True
        except trio.Cancelled:
            # Cancelled by the watchdog (handling overdue), else by shutdown.
            note = _TIMEOUT_NOTE if message.context.get("_overdue") else _SHUTDOWN_NOTE
            with _shielded_for(5):
                await stream.fail(note)
            ended = True
            raise
        except BaseException as exc:  # the plugin's stream raised (even SystemExit): finalized below
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("stream from plugin {} broke: {!r}", plugin, exc)
            return True
        finally:
            current_plugin.reset(token)
            if not ended:
                with _shielded_for(5):
                    try:
                        await stream.fail(_BROKEN_NOTE)
                    except BaseException as exc:
                        if not escaped_from_plugin(exc):
                            raise
                        self.m_delivery_failures.labels(message.connector).inc()
                        logger.error("could not finalize the streamed reply: {!r}", exc)
            with _shielded_for(1):
                await _aclose(chunks)

    # -- proactive sending and audit ---------------------------------------------------------

    async def send(self, connector: str, target: Conversation, reply: Reply | str, *, app_id: str | None = None) -> None:
        """Send a proactive message through ``connector``; raises ``DeliveryError`` on failure."""
        if isinstance(reply, str):
            reply = Reply.text_(reply)
        await self.connectors[connector].send(target, reply, app_id=app_id)

    def audit_soon(
        self,
        category: str,
        action: str,
        *,
        actor: str = "host",
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Queue an audit entry for ``on_audit`` (usable from sync code; delivered in order)."""
        self._audit_backlog.append(_audit_entry(category, action, actor, target, details))
        self._audit_wakeup.set()

    async def audit(
        self,
        category: str,
        action: str,
        *,
        actor: str = "host",
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record an auditable action and wait until every ``on_audit`` implementation had it.

        The one call a plugin makes to audit its own sensitive operations. Secrets in ``details``
        are redacted first. While hot reload is swapping a plugin, entries stay queued and are
        stored, in order, as soon as the swap is over.
        """
        self._audit_backlog.append(_audit_entry(category, action, actor, target, details))
        # Flush here rather than waking the flusher task: no task switch on the awaited path.
        await self._flush_audit()

    def hold_audit(self) -> None:
        """Keep audit entries queued (e.g. while an audit plugin is being swapped by hot reload)."""
        self._audit_holds += 1

    def release_audit(self) -> None:
        self._audit_holds -= 1
        if self._audit_holds == 0:
            self._audit_wakeup.set()

    async def _flush_audit(self) -> None:
        if self._audit_holds:
            return  # delivered when the hold is released, in order
        # One flusher at a time keeps entries in the order they were emitted.
        async with self._audit_lock:
            while self._audit_backlog:
                entry = self._audit_backlog.pop(0)
                for outcome in await self.dispatcher.call("on_audit", host=self, entry=entry):
                    if not outcome.ok:
                        logger.error(
                            "audit record {}/{} not stored by {}", entry.category, entry.action, outcome.plugin
                        )

    async def _audit_flusher(self) -> None:
        # Entries emitted before startup completed wait until audit plugins have opened their logs.
        await self._audit_ready.wait()
        while True:
            await self._flush_audit()
            await self._audit_wakeup.wait()
            self._audit_wakeup = trio.Event()

    def statistics(self) -> dict[str, Any]:
        """A snapshot for introspection and tests."""
        return {
            "pending": self._pending,
            "queue_depth": self._queue_send.statistics().current_buffer_used,
            "closed": self._closed,
            "connectors": {name: c.is_ready() for name, c in self.connectors.items()},
        }


#: Added to the on_message and stream budgets for middleware (media downloads waiting under load) and
#: a message's deliveries (see ``_handling_deadline``): the watchdog is a last resort, not a timeout.
_DELIVERY_SLACK_SECONDS = 300.0
#: How long the apology after a timed-out message may take (the connector itself may hang).
_APOLOGY_SECONDS = 30.0
#: How often the watchdog looks for messages past their handling deadline.
_WATCHDOG_SECONDS = 5.0


class _WorkerSlot:
    """What one worker is handling (for ``Host._watchdog``): the message, since when, and the scope
    that cancels it."""

    __slots__ = ("message", "scope", "since")

    def __init__(self) -> None:
        self.message: Message | None = None
        self.since: float | None = None
        self.scope: trio.CancelScope | None = None

_TIMEOUT_NOTE = "\n\n(The answer was cut off because it took too long.)"
_BROKEN_NOTE = "\n\n(Sorry, this answer is incomplete: something went wrong while writing it.)"
_SHUTDOWN_NOTE = "\n\n(This answer was interrupted because the bot is restarting. Please ask again.)"


def _audit_entry(
    category: str, action: str, actor: str, target: str | None, details: dict[str, Any] | None
) -> AuditEntry:
    return AuditEntry(
        category=category,
        action=action,
        actor=actor,
        target=target,
        details=redact(details or {}),
        request_id=current_request_id.get() or None,
    )


def _shielded_for(seconds: float) -> trio.CancelScope:
    """A scope shielded from outside cancellation that gives up after ``seconds`` (one scope, not a
    shield plus a ``move_on_after``: this runs for every streamed reply)."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + seconds)


async def _open_services_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def _bind_middleware(
    plugin: str, func: Middleware, call_next: Callable[[Message], Awaitable[None]]
) -> Callable[[Message], Awaitable[None]]:
    async def step(message: Message) -> None:
        token = current_plugin.set(plugin)
        try:
            await func(message, call_next)
        finally:
            current_plugin.reset(token)

    return step


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except BaseException as exc:
            if not escaped_from_plugin(exc):
                raise
            logger.debug("closing a reply stream raised {!r}", exc)


def build_host(
    config: Config,
    *,
    plugins: Iterable[tuple[str, Any]] = (),
    entry_points: bool = True,
    metrics: Metrics | None = None,
) -> Host:
    """Load plugins (installed ones unless ``entry_points=False``, plus ``plugins``) and configure.

    Raises ``ConfigError`` when a plugin's configuration section is invalid.
    """
    manager = PluginManager(allow=config.plugins.allow, deny=config.plugins.deny)
    host = Host(config, manager, metrics=metrics)
    if entry_points:
        manager.load_entry_points()
    dropins = config.host.reload.plugins_dir
    if dropins:
        _load_dropins(manager, dropins)
    for name, obj in plugins:
        record = manager.load(name, _constant(obj), module=getattr(obj, "__name__", None))
        if record.state == "loaded" and record.version is None:
            record.version = getattr(obj, "__version__", None)
    host.configure()
    return host


def _load_dropins(manager: PluginManager, directory: str) -> None:
    """Load ``name.py`` / ``name/__init__.py`` plugins from the drop-in directory."""
    import functools
    import importlib
    import sys
    from pathlib import Path

    root = Path(directory).resolve()
    if not root.is_dir():
        logger.warning("[host.reload] plugins_dir {} does not exist; no drop-in plugins loaded", root)
        return
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.suffix == ".py" or (entry / "__init__.py").exists():
            name = entry.name.removesuffix(".py")
            manager.load(name, functools.partial(importlib.import_module, name), module=name, source="dropin")


def _constant(obj: Any) -> Callable[[], Any]:
    return lambda: obj
