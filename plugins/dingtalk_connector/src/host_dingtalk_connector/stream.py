"""The Stream connection engine of one app: register, connect, keep alive, reconnect, hand over.

::

    AppStream.run (the only task that opens connections: never two attempts at once)
      loop:
        wait backoff delay (0 the first time and after a planned hand-over)
        POST {openapi}/v1.0/gateway/connections/open   -> endpoint + one-time ticket (httpx, TLS 1.2+)
        open WebSocket endpoint?ticket=...             (trio-websocket)
        wait until that connection *retires*:
          - it closed or was found dead                -> backoff (reset if it had been healthy)
          - SYSTEM disconnect / app-level silence      -> replace it at once, while it keeps
                                                          reading until the gateway closes it
                                                          (make before break, nothing lost)

    _Connection.run (one per WebSocket, in AppStream's nursery)
      reader     : get_message -> FrameRouter.handle (never waits on plugins nor on the network:
                   ACKs are queued for the ACK writer, which sends those queued together in one
                   write, see acks.py)
      keepalive  : WebSocket ping every ping_interval; no pong within pong_timeout -> dead
      watchdog   : nothing at all received for idle_timeout -> dead;
                   no application frame for app_idle_timeout -> retire (hand over)
      work       : the ACK writer; on close, EVENT / card-callback handlers started from this
                   connection get shutdown_timeout to finish and ACK on it

    Event / card-callback handlers run in the app's handler nursery (bounded by the router), not in
    the connection's: a dropped socket must not cancel them half way (a card click is ACKed on
    acceptance and never redelivered; an EVENT would run again from the start). One that outlives
    its connection finishes, its outcome is remembered, and DingTalk's redelivery is answered from
    it. Only stopping the app cancels them, after shutdown_timeout (reload_handler_timeout when the
    plugin is hot-reloaded: the new connector already serves, and a cancelled EVENT would run again).

A "dead" connection is retired first (so the replacement starts immediately) and then closed.
"""

from __future__ import annotations

import itertools
import math
import ssl
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from host.logs import logger
from host.tls import client_context
from host_dingtalk_connector.acks import AckStats, AckWriter, HoldableStream
from host_dingtalk_connector.backoff import Backoff
from host_dingtalk_connector.errors import ConnectError, HandshakeFailed, RegistrationError
from host_dingtalk_connector.metrics import CONNECTION_STATES

if TYPE_CHECKING:
    from host_dingtalk_connector.config import AppConfig, StreamSettings
    from host_dingtalk_connector.metrics import ConnectorMetrics
    from host_dingtalk_connector.router import FrameRouter

__all__ = ["REGISTER_PATH", "AppStream", "make_ssl_context"]

REGISTER_PATH = "/v1.0/gateway/connections/open"
#: Seconds allowed for the WebSocket close handshake before the socket is just closed.
_CLOSE_TIMEOUT = 3.0
#: Reasons after which the replacement is opened at once (a planned hand-over, not a failure).
_PLANNED = frozenset({"disconnect", "app_idle"})


def make_ssl_context() -> ssl.SSLContext:
    """Client TLS context: the host's TLS policy (``host.tls``: system CAs plus ``[tls] ca_file``,
    hostname check, TLS 1.2 minimum, forward-secret AEAD ciphers)."""
    return client_context()


