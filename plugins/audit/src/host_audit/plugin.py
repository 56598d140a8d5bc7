"""The host plugin: hook implementations wiring the audit log into a running host.

One ``AuditService`` per ``Host`` (several hosts may run in one process, e.g. in tests). The log is
opened first thing at startup (``tryfirst``) so other plugins can audit from their own
``on_startup``, and closed last at shutdown (``trylast``) after flushing what was queued.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from host import hookimpl
from host.logs import logger
from host.model import AuditEntry
from host_audit import cli
from host_audit.errors import LogClosedError
from host_audit.messages import IdHasher, load_or_create_salt, make_message_middleware
from host_audit.metrics import AuditCollector
from host_audit.service import AuditService
from host_audit.settings import AuditSection, LogSettings

if TYPE_CHECKING:
    from host.metrics import Metrics
    from host.runtime import Host

host_api = ">=1.0,<2"

__all__ = [
    "on_audit",
    "on_shutdown",
    "on_startup",
    "register_commands",
    "register_config_sections",
    "register_middleware",
]


@dataclass
class _State:
    service: AuditService
    hasher: IdHasher | None = None


_states: weakref.WeakKeyDictionary[Host, _State] = weakref.WeakKeyDictionary()
# One collector per metrics registry: a registry refuses the same metric names twice (reloads).
_collectors: weakref.WeakKeyDictionary[Metrics, AuditCollector] = weakref.WeakKeyDictionary()


def _section(host: Host) -> AuditSection:
    section = host.config.section("audit")
    assert isinstance(section, AuditSection)
    return section


@hookimpl
def register_config_sections(register: Callable[..., None]) -> None:
    register("audit", AuditSection)


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    register("audit", cli.run, help="verify the audit log, export or rotate its signing key",
             configure=cli.configure)


@hookimpl(tryfirst=True)
def register_middleware(host: Host, register: Callable[..., None]) -> None:
    settings = _section(host).messages
    if settings.enabled:

        def hasher() -> IdHasher | None:
            state = _states.get(host)
            return state.hasher if state is not None else None

        register(make_message_middleware(host, hasher, settings))


@hookimpl(tryfirst=True)
async def on_startup(host: Host) -> None:
    section = _section(host)
    settings = LogSettings.from_section(section)
    service = AuditService(settings)
    log = await service.open()
    state = _State(service)
    if section.messages.enabled:
        try:
            state.hasher = IdHasher(load_or_create_salt(settings.salt_file(section.messages)))
        except Exception:
            await service.close()
            raise
    _states[host] = state
    collector = _collectors.get(host.metrics)
    if collector is None:
        collector = _collectors[host.metrics] = AuditCollector()
        host.metrics.register_collector(collector)
    collector.service = service
    logger.info(
        "audit log open: {} (next seq {}, key {}, fsync {}, checkpoint every {} records / {}s)",
        settings.directory, log.next_seq, log.key_id, settings.fsync,
        settings.checkpoint_every_records, settings.checkpoint_every_seconds,
    )
    for finding in log.opening_findings:
        logger.warning("audit: recorded finding {} at seq {}: {}", finding.kind, finding.seq,
                       _describe(finding.details))


def _describe(details: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(details.items()) if k != "fragment_b64")


@hookimpl
def on_audit(host: Host, entry: AuditEntry) -> Awaitable[None] | None:
    # Synchronous on purpose: the append itself takes microseconds; only an fsync (strict mode, or
    # after a checkpoint) comes back as an awaitable, which the host awaits under the hook timeout.
    state = _states.get(host)
    if state is None:
        raise LogClosedError("the audit log is not open (did its startup fail? see the error logged then)")
    return state.service.append_nowait(entry)


@hookimpl(trylast=True)
async def on_shutdown(host: Host) -> None:
    state = _states.get(host)
    if state is None:
        return
    log = state.service.log
    # host.audit() also flushes entries other plugins queued with audit_soon() while stopping.
    await host.audit("audit", "close", details={"records": log.next_seq if log else None})
    _states.pop(host, None)
    await state.service.close()
