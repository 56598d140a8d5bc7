"""The host's HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, and routes added by plugins.

A Starlette app served by hypercorn on trio, started by ``Host.run`` inside its nursery before the
plugins start (so ``/healthz`` answers and ``/readyz`` says "starting" during startup) and stopped
when the host stops. Configured by the ``[http]`` section (``addr``, ``enabled``) or ``HOST_HTTP_ADDR``;
with ``tls_cert``/``tls_key`` it serves HTTPS only, under the host's TLS policy (``host.tls``: TLS 1.2+,
forward-secret AEAD ciphers, no compression).

============  ==============================================================================
``/metrics``  Prometheus text exposition of ``host.metrics`` (every host and plugin metric).
``/healthz``  200 while the process serves requests (liveness).
``/readyz``   200 when ``host.is_ready()`` (started, plugins started, every connector ready) and
              not shutting down; otherwise 503. Both carry a JSON body saying what is not ready.
============  ==============================================================================

Plugins add routes on the same server through ``host.http`` (created before ``register_connectors``
runs, so a webhook connector can add its callback path there)::

    async def callback(request: starlette.requests.Request) -> starlette.responses.Response: ...
    host.http.add_route("/dingtalk/callback", callback, methods=["POST"])

Each route remembers the plugin that added it (``remove_routes(plugin)`` drops them on unload), and an
exception escaping a plugin's coroutine endpoint is logged and answered with a plain 500, never a
traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp

from host.errors import HostError
from host.logs import current_plugin, logger
from host.plugins import escaped_from_plugin
from host.tls import TLS12_CIPHERS, TlsPolicyError, server_context

if TYPE_CHECKING:
    from host.config import HttpSection
    from host.runtime import Host

__all__ = ["BUILTIN_PATHS", "HttpServer", "HttpServerError", "RouteInfo"]

#: Paths the host serves itself; plugins cannot take them.
BUILTIN_PATHS = ("/metrics", "/healthz", "/readyz")


class HttpServerError(HostError):
    """The HTTP server could not start (address in use, unresolvable, not permitted...)."""


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One route on the server: its path, what it is, and who added it (``host`` or a plugin)."""

    path: str
    kind: Literal["http", "websocket", "mount"]
    owner: str
    methods: tuple[str, ...] = ()


