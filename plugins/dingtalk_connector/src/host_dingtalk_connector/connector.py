"""``DingTalkConnector``: the host ``Connector`` for DingTalk Stream mode.

One connector serves every configured app (``[dingtalk.apps.*]``): each app has its own
``AppStream`` (connections, reconnect loop), its own dedup scope and its own ``FrameRouter``; a
failing app does not affect the others. Messages carry the app's configured name in
``Message.app_id``, and replies go back through the app the message came from.

Lifecycle (driven by the host)::

    await nursery.start(connector.serve, intake)  # returns once every app is connected
                                                  # (or after [dingtalk.stream] startup_wait)
    await connector.stop()                        # stop reading, let in-flight events finish
                                                  # and ACK, close sockets with 1000; returns
                                                  # when serve has returned
    await connector.aclose()                      # end open cards, close the HTTP client
                                                  # (plugin on_shutdown, after replies drained)

On a hot reload of the plugin the old connector is replaced by a new one (make before break): its
``on_shutdown`` only calls ``retire_when_stopped()``, because the old connector still answers the
messages it accepted until the host has started its successor and stopped it. Its HTTP client is
closed after ``stop()``, once no delivery, send, media call or streamed reply of its own is in
progress.

Everything the connector sends (replies through the session webhook or the OpenAPI, AI cards,
proactive messages, media, access tokens) is ``self.outbound`` (``outbound.Outbound``); it keeps
working after ``stop()``, while the host drains its replies.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from host.logs import logger
from host.metrics import Metrics
from host.model import Conversation, Message, Reply
from host_dingtalk_connector.cards import CardSettings
from host_dingtalk_connector.config import AppConfig, StreamSettings
from host_dingtalk_connector.convert import PLATFORM
from host_dingtalk_connector.dedup import DedupCache
from host_dingtalk_connector.identity import IdentityResolver, NullResolver
from host_dingtalk_connector.media import MediaSettings
from host_dingtalk_connector.metrics import ConnectorMetrics
from host_dingtalk_connector.openapi import ApiBudgetSettings
from host_dingtalk_connector.outbound import Outbound
from host_dingtalk_connector.replies import ReplySettings
from host_dingtalk_connector.retry import RetrySettings
from host_dingtalk_connector.router import FrameRouter
from host_dingtalk_connector.stream import AppStream, make_ssl_context

if TYPE_CHECKING:
    from host.connector import Intake, ReplyStream

__all__ = ["DingTalkConnector"]


class DingTalkConnector:
    """DingTalk Stream-mode connector for one or more apps."""

    platform = PLATFORM

    def __init__(
        self,
        name: str,
        apps: Sequence[AppConfig],
        settings: StreamSettings | None = None,
        *,
        metrics: Metrics | None = None,
        resolver: IdentityResolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
        rng: Callable[[], float] | None = None,
        replies: ReplySettings | None = None,
        cards: CardSettings | None = None,
        media: MediaSettings | None = None,
        retry: RetrySettings | None = None,
        budget: ApiBudgetSettings | None = None,
    ) -> None:
        if not apps:
            raise ValueError("DingTalkConnector needs at least one app")
        self.name = name
        self.apps = {app.name: app for app in apps}
        self.settings = settings or StreamSettings()
        self.metrics = ConnectorMetrics(metrics or Metrics())
        self.resolver = resolver or NullResolver()
        self.ssl_context = ssl_context or make_ssl_context()
        self.outbound = Outbound(
            apps,
            connector_name=name,
            metrics=metrics,
            replies=replies,
            cards=cards,
            media=media,
            retry=retry,
            budget=budget,
            ssl_context=self.ssl_context,
            templates={app.name: app.card_template_id for app in apps},
            oapi_endpoints={app.name: app.oapi_endpoint for app in apps if app.oapi_endpoint},
        )
        self.streams: dict[str, AppStream] = {}
        #: What each app already accepted, and the events it is handling (kept across a hot reload,
        #: see ``inherit_dedup``).
        self.dedup: dict[str, DedupCache] = {}
        self.events_running: dict[str, set[str]] = {}
        self._rng = rng
        self._stop = trio.Event()
        self._done = trio.Event()
        self._serving = False
        self._busy = 0  # calls in progress that use the HTTP clients (see _using_http)
        self._retire_on_stop = False
        self._retiring = False

    def __repr__(self) -> str:
        return f"DingTalkConnector(name={self.name!r}, apps={sorted(self.apps)})"

    # -- Connector protocol -------------------------------------------------------------------------

    async def serve(
        self, intake: Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect every app and serve until ``stop()``."""
        self._serving = True
        settings = self.settings
        try:
            async with trio.open_nursery() as nursery:
                for app in self.apps.values():
                    dedup = self.dedup.get(app.name)
                    if dedup is None:
                        dedup = self.dedup[app.name] = DedupCache(
                            ttl=settings.dedup_ttl, max_entries=settings.dedup_max_entries
                        )
                    self.metrics.dedup_entries.labels(app.name).set_function(dedup.__len__)
                    router = FrameRouter(
                        app=app,
                        connector_name=self.name,
                        settings=settings,
                        intake=intake,
                        resolver=self.resolver,
                        dedup=dedup,
                        metrics=self.metrics,
                        on_accepted=self.outbound.remember,
                        events_running=self.events_running.setdefault(app.name, set()),
                    )
                    stream = AppStream(
                        app,
                        settings,
                        router,
                        self.metrics,
                        ssl_context=self.ssl_context,
                        rng=self._rng,
                    )
                    self.streams[app.name] = stream
                    nursery.start_soon(stream.run)
                with trio.move_on_after(settings.startup_wait):
                    for stream in self.streams.values():
                        await stream.wait_connected()
                waiting = [name for name, s in self.streams.items() if not s.is_ready()]
                if waiting:
                    logger.warning(
                        "dingtalk connector {}: app(s) {} not connected after {}s; starting anyway, still retrying",
                        self.name, ", ".join(waiting), settings.startup_wait,
                    )  # fmt: skip
                task_status.started()
                await self._stop.wait()
                # Retiring on a hot reload: the successor already serves, so the event handlers
                # still running may take longer to finish than on shutdown.
                grace = settings.reload_handler_timeout if self._retire_on_stop else settings.shutdown_timeout
                for stream in self.streams.values():
                    stream.request_stop(handler_grace=grace)
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop reading, let in-flight events finish (bounded), close the sockets; wait for ``serve``."""
        self._stop.set()
        if self._serving:
            await self._done.wait()
        if self._retire_on_stop:
            self._retiring = True
            await self._close_when_idle()

    def inherit_dedup(self, previous: object) -> int:
        """Hot reload: take over the dedup memory of the connector this one replaces (before
        ``serve``), so that DingTalk's redelivery of a message the old one accepted (its ACK lost)
        is not answered a second time. Only apps with the same name and client id; returns how many.
        """
        caches = getattr(previous, "dedup", None)
        old_apps = getattr(previous, "apps", None)
        running = getattr(previous, "events_running", None)
        if previous is self or not isinstance(caches, dict) or not isinstance(old_apps, dict):
            return 0
        taken = 0
        for name, app in self.apps.items():
            old_app, cache = old_apps.get(name), caches.get(name)
            # Duck-typed: after a reload the old cache is an instance of the old module's class.
            if cache is not None and getattr(old_app, "client_id", None) == app.client_id and hasattr(cache, "seen"):
                # The new configuration's limits apply from now on.
                cache.ttl, cache.max_entries = self.settings.dedup_ttl, self.settings.dedup_max_entries
                self.dedup[name] = cache
                # The old version's event handlers outlive its connections: share what they handle.
                if isinstance(running, dict) and isinstance(running.get(name), set):
                    self.events_running[name] = running[name]
                taken += 1
        return taken

    def retire_when_stopped(self) -> None:
        """Plugin reload: once stopped, close the HTTP client as soon as nothing of ours uses it.

        Until then the connector keeps answering: the host routes replies to it while it is still
        the registered connector of its name, and a successor only takes over when it has started.
        """
        self._retire_on_stop = True

    @asynccontextmanager
    async def _using_http(self) -> AsyncIterator[None]:
        """Count a call that uses the HTTP clients; a retired connector closes them after the last."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            await self._close_when_idle()

    async def _close_when_idle(self) -> None:
        if self._retiring and self._busy == 0:
            self._retiring = False
            with trio.CancelScope(shield=True):
                await self.outbound.retire()  # closes the client once no streamed reply is open

    def is_ready(self) -> bool:
        """``True`` while every app has an open connection."""
        return bool(self.streams) and all(s.is_ready() for s in self.streams.values())

    async def deliver(self, message: Message, reply: Reply) -> None:
        """Answer ``message``: its session webhook, else the robot OpenAPI (``ReplyError`` if neither)."""
        async with self._using_http():
            await self.outbound.deliver(message, reply)

    async def open_stream(self, message: Message) -> ReplyStream:
        """An AI card when a card template is configured, else one markdown message at the end."""
        async with self._using_http():  # once open, the stream is counted by the outbound's cards
            return await self.outbound.open_stream(message)

    async def send(self, target: Conversation, reply: Reply, *, app_id: str | None = None) -> None:
        """A proactive message through the robot OpenAPI (``app_id``: configured name or client id)."""
        async with self._using_http():
            await self.outbound.send(target, reply, app_id=app_id)

    # -- extras --------------------------------------------------------------------------------------

    async def send_media(
        self,
        to: Message | Conversation,
        path: str | os.PathLike[str],
        *,
        kind: str = "image",
        app_id: str | None = None,
    ) -> None:
        """Upload a local file and send it into ``to``'s chat as an image (``kind="image"``) or file."""
        async with self._using_http():
            await self.outbound.send_media(to, path, kind=kind, app_id=app_id)

    async def upload_media(
        self, path: str | os.PathLike[str], *, kind: str = "image", app_id: str | None = None
    ) -> str:
        """Upload a local file (image, voice, video, file); returns the DingTalk media id."""
        async with self._using_http():
            return await self.outbound.upload_media(path, kind=kind, app_id=app_id)

    async def download_media(self, message: Message, directory: str | os.PathLike[str]) -> int:
        """Download the files of ``message`` into ``directory`` now (fills ``Media.path``)."""
        async with self._using_http():
            return await self.outbound.download_media(message, directory)

    async def aclose(self) -> None:
        """Host shutdown: end AI cards still open, close the HTTP client. Safe to call twice."""
        await self.outbound.aclose()

    def statistics(self) -> dict[str, Any]:
        """Per-app connection and dedup state, for introspection and tests (``outbound.statistics()``
        has tokens and cards)."""
        return {name: stream.statistics() for name, stream in self.streams.items()}