def _first_error(exc: BaseException) -> BaseException | None:
    """The first exception in ``exc`` (flattening groups) that is not a cancellation."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_error(inner)
            if found is not None:
                return found
        return None
    return None if isinstance(exc, trio.Cancelled) else exc


def _describe_handshake_error(error: BaseException) -> str:
    if isinstance(error, ConnectionRejected):
        return f"WebSocket upgrade rejected with HTTP {error.status_code}"
    if isinstance(error, OSError):
        return f"WebSocket connection failed: {error.strerror or type(error).__name__}"
    return f"WebSocket handshake failed: {type(error).__name__}"


def _describe_close(exc: ConnectionClosed) -> str:
    reason = exc.reason
    code = getattr(reason, "code", None)
    if code in (1000, 1001):
        return "closed"
    return "dropped"


class _Connection:
    """One WebSocket connection to the gateway (implements the router's ``Link``)."""

    def __init__(self, stream: AppStream, number: int) -> None:
        self.stream = stream
        self.number = number
        self.label = f"{stream.app.name}#{number}"
        self.retired = trio.Event()
        self.retire_reason = ""
        self.closed = trio.Event()
        self.draining = False
        self.opened_at = 0.0
        self.last_inbound = 0.0
        self.last_app_frame = 0.0
        self.frames_in = 0
        self._ws: WebSocketConnection | None = None
        self._acks: AckWriter | None = None
        self._io_scope: trio.CancelScope | None = None
        self._work: trio.Nursery | None = None
        self._tasks = 0
        self._tasks_done = trio.Event()
        self._tasks_done.set()
        self._stop_reading = False

    # -- Link protocol ---------------------------------------------------------------------------

    async def send(self, text: str) -> bool:
        """Queue one ACK for the ACK writer (``False`` once the connection is closed)."""
        acks = self._acks
        if acks is None:
            return False
        return await acks.put(text)

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        stream = self.stream
        handlers = stream.handlers
        assert handlers is not None
        self._tasks += 1
        if self._tasks_done.is_set():
            self._tasks_done = trio.Event()
        stream.handlers_running += 1
        if stream.handlers_idle.is_set():
            stream.handlers_idle = trio.Event()

        async def tracked() -> None:
            try:
                await fn()
            except Exception as exc:  # never let a handler take the connection down
                logger.opt(exception=exc).error("{}: event task failed: {!r}", self.label, exc)
            finally:
                self._tasks -= 1
                if self._tasks == 0:
                    self._tasks_done.set()
                stream.handlers_running -= 1
                if stream.handlers_running == 0:
                    stream.handlers_idle.set()

        # The app's nursery, not this connection's: see the module doc.
        handlers.start_soon(tracked)

    def on_disconnect(self, reason: str) -> None:
        if self.draining:
            return
        self.draining = True
        self.retire("disconnect")
        if self._work is not None:
            self._work.start_soon(self._drain_deadline)

    # -- lifecycle -------------------------------------------------------------------------------

    def retire(self, reason: str) -> None:
        """Tell the engine to open a replacement (idempotent; the first reason wins)."""
        if not self.retired.is_set():
            self.retire_reason = reason
            self.retired.set()

    def kill(self, reason: str) -> None:
        """This connection is dead or must go: retire it, stop reading, close it."""
        self.retire(reason)
        if self._io_scope is not None:
            self._io_scope.cancel()

    def stop_reading(self) -> None:
        """Graceful stop: read no more frames (un-ACKed ones are redelivered), then close."""
        self._stop_reading = True
        if self._io_scope is not None:
            self._io_scope.cancel()

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.stream.settings.drain_timeout)
        if not self.closed.is_set():
            logger.info("{}: drain deadline passed after disconnect; closing it", self.label)
            self.stop_reading()

    async def run(self, url: str, *, task_status: trio.TaskStatus[_Connection]) -> None:
        """Open the WebSocket, report started, serve until closed. Raises only before started."""
        started = False
        reason = "closed"
        try:
            # We own the TCP/TLS stream (rather than open_websocket_url) so that it is always
            # closed: trio-websocket leaves it open when the server starts the close handshake.
            async with trio.open_nursery() as ws_nursery:
                stream, ws = await self._open(ws_nursery, url)
                try:
                    self._ws = ws
                    self.opened_at = self.last_inbound = self.last_app_frame = trio.current_time()
                    started = True
                    task_status.started(self)
                    reason = await self._serve(ws, stream)
                    with trio.move_on_after(_CLOSE_TIMEOUT):
                        await ws.aclose()  # our close handshake (a no-op if the gateway closed first)
                finally:
                    self._ws = None
                    await trio.aclose_forcefully(stream)
                ws_nursery.cancel_scope.cancel()
        except BaseException as exc:
            error = _first_error(exc)
            if error is None or not isinstance(error, Exception):
                raise  # cancellation, KeyboardInterrupt...
            if not started:
                if isinstance(error, HandshakeFailed):
                    raise error from None
                raise HandshakeFailed(_describe_handshake_error(error)) from None
            if isinstance(error, ConnectionClosed | OSError | trio.BrokenResourceError | trio.ClosedResourceError):
                reason = "dropped"
            else:
                logger.opt(exception=error).error("{}: connection failed: {!r}", self.label, error)
                reason = "error"
        finally:
            self.retire(reason)
            self.closed.set()

    async def _open(self, nursery: trio.Nursery, url: str) -> tuple[HoldableStream, WebSocketConnection]:
        """TCP (+TLS) connect and WebSocket handshake, within ``connect_timeout``."""
        settings = self.stream.settings
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme == "wss"
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = host if port == (443 if secure else 80) else f"{host}:{port}"
        try:
            with trio.fail_after(settings.connect_timeout):
                transport: trio.abc.Stream
                if secure:
                    tls = await trio.open_ssl_over_tcp_stream(
                        host, port, ssl_context=self.stream.ssl_context, https_compatible=True
                    )
                    try:
                        # Handshake now: a certificate or protocol-version failure then surfaces
                        # at once (inside trio-websocket it would only end in a timeout).
                        await tls.do_handshake()
                    except trio.BrokenResourceError as exc:
                        await trio.aclose_forcefully(tls)
                        raise HandshakeFailed(f"TLS handshake with {host}:{port} failed: {exc.__cause__ or exc}") from None
                    transport = tls
                else:
                    transport = await trio.open_tcp_stream(host, port)
                stream = HoldableStream(transport)  # lets the ACK writer send a batch in one write
                try:
                    ws = await wrap_client_stream(
                        nursery,
                        # Documented as "an arbitrary stream" (trio.abc.Stream); annotated narrower.
                        stream,  # type: ignore[arg-type]
                        host_header,
                        resource,
                        message_queue_size=settings.receive_queue,
                        max_message_size=settings.transport_max_bytes,
                        # Read up to 64 KiB per syscall: a burst of frames costs fewer wake-ups.
                        receive_buffer_size=65536,
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise HandshakeFailed(f"WebSocket handshake timed out after {settings.connect_timeout}s") from None
        return stream, ws

    async def _serve(self, ws: WebSocketConnection, stream: HoldableStream) -> str:
        settings = self.stream.settings
        reason = "closed"
        async with trio.open_nursery() as work:
            self._work = work
            acks = self._acks = AckWriter(ws, stream, stats=self.stream.ack_stats)
            work.start_soon(acks.run)
            with trio.CancelScope() as io_scope:
                self._io_scope = io_scope
                async with trio.open_nursery() as io:
                    io.start_soon(self._keepalive, ws)
                    io.start_soon(self._watchdog)
                    reason = await self._read(ws)
                    io.cancel_scope.cancel()
            if io_scope.cancelled_caught:
                reason = self.retire_reason or ("stopped" if self._stop_reading else "closed")
            # Let event handlers already running finish (and ACK while the socket is still open).
            with trio.move_on_after(settings.shutdown_timeout):
                await self._tasks_done.wait()
            if self._tasks:
                logger.warning(
                    "{}: {} event handler(s) still running on close; they finish without this connection "
                    "(DingTalk redelivers what they could not ACK, answered from their outcome)",
                    self.label, self._tasks,
                )  # fmt: skip
            # The ACKs of the last frames (and of the handlers that finished); bounded, in case the
            # gateway stopped reading (what is not written is counted lost and redelivered).
            with trio.move_on_after(_CLOSE_TIMEOUT):
                await acks.flush()
            acks.close()
            work.cancel_scope.cancel()
        return reason

    async def _read(self, ws: WebSocketConnection) -> str:
        router = self.stream.router
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                reason = _describe_close(exc)
                logger.info("{}: connection closed by the gateway ({})", self.label, exc.reason)
                return reason
            now = trio.current_time()
            self.last_inbound = self.last_app_frame = now
            self.frames_in += 1
            await router.handle(self, raw, time.perf_counter())

    async def _keepalive(self, ws: WebSocketConnection) -> None:
        settings = self.stream.settings
        while True:
            await trio.sleep(settings.ping_interval)
            with trio.move_on_after(settings.pong_timeout) as scope:
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
            if scope.cancelled_caught:
                logger.warning("{}: no pong within {}s; connection is dead, reconnecting", self.label, settings.pong_timeout)
                self.kill("pong_timeout")
                return
            self.last_inbound = trio.current_time()

    async def _watchdog(self) -> None:
        settings = self.stream.settings
        while True:
            now = trio.current_time()
            idle_deadline = self.last_inbound + settings.idle_timeout
            if now >= idle_deadline:
                logger.warning("{}: nothing received for {}s; connection is dead, reconnecting", self.label, settings.idle_timeout)
                self.kill("idle")
                return
            app_deadline = math.inf
            if settings.app_idle_timeout and not self.retired.is_set():
                app_deadline = self.last_app_frame + settings.app_idle_timeout
                if now >= app_deadline:
                    logger.info(
                        "{}: no application frame for {}s; handing over to a fresh connection",
                        self.label, settings.app_idle_timeout,
                    )  # fmt: skip
                    self.draining = True
                    self.retire("app_idle")
                    if self._work is not None:
                        self._work.start_soon(self._drain_deadline)
                    app_deadline = math.inf
            await trio.sleep_until(min(idle_deadline, app_deadline))


class AppStream:
    """All Stream connections of one app, and the loop that keeps one open."""

    def __init__(
        self,
        app: AppConfig,
        settings: StreamSettings,
        router: FrameRouter,
        metrics: ConnectorMetrics,
        *,
        ssl_context: ssl.SSLContext | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.ssl_context = ssl_context or make_ssl_context()
        self.backoff = Backoff(base=settings.backoff_base, cap=settings.backoff_cap, **({"rng": rng} if rng else {}))
        self.connections: list[_Connection] = []
        self.state = "disconnected"
        self.attempts = 0
        self.reconnects: dict[str, int] = {}
        #: The last reconnect delays as (ceiling, delay) pairs, for introspection.
        self.delays: deque[tuple[float, float]] = deque(maxlen=32)
        #: ACKs written and the writes they took, over every connection of this app.
        self.ack_stats = AckStats()
        self._quick_handovers = 0
        self._attempt_scope = trio.CancelScope()
        #: Where EVENT / card-callback handlers run (open while ``run`` runs; outlives connections).
        self.handlers: trio.Nursery | None = None
        self.handlers_running = 0
        self.handlers_idle = trio.Event()
        self.handlers_idle.set()
        self._numbers = itertools.count(1)
        self._stop = trio.Event()
        self._stop_requested_at = math.inf
        self._handler_grace = settings.shutdown_timeout
        self._connected = trio.Event()
        self._log = logger.bind(app=app.name)
        self._state_gauge = metrics.connection_state.labels(app.name)
        self._open_gauge = metrics.open_connections.labels(app.name)
        self._state_gauge.set(0)
        self._open_gauge.set(0)

    # -- introspection -----------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return any(not c.closed.is_set() for c in self.connections)

    async def wait_connected(self) -> None:
        """Return once a connection is open (at once if one is)."""
        while not self.is_ready():
            await self._connected.wait()

    def statistics(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "open_connections": sum(1 for c in self.connections if not c.closed.is_set()),
            "attempts": self.attempts,
            "reconnects": dict(self.reconnects),
            "backoff_failures": self.backoff.failures,
            "recent_delays": [round(d, 3) for _c, d in self.delays],
            "events_in_flight": self.router.events_in_flight,
            "acks": {"sent": self.ack_stats.sent, "writes": self.ack_stats.writes, "lost": self.ack_stats.lost},
            "dedup": self.router.dedup.statistics(),
        }

    def _set_state(self, state: str) -> None:
        self.state = state
        self._state_gauge.set(CONNECTION_STATES[state])
        if state == "connected":
            self._connected.set()
        elif self._connected.is_set():
            self._connected = trio.Event()

    def request_stop(self, *, handler_grace: float | None = None) -> None:
        """Stop reconnecting and close every connection (``run`` then returns). Event handlers still
        running get ``handler_grace`` seconds (default ``shutdown_timeout``) before they are cancelled."""
        if not self._stop.is_set():
            self._stop_requested_at = trio.current_time()
            self._handler_grace = self.settings.shutdown_timeout if handler_grace is None else handler_grace
        self._stop.set()
        # A registration or handshake in progress is abandoned rather than waited for.
        self._attempt_scope.cancel()

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection open until ``request_stop``; then close every connection gracefully."""
        async with trio.open_nursery() as handlers:
            self.handlers = handlers
            try:
                await self._run(handlers)
            finally:
                self.handlers = None

    async def _run(self, handlers: trio.Nursery) -> None:
        timeout = httpx.Timeout(self.settings.register_timeout)
        async with httpx.AsyncClient(verify=self.ssl_context, timeout=timeout) as http, trio.open_nursery() as nursery:
            delay = 0.0
            while not self._stop.is_set():
                if delay > 0:
                    self._log.info("{}: reconnecting in {:.2f}s", self.app.name, delay)
                    with trio.move_on_after(delay):
                        await self._stop.wait()
                    if self._stop.is_set():
                        break
                if not self.is_ready():
                    self._set_state("connecting")
                self._attempt_scope = trio.CancelScope()
                try:
                    with self._attempt_scope:
                        connection = await self._connect(http, nursery)
                    if self._attempt_scope.cancelled_caught:
                        break
                except ConnectError as exc:
                    reason = "register_failed" if isinstance(exc, RegistrationError) else "handshake_failed"
                    self._count_reconnect(reason)
                    delay = self._next_delay()
                    self._log.warning("{}: could not connect: {}; retry in {:.2f}s", self.app.name, exc, delay)
                    if not self.is_ready():
                        self._set_state("disconnected")
                    continue
                except Exception as exc:
                    # A bug must not leave the app silently disconnected forever: log it loudly and
                    # keep trying, with backoff.
                    self._count_reconnect("error")
                    delay = self._next_delay()
                    self._log.opt(exception=exc).error(
                        "{}: unexpected error while connecting: {!r}; retry in {:.2f}s", self.app.name, exc, delay
                    )
                    if not self.is_ready():
                        self._set_state("disconnected")
                    continue
                await self._wait_retired(connection)
                if self._stop.is_set():
                    break
                reason = connection.retire_reason or "closed"
                self._count_reconnect(reason)
                uptime = trio.current_time() - connection.opened_at
                if uptime >= self.settings.healthy_after:
                    self.backoff.reset()
                # A planned hand-over is replaced at once, unless hand-overs come back to back
                # (a gateway sending disconnect right after every connect): then back off.
                self._quick_handovers = self._quick_handovers + 1 if uptime < self.settings.backoff_base else 0
                if reason in _PLANNED and self._quick_handovers <= 1:
                    delay = 0.0
                else:
                    delay = self._next_delay()
                if not self.is_ready():
                    self._set_state("disconnected")
            await self._close_all()
        self._set_state("disconnected")
        # Handlers still running get their grace (shutdown_timeout; reload_handler_timeout when the
        # plugin is being reloaded) from the stop request, then are cancelled.
        with trio.move_on_at(min(self._stop_requested_at, trio.current_time()) + self._handler_grace):
            await self.handlers_idle.wait()
        if self.handlers_running:
            self._log.warning("{}: {} event handler(s) cancelled at stop; DingTalk will redeliver",
                              self.app.name, self.handlers_running)
        handlers.cancel_scope.cancel()

    def _next_delay(self) -> float:
        ceiling = self.backoff.ceiling()
        delay = self.backoff.next_delay()
        self.delays.append((ceiling, delay))
        return delay

    def _count_reconnect(self, reason: str) -> None:
        self.reconnects[reason] = self.reconnects.get(reason, 0) + 1
        self.metrics.reconnects.labels(self.app.name, reason).inc()

    async def _wait_retired(self, connection: _Connection) -> None:
        async with trio.open_nursery() as nursery:

            async def wait(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, connection.retired)
            nursery.start_soon(wait, self._stop)

    async def _close_all(self) -> None:
        for connection in list(self.connections):
            connection.stop_reading()
        for connection in list(self.connections):
            await connection.closed.wait()

    async def _connect(self, http: httpx.AsyncClient, nursery: trio.Nursery) -> _Connection:
        self.attempts += 1
        endpoint, ticket = await self._register(http)
        url = f"{endpoint}?ticket={urllib.parse.quote_plus(ticket)}"
        connection = _Connection(self, next(self._numbers))
        await nursery.start(self._run_connection, connection, url)
        self._set_state("connected")
        self._log.info("{}: connected to {}", connection.label, endpoint)
        return connection

    async def _run_connection(self, connection: _Connection, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        class _Started:
            def started(self, value: Any = None) -> None:
                task_status.started()

        self.connections.append(connection)
        self._open_gauge.set(sum(1 for c in self.connections if not c.closed.is_set()))
        try:
            await connection.run(url, task_status=_Started())
        finally:
            self.connections.remove(connection)
            self._open_gauge.set(sum(1 for c in self.connections if not c.closed.is_set()))
            if not self.is_ready():
                self._set_state("disconnected")

    async def _register(self, http: httpx.AsyncClient) -> tuple[str, str]:
        settings = self.settings
        subscriptions = [{"type": "CALLBACK", "topic": topic} for topic in settings.topics]
        if settings.events:
            subscriptions.insert(0, {"type": "EVENT", "topic": "*"})
        body = {
            "clientId": self.app.client_id,
            "clientSecret": self.app.client_secret.reveal(),
            "subscriptions": subscriptions,
            "ua": settings.user_agent,
            "localIp": "",
        }
        url = self.app.openapi_endpoint + REGISTER_PATH
        try:
            response = await http.post(url, json=body, headers={"Accept": "application/json"})
        except httpx.TimeoutException:
            self.metrics.registrations.labels(self.app.name, "error").inc()
            raise RegistrationError(f"registration timed out after {settings.register_timeout}s") from None
        except httpx.HTTPError as exc:
            self.metrics.registrations.labels(self.app.name, "error").inc()
            raise RegistrationError(f"registration failed: {type(exc).__name__}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 200:
            code = payload.get("code") if isinstance(payload, dict) else None
            text = payload.get("message") if isinstance(payload, dict) else None
            self.metrics.registrations.labels(self.app.name, "refused").inc()
            hint = " (check client_id / client_secret)" if response.status_code in (401, 403) else ""
            raise RegistrationError(
                f"registration refused: HTTP {response.status_code} {code or ''} {text or ''}".rstrip() + hint,
                status=response.status_code,
                code=code if isinstance(code, str) else None,
            )
        if not isinstance(payload, dict) or not payload.get("endpoint") or not payload.get("ticket"):
            self.metrics.registrations.labels(self.app.name, "error").inc()
            raise RegistrationError("registration answer lacks endpoint or ticket", status=200)
        endpoint, ticket = str(payload["endpoint"]), str(payload["ticket"])
        if not endpoint.startswith(("ws://", "wss://")):
            self.metrics.registrations.labels(self.app.name, "error").inc()
            raise RegistrationError(f"registration returned a non-WebSocket endpoint {endpoint!r}", status=200)
        self.metrics.registrations.labels(self.app.name, "ok").inc()
        return endpoint, ticket