class HttpServer:
    """The host's HTTP server. One per ``Host``, available as ``host.http``.

    Routes may be added or removed at any time, before or while serving: the router is consulted
    on every request.
    """

    def __init__(self, host: Host, settings: HttpSection) -> None:
        self._host = host
        self.settings = settings
        self._url: str | None = None
        self._live_ssl: ssl.SSLContext | None = None
        self._listening = trio.Event()
        # Each Starlette route with what we know about it (Starlette routes are not hashable).
        self._entries: list[tuple[BaseRoute, RouteInfo]] = []
        self._started_at = time.monotonic()
        self.app = Starlette(
            routes=[
                Route("/metrics", self._metrics, methods=["GET"], name="metrics"),
                Route("/healthz", self._healthz, methods=["GET"], name="healthz"),
                Route("/readyz", self._readyz, methods=["GET"], name="readyz"),
            ]
        )
        for route in self.app.router.routes:
            assert isinstance(route, Route)
            self._entries.append((route, RouteInfo(route.path, "http", "host", tuple(sorted(route.methods or ())))))

    # -- configuration and state -------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """``[http] enabled``: whether ``Host.run`` starts the server."""
        return self.settings.enabled

    @property
    def url(self) -> str:
        """The base URL the server listens on, e.g. ``http://127.0.0.1:9464`` (the real port when
        ``addr`` asked for port 0). ``RuntimeError`` when the server is not listening."""
        if self._url is None:
            reason = "disabled ([http] enabled = false)" if not self.enabled else "not started"
            raise RuntimeError(f"the HTTP server is not listening: {reason}")
        return self._url

    @property
    def listening(self) -> bool:
        return self._url is not None

    async def wait_listening(self) -> None:
        """Return once the server accepts connections."""
        await self._listening.wait()

    # -- routes ------------------------------------------------------------------------------

    def add_route(
        self,
        path: str,
        endpoint: Callable[..., Any],
        *,
        methods: Sequence[str] = ("GET",),
        name: str | None = None,
        owner: str | None = None,
    ) -> RouteInfo:
        """Serve ``endpoint`` (a Starlette endpoint: ``async def f(request) -> Response``) at ``path``.

        ``owner`` defaults to the plugin whose hook is running. ``ValueError`` when the path is not
        absolute or is already served (by the host, another route or a mount above it).
        """
        owner = self._owner(owner)
        _check_path(path)
        if inspect.iscoroutinefunction(endpoint):
            endpoint = _guarded(endpoint, owner, path)
        route = Route(path, endpoint, methods=list(methods), name=name)
        return self._add(route, RouteInfo(path, "http", owner, tuple(sorted(route.methods or ()))))

    def add_websocket_route(
        self,
        path: str,
        endpoint: Callable[..., Any],
        *,
        name: str | None = None,
        owner: str | None = None,
    ) -> RouteInfo:
        """Serve a Starlette WebSocket endpoint (``async def f(websocket)``) at ``path``."""
        owner = self._owner(owner)
        _check_path(path)
        return self._add(WebSocketRoute(path, endpoint, name=name), RouteInfo(path, "websocket", owner))

    def mount(self, path: str, app: ASGIApp, *, name: str | None = None, owner: str | None = None) -> RouteInfo:
        """Serve a whole ASGI app (e.g. an admin API built as its own Starlette app) under ``path``."""
        owner = self._owner(owner)
        _check_path(path)
        if path.rstrip("/") == "":
            raise ValueError("cannot mount at '/': it would shadow /metrics, /healthz and /readyz")
        return self._add(Mount(path.rstrip("/"), app=app, name=name), RouteInfo(path.rstrip("/"), "mount", owner))

    def remove_routes(self, owner: str) -> int:
        """Remove every route ``owner`` added (a plugin being unloaded); returns how many."""
        if owner == "host":
            raise ValueError("the host's own routes cannot be removed")
        kept = [(route, info) for route, info in self._entries if info.owner != owner]
        removed = len(self._entries) - len(kept)
        self._entries = kept
        self.app.router.routes[:] = [route for route, _ in kept]
        return removed

    def routes(self) -> list[RouteInfo]:
        """Every route served, in matching order."""
        return [info for _, info in self._entries]

    def _owner(self, owner: str | None) -> str:
        return owner or current_plugin.get() or "host"

    def _add(self, route: BaseRoute, info: RouteInfo) -> RouteInfo:
        for existing in self.routes():
            if _overlaps(existing, info):
                raise ValueError(
                    f"cannot add {info.kind} route {info.path!r} for {info.owner}: "
                    f"{existing.path!r} is already served by {existing.owner}"
                )
        self.app.router.routes.append(route)
        self._entries.append((route, info))
        logger.debug("HTTP route {} ({}) added by {}", info.path, info.kind, info.owner)
        return info

    # -- serving -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``[http] addr`` and serve until cancelled; ``task_status.started(url)``.

        Raises ``HttpServerError`` naming the address and the reason when it cannot listen.
        """
        import hypercorn.trio

        ssl_context = self._ssl_context()  # before binding: a bad certificate leaves no socket behind
        self._live_ssl = ssl_context
        try:
            # We bind the socket ourselves so that a failure is reported plainly (and the socket
            # closed); hypercorn then serves it through its documented ``fd://`` bind.
            listener = await _bind(*self.settings.host_port())
        except OSError as exc:
            message = (
                f"HTTP server cannot listen on {self.settings.addr!r} ([http] addr or HOST_HTTP_ADDR): "
                f"{exc.strerror or exc}"
            )
            logger.error("{}", message)
            raise HttpServerError(message) from None
        config = _hypercorn_config(ssl_context)
        config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns (and closes) the socket from here
        config.accesslog = None  # scrapes every few seconds would flood the log
        # A Logger instance is used as is; hypercorn would otherwise install its own stderr handler.
        config.errorlog = logging.getLogger("hypercorn.error")
        config.include_server_header = False
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    # Starlette is an ASGI app; hypercorn's ASGI type is stricter than Starlette's own.
                    functools.partial(hypercorn.trio.serve, cast(Any, self.app), config, mode="asgi")
                )
                self._url = binds[0]
                self._listening.set()
                logger.info("HTTP server listening on {} (/metrics, /healthz, /readyz)", self._url)
                task_status.started(self._url)
        finally:
            self._url = None
            self._live_ssl = None
            self._listening = trio.Event()

    def reload_certificate(self) -> bool:
        """Load ``tls_cert``/``tls_key`` again into the serving context: a renewed certificate is
        served to new connections without a restart. ``False`` when not serving HTTPS; raises
        ``TlsPolicyError`` (the running certificate stays) when the files are not a usable pair."""
        context = self._live_ssl
        if context is None:
            return False
        settings = self.settings
        password = settings.tls_key_password.reveal() if settings.tls_key_password else None
        server_context(settings.tls_cert, settings.tls_key, password=password)  # check before touching
        context.load_cert_chain(settings.tls_cert, settings.tls_key, password=password)
        return True

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The server context for ``[http] tls_cert``/``tls_key`` (the host's TLS policy), or None."""
        settings = self.settings
        if not settings.tls:
            return None
        password = settings.tls_key_password.reveal() if settings.tls_key_password else None
        try:
            # hypercorn offers h2 and HTTP/1.1 over TLS (its own default ALPN list).
            return server_context(settings.tls_cert, settings.tls_key, password=password,
                                  alpn_protocols=["h2", "http/1.1"])
        except TlsPolicyError as exc:
            message = f"HTTP server cannot serve HTTPS ([http] tls_cert / tls_key): {exc}"
            logger.error("{}", message)
            raise HttpServerError(message) from None

    # -- the built-in endpoints --------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        try:
            body = self._host.metrics.render()
        except Exception as exc:
            # A broken custom collector must not take the whole endpoint down silently.
            logger.opt(exception=exc).error("metrics collection failed: {!r}", exc)
            return PlainTextResponse("metrics collection failed; see the host log\n", status_code=500)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def _healthz(self, request: Request) -> Response:
        # Answering at all proves the event loop runs; that is what liveness means here.
        return JSONResponse({"status": "ok", "uptime_seconds": round(time.monotonic() - self._started_at, 3)})

    async def _readyz(self, request: Request) -> Response:
        report = self.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    def readiness(self) -> dict[str, Any]:
        """What ``/readyz`` answers: ``ready`` plus the reasons when not."""
        host = self._host
        reasons: list[str] = []
        if not host.started:
            reasons.append("host has not finished starting")
        if host.closed:
            reasons.append("host is shutting down")
        connectors: dict[str, bool] = {}
        for name, connector in host.connectors.items():
            try:
                connectors[name] = bool(connector.is_ready())
            except Exception as exc:
                logger.error("connector {}: is_ready() raised {!r}", name, exc)
                connectors[name] = False
            if not connectors[name]:
                reasons.append(f"connector {name} is not ready")
        ready = not reasons
        if ready:
            try:
                ready = host.is_ready()
            except Exception as exc:
                logger.error("host.is_ready() raised {!r}", exc)
                ready = False
            if not ready:
                reasons.append("host reports not ready")
        records = host.plugins.records.values()
        return {
            "ready": ready,
            "reasons": reasons,
            "started": host.started,
            "connectors": connectors,
            "plugins": {
                "loaded": sorted(r.name for r in records if r.state == "loaded"),
                "failed": sorted(r.name for r in records if r.state == "failed"),
            },
        }


