"""Helpers for the webhook-mode tests: a real Host with its HTTP server on 127.0.0.1:0, the dingtalk
plugin in webhook mode, and plugins that record what happens (messages, audit records)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from host_dingtalk_connector.emulator import Emulator
from host_dingtalk_connector.webhook_connector import WebhookConnector
from streamkit import QUIET_STREAM, RunningHost, app_table, open_host

from host import AuditEntry, hookimpl

#: Webhook settings for tests: short waits on the real clock.
FAST_WEBHOOK: dict[str, Any] = {"inline_reply_timeout": 1.0, "busy_wait": 0.2, "audit_interval": 1.0}


@dataclass
class AuditRecorder:
    """A test plugin keeping every audit record the host emits."""

    entries: list[AuditEntry] = field(default_factory=list)

    @hookimpl
    def on_audit(self, entry: AuditEntry) -> None:
        self.entries.append(entry)

    def security(self) -> list[AuditEntry]:
        return [e for e in self.entries if e.category == "security"]


def webhook_config(emu: Emulator, *, mode: str = "webhook", webhook: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:  # fmt: skip
    """``[dingtalk]`` of one app pointing at ``emu`` (replies, OpenAPI), receiving callbacks."""
    return {**app_table(emu), "mode": mode, "webhook": {**FAST_WEBHOOK, **(webhook or {})},
            "stream": dict(QUIET_STREAM), **extra}  # fmt: skip


@dataclass
class WebhookHost(RunningHost):
    @property
    def webhook_connector(self) -> WebhookConnector:
        connector = self.host.connectors["dingtalk"]
        assert isinstance(connector, WebhookConnector)
        return connector

    @property
    def callback_url(self) -> str:
        receiver = self.webhook_connector.webhook
        assert receiver is not None
        return self.host.http.url + receiver.settings.path


@asynccontextmanager
async def open_webhook_host(
    dingtalk: dict[str, Any],
    *plugins: tuple[str, Any],
    host_settings: dict[str, Any] | None = None,
) -> AsyncIterator[WebhookHost]:
    """Run a real Host with its HTTP server, the dingtalk plugin (``dingtalk``) and ``plugins``."""
    async with open_host(dingtalk, *plugins, host_settings=host_settings,
                         http={"enabled": True, "addr": "127.0.0.1:0"}, running=WebhookHost) as running:  # fmt: skip
        yield running
