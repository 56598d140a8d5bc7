"""``WebhookConnector``: the DingTalk connector receiving bot messages by HTTP callback.

``[dingtalk] mode`` picks how messages arrive:

* ``stream`` (default): ``DingTalkConnector``, the Stream WebSocket only;
* ``webhook``: this class, HTTP callbacks only (no Stream connection is opened);
* ``both``: this class with the Stream connection as well (e.g. while migrating an app).

Everything else is the ``DingTalkConnector`` it extends: the same host ``Message`` values, the
same replies, cards, proactive sends and metrics. What this class adds: the ``WebhookReceiver``
(``webhook.py``) on the host's HTTP server, and inline answers: a reply ready while DingTalk's
request is still open goes into the HTTP response (reference 6.1), every other reply takes the
usual route (session webhook, then OpenAPI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from host.logs import logger
from host.model import Message, Reply
from host_dingtalk_connector.connector import DingTalkConnector
from host_dingtalk_connector.replies import webhook_body
from host_dingtalk_connector.sizing import utf8_len
from host_dingtalk_connector.webhook import WebhookReceiver, WebhookSettings

if TYPE_CHECKING:
    from host.connector import Intake, ReplyStream
    from host.runtime import Host

__all__ = ["WebhookConnector"]

#: Room left for the title, an @-mention and the JSON around the text (as the reply sender does).
_BODY_OVERHEAD_BYTES = 600


class WebhookConnector(DingTalkConnector):
    """A ``DingTalkConnector`` that takes bot messages from HTTP callbacks (and optionally Stream).

    Build it like a ``DingTalkConnector``, then call ``setup_webhook`` once before the host runs it.
    """

    webhook: WebhookReceiver | None = None
    #: Also open the Stream connection (``mode = "both"``).
    receive_stream: bool = False

    def setup_webhook(self, host: Host, settings: WebhookSettings, *, receive_stream: bool = False) -> None:
        """Create the receiver and serve it at ``settings.path`` on ``host.http``.

        ``ValueError`` when the path is already served by someone else.
        """
        self.receive_stream = receive_stream
        self.webhook = WebhookReceiver(
            connector_name=self.name,
            apps=self.apps,
            settings=settings,
            resolver=self.resolver,
            metrics=host.metrics,
            dedup_ttl=self.settings.dedup_ttl,
            dedup_max_entries=self.settings.dedup_max_entries,
            audit=host.audit_soon,
            on_accepted=self._remember,
        )
        host.http.add_route(settings.path, self.webhook.endpoint, methods=["POST"], name="dingtalk_callback")
        self._webhook_stop = trio.Event()
        self._webhook_done = trio.Event()
        self._webhook_serving = False

    def _receiver(self) -> WebhookReceiver:
        if self.webhook is None:
            raise RuntimeError("WebhookConnector.setup_webhook() must be called before serve()")
        return self.webhook

    def _remember(self, message: Message) -> None:
        # The bookkeeping the Stream router does for each accepted message (proactive sends).
        self.outbound.remember(message)

    def __repr__(self) -> str:
        mode = "both" if self.receive_stream else "webhook"
        return f"WebhookConnector(name={self.name!r}, apps={sorted(self.apps)}, mode={mode!r})"

    # -- Connector protocol -------------------------------------------------------------------------

    async def serve(self, intake: Intake, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take callbacks (and, in ``both`` mode, run the Stream connections) until ``stop()``."""
        receiver = self._receiver()
        self._webhook_serving = True
        try:
            async with trio.open_nursery() as nursery:
                if self.receive_stream:
                    await nursery.start(super().serve, intake)
                await nursery.start(receiver.reporter.run)
                receiver.open(intake)
                logger.info(
                    "dingtalk connector {}: taking HTTP callbacks at {}{}",
                    self.name, receiver.settings.path, " (and Stream)" if self.receive_stream else "",
                )  # fmt: skip
                task_status.started()
                await self._webhook_stop.wait()
                # Stream (if any) has returned already (stop() waited for it): end the audit summaries.
                nursery.cancel_scope.cancel()
        finally:
            receiver.close()
            self._webhook_done.set()

    async def stop(self) -> None:
        """Refuse new callbacks (503), stop Stream if it runs, and wait for ``serve`` to return."""
        receiver = self._receiver()
        receiver.close()
        if self.receive_stream:
            await super().stop()
        self._webhook_stop.set()
        if self._webhook_serving:
            await self._webhook_done.wait()

    def is_ready(self) -> bool:
        """Taking callbacks, and (``both`` mode) every app's Stream connection is open."""
        if self.webhook is None or not self.webhook.is_open:
            return False
        return not self.receive_stream or super().is_ready()

    async def deliver(self, message: Message, reply: Reply) -> None:
        receiver = self.webhook
        if receiver is not None and receiver.waiting(message):
            body = self.inline_body(message, reply)
            if body is not None and receiver.answer_inline(message, body):
                return
            receiver.release(message)  # not inline-able: answer the request now, reply the usual way
        await super().deliver(message, reply)

    async def open_stream(self, message: Message) -> ReplyStream:
        if self.webhook is not None:
            self.webhook.release(message)  # a growing answer cannot be an HTTP response body
        return await super().open_stream(message)

    # -- helpers -------------------------------------------------------------------------------------

    def inline_body(self, message: Message, reply: Reply) -> dict[str, Any] | None:
        """The HTTP response body answering ``message`` with ``reply``, or ``None`` when the reply
        needs the usual route (local images to upload, or too long for one message)."""
        replies = self.outbound.replies
        if reply.kind != "text" and "file://" in reply.text:
            return None  # local images are uploaded through the OpenAPI first
        if utf8_len(reply.text) > replies.settings.message_max_bytes - _BODY_OVERHEAD_BYTES:
            return None  # the usual route splits it into several messages
        return webhook_body(reply, replies.mention_for(message, reply))

    def webhook_statistics(self) -> dict[str, Any]:
        """The receiver's counters (outcomes, waiting responses, replay memory)."""
        return self._receiver().statistics()