def _hypercorn_config(ssl_context: ssl.SSLContext | None) -> Any:
    """A hypercorn ``Config`` that serves TLS with *our* context (``host.tls.server_context``).

    hypercorn builds its own context from ``certfile``/``keyfile``/``ciphers``; overriding
    ``create_ssl_context`` keeps a single TLS policy for the whole host (TLS 1.2+, our ciphers).
    """
    import hypercorn.config

    class _Config(hypercorn.config.Config):
        def create_ssl_context(self) -> ssl.SSLContext | None:
            return ssl_context

        @property
        def ssl_enabled(self) -> bool:
            return ssl_context is not None

    config = _Config()
    config.ciphers = TLS12_CIPHERS  # not used (see above); stated so the two can never disagree
    return config


async def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening); closed again if binding fails."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while in TIME_WAIT
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _check_path(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"route path must start with '/': {path!r}")


def _overlaps(existing: RouteInfo, new: RouteInfo) -> bool:
    if existing.path == new.path:
        return True
    # A mount serves everything below its path; nothing may be added below it, nor a mount above a route.
    if existing.kind == "mount" and new.path.startswith(existing.path + "/"):
        return True
    return new.kind == "mount" and existing.path.startswith(new.path + "/")


def _guarded(endpoint: Callable[..., Any], owner: str, path: str) -> Callable[..., Any]:
    """Run a plugin's endpoint with its plugin name bound for logs; a crash becomes a plain 500."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        token = current_plugin.set(owner)
        try:
            response: Response = await endpoint(request)
            return response
        except BaseException as exc:  # even sys.exit() in an endpoint is that endpoint's 500
            if not escaped_from_plugin(exc):
                raise
            logger.opt(exception=exc).error("HTTP endpoint {} of {} failed: {!r}", path, owner, exc)
            return PlainTextResponse("internal error\n", status_code=500)
        finally:
            current_plugin.reset(token)

    return guarded
