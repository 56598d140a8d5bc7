"""Hot reload of single plugins and of the configuration, without restarting the host.

A plugin reload goes in two phases, so that most failures never touch the running version:

1. **prepare** (the old version keeps serving): detach the plugin's modules from ``sys.modules``
   (kept aside), import the new version, check its hooks against the specs and its declared host API
   range, validate its configuration section. Any failure: put the old modules back, report, done.
2. **swap**: stop routing new calls to the plugin, drain its in-flight calls (``[host.reload]
   drain_timeout``), run its ``on_shutdown``, cancel its services (``host.start_service``), remove its
   HTTP routes, unregister it; register the new version, run its ``on_startup``, start its connectors
   (make before break: the old connectors are stopped only once the new ones are up) and rebuild the
   middleware chain. If ``on_startup`` fails, the new version is removed and the old one is put back
   and started again (rollback); the failure is reported with its reason.

Every reload, rollback, refusal and configuration change is audited and counted in
``host_plugin_reloads_total{plugin,outcome}``; the plugin-state metric follows.

Triggers (all optional, see ``[host.reload]``): files changing in the drop-in ``plugins_dir`` (watched
with watchfiles), distributions installed, upgraded or removed with pip (the ``host.plugins`` entry-point
metadata is polled), ``SIGHUP`` (configuration + every changed plugin), and ``python -m host reload
[PLUGIN]`` through the control socket.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import trio

from host.access import policy_changes
from host.config import load_config, redact
from host.errors import ConfigError, PluginError
from host.logs import current_plugin, logger
from host.plugins import PluginManager, PluginRecord, escaped_from_plugin

if TYPE_CHECKING:
    from host.connector import Connector
    from host.runtime import Host, Middleware

__all__ = ["ReloadResult", "Reloader", "send_control_command"]

Outcome = Literal["reloaded", "loaded", "unloaded", "unchanged", "failed", "rolled_back"]


@dataclass
class ReloadResult:
    """What happened to one plugin."""

    plugin: str
    outcome: Outcome
    old_version: str | None = None
    new_version: str | None = None
    error: str | None = None
    drained: bool = True

    @property
    def ok(self) -> bool:
        return self.outcome not in ("failed", "rolled_back")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class _Candidate:
    obj: Any
    record: PluginRecord
    new_modules: dict[str, ModuleType] = field(default_factory=dict)


class Reloader:
    """Reloads plugins and configuration for one ``Host``. One reload at a time."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = trio.Lock()
        self._snapshot: dict[str, tuple[str | None, str | None, str]] = {}
        self.reloads = host.metrics.counter(
            "plugin_reloads_total", "Plugin reloads by outcome.", ["plugin", "outcome"]
        )
        self._requests: trio.MemoryReceiveChannel[str | None]
        self._request_send, self._requests = trio.open_memory_channel[str | None](64)

    @property
    def settings(self) -> Any:
        return self.host.config.host.reload

    # -- background triggers -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the triggers configured in ``[host.reload]`` until cancelled."""
        self._snapshot = self._entry_point_snapshot()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_requests)
            if self.settings.watch_entry_points:
                nursery.start_soon(self._poll_entry_points)
            if self.settings.plugins_dir and self.settings.watch_plugins_dir:
                nursery.start_soon(self._watch_plugins_dir)
            if self.host.config.host.control_socket:
                await nursery.start(self._serve_control_socket)
            task_status.started()

    def request(self, plugin: str | None = None) -> None:
        """Ask for a reload from sync code (signal handler, watcher): ``None`` means everything."""
        try:
            self._request_send.send_nowait(plugin)
        except trio.WouldBlock:
            logger.warning("reload requests are piling up; dropping a duplicate request")

    async def _serve_requests(self) -> None:
        async for plugin in self._requests:
            if plugin is None:
                await self.reload_all(reason="signal")
            else:
                await self.reload_plugin(plugin, reason="request")

    @staticmethod
    def _entry_point_snapshot() -> dict[str, tuple[str | None, str | None, str]]:
        importlib.invalidate_caches()
        snapshot = {}
        for ep in PluginManager.entry_points():
            dist = ep.dist
            snapshot[ep.name] = (
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
                ep.value,
            )
        return snapshot

    async def _poll_entry_points(self) -> None:
        while True:
            await trio.sleep(self.settings.entry_point_poll_seconds)
            current = self._entry_point_snapshot()
            if current == self._snapshot:
                continue
            changed = sorted(
                name
                for name in set(current) | set(self._snapshot)
                if current.get(name) != self._snapshot.get(name)
            )
            self._snapshot = current
            logger.info("installed plugins changed: {}", ", ".join(changed))
            for name in changed:
                await self.reload_plugin(name, reason="pip")

    async def _watch_plugins_dir(self) -> None:
        # watchfiles runs its Rust watcher in a worker thread; anyio bridges it into trio.
        from watchfiles import awatch

        root = Path(self.settings.plugins_dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        # rust_timeout bounds how long the watcher thread takes to notice cancellation (shutdown).
        watcher = awatch(
            root, debounce=int(self.settings.debounce_seconds * 1000), recursive=True, rust_timeout=300
        )
        async with aclosing(watcher):
            async for changes in watcher:
                await self._on_file_changes(root, changes)

    async def _on_file_changes(self, root: Path, changes: set[tuple[Any, str]]) -> None:
        names = set()
        for _, path in changes:
            relative = Path(path).resolve().relative_to(root)
            if relative.parts and not relative.parts[0].startswith((".", "__pycache__")):
                names.add(relative.parts[0].removesuffix(".py"))
        for name in sorted(names):
            await self.reload_plugin(name, reason="file change")

    async def _serve_control_socket(self, *, task_status: trio.TaskStatus[None]) -> None:
        path = Path(self.host.config.host.control_socket)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists():
            path.unlink()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is created 0600: only our user may command us
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(8)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._handle_control, [listener])
        finally:
            path.unlink(missing_ok=True)

    async def _handle_control(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(5):
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        data += chunk
                        if len(data) > 65536:
                            raise ValueError("request too large")
                request = json.loads(data or b"{}")
                if request.get("command") != "reload":
                    raise ValueError(f"unknown command {request.get('command')!r}")
            except (ValueError, trio.TooSlowError) as exc:
                await stream.send_all(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
                return
            plugin = request.get("plugin")
            if plugin:
                results = [await self.reload_plugin(str(plugin), reason="command")]
            else:
                results = await self.reload_all(reason="command")
            reply = {"ok": all(r.ok for r in results), "results": [r.as_dict() for r in results]}
            await stream.send_all(json.dumps(reply).encode() + b"\n")

    # -- reloading everything ----------------------------------------------------------------

    async def reload_all(self, *, reason: str) -> list[ReloadResult]:
        """Reload the configuration, then every plugin whose installed version changed.

        Also re-reads the HTTPS certificate and key (renewed in place, e.g. by certbot)."""
        await self._reload_certificate(reason)
        results = await self.reload_config(reason=reason)
        current = self._entry_point_snapshot()
        changed = {
            name
            for name in set(current) | set(self._snapshot)
            if current.get(name) != self._snapshot.get(name)
        }
        self._snapshot = current
        if self.settings.plugins_dir:
            changed |= {
                name for name, record in self.host.plugins.records.items() if record.source == "dropin"
            }
            changed |= self._dropin_names()
        done = {r.plugin for r in results}
        for name in sorted(changed - done):
            results.append(await self.reload_plugin(name, reason=reason))
        return results

    async def reload_config(self, *, reason: str) -> list[ReloadResult]:
        """Re-read the configuration; reload only the plugins whose section changed.

        An invalid configuration is refused: the last good one keeps running and the error is
        logged and audited.
        """
        host = self.host
        old = host.config
        source = old.source if not old.source.startswith("<") else None
        if old.source == "<config dict>":
            return []
        try:
            new = load_config(source)
            for name, (_plugin, schema) in host.section_schemas.items():
                new.validate_section(name, schema)
            apply_core = host.prepare_core_reload(new)  # [tls], [admin], [access]: checked, applied below
        except ConfigError as exc:
            logger.error("configuration reload refused, keeping the running configuration: {}", exc)
            await host.audit("config", "reload_refused", details={"error": str(exc), "reason": reason})
            return []
        changed = sorted(
            name for name in set(old.data) | set(new.data) if old.data.get(name) != new.data.get(name)
        )
        if not changed:
            return []
        diff = {
            name: {"old": redact(old.redacted().get(name, old.raw_section(name))),
                   "new": redact(new.redacted().get(name, new.raw_section(name)))}
            for name in changed
        }
        host.config = new
        host.dispatcher.settings = new.host
        host.plugins.generation += 1  # re-resolve per-plugin timeouts
        apply_core()
        await host.audit("config", "change", details={"sections": changed, "diff": diff, "reason": reason})
        if "access" in changed:
            logger.info("[access] changed: the new policy applies from the next message")
            await host.audit("access", "policy_change", details={
                "changes": policy_changes(old.access, new.access), "reason": reason,
            })
        if "admin" in changed:
            logger.info("[admin] changed: keys, allow-list and limits apply from the next request")
        for core in ("host", "logging", "http"):
            if core in changed:
                logger.warning("[{}] changed: timeouts apply now; other keys need a restart", core)
        results = []
        for plugin in sorted({host.section_schemas[n][0] for n in changed if n in host.section_schemas}):
            results.append(await self.reload_plugin(plugin, reason="config change"))
        return results

    async def _reload_certificate(self, reason: str) -> None:
        try:
            reloaded = self.host.http.reload_certificate()
        except ConfigError as exc:  # TlsPolicyError: the running certificate stays
            logger.error("HTTPS certificate reload refused, keeping the running one: {}", exc)
            await self.host.audit("config", "tls_certificate_refused", details={"error": str(exc), "reason": reason})
            return
        if reloaded:
            logger.info("HTTPS certificate reloaded from {}", self.host.http.settings.tls_cert)
            await self.host.audit("config", "tls_certificate_reload",
                                  details={"cert": self.host.http.settings.tls_cert, "reason": reason})

    def _dropin_names(self) -> set[str]:
        root = Path(self.settings.plugins_dir)
        if not root.is_dir():
            return set()
        names = set()
        for entry in root.iterdir():
            if entry.name.startswith((".", "_")):
                continue
            if entry.suffix == ".py" or (entry / "__init__.py").exists():
                names.add(entry.name.removesuffix(".py"))
        return names

    # -- one plugin ----------------------------------------------------------------------------

    async def reload_plugin(self, name: str, *, reason: str = "manual") -> ReloadResult:
        """Reload, load or unload ``name`` so that it matches what is installed now."""
        async with self._lock:
            # Audit entries emitted during the swap wait until it is over: the plugin being swapped
            # may be the one that stores them (its log is closed between the two versions).
            self.host.hold_audit()
            try:
                result = await self._reload(name, reason)
            finally:
                # Calls that arrived during the swap waited at the plugin's gate (see _retire); they
                # go on now, to the new version, the old one after a rollback, or nowhere if unloaded.
                self.host.dispatcher.resume(name)
                self.host.release_audit()
        self.reloads.labels(name, result.outcome).inc()
        details = {k: v for k, v in result.as_dict().items() if k != "plugin" and v is not None}
        details["reason"] = reason
        await self.host.audit("plugin", f"reload_{result.outcome}", target=name, details=details)
        level = logger.info if result.ok else logger.error
        level("plugin {} {} ({}){}", name, result.outcome, reason, f": {result.error}" if result.error else "")
        return result

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a plugin the host has a record of, or one installed now."""
        return name in self.host.plugins.records or self._locate(name) is not None

    def _locate(self, name: str) -> tuple[str, Callable[[], Any], dict[str, Any]] | None:
        """Where the current version of ``name`` comes from: (source, loader, record fields)."""
        importlib.invalidate_caches()
        ep = PluginManager.find_entry_point(name)
        if ep is not None:
            dist = ep.dist
            return "entry_point", ep.load, {
                "distribution": dist.metadata["Name"] if dist is not None else None,
                "version": dist.version if dist is not None else None,
                "module": ep.value,
            }
        if self.settings.plugins_dir:
            root = Path(self.settings.plugins_dir).resolve()
            if (root / f"{name}.py").exists() or (root / name / "__init__.py").exists():
                if str(root) not in sys.path:
                    sys.path.insert(0, str(root))
                return "dropin", lambda: importlib.import_module(name), {"module": name}
        return None

    async def _reload(self, name: str, reason: str) -> ReloadResult:
        host = self.host
        plugins = host.plugins
        old = plugins.records.get(name)
        old_loaded = old is not None and old.state == "loaded" and plugins.pm.has_plugin(name)
        old_version = old.version if old else None
        located = self._locate(name)
        if located is None:
            if not old_loaded:
                return ReloadResult(name, "unchanged", old_version)
            assert old is not None
            drained = await self._retire(name, old)
            self._restore_sections(name, {})
            plugins.set_record(PluginRecord(name, old.distribution, old.version, old.module, state="disabled",
                                            error="uninstalled"))
            return ReloadResult(name, "unloaded", old_version, drained=drained)
        source, loader, fields = located
        if not plugins.is_enabled(name):
            if old_loaded:
                assert old is not None
                drained = await self._retire(name, old)
                self._restore_sections(name, {})
                plugins.set_record(PluginRecord(name, state="disabled", error="disabled by allow/deny lists",
                                                **fields))
                return ReloadResult(name, "unloaded", old_version, drained=drained)
            return ReloadResult(name, "unchanged", old_version)

        # Phase 1: prepare the new version while the old one keeps serving.
        roots = _module_roots(fields.get("module"), old)
        saved = _detach_modules(roots)
        try:
            obj = loader()
            hooks = plugins.validate(name, obj)
            schemas = self._sections_of(name, obj)
            # Validated now, stored only at the swap: the old version keeps reading its own.
            sections = [(section, host.config.check_section(section, schema)) for section, schema in schemas]
        except BaseException as exc:  # an import-time sys.exit() fails the reload, not the host
            if not escaped_from_plugin(exc):
                _detach_modules(roots)
                sys.modules.update(saved)
                raise
            _detach_modules(roots)
            sys.modules.update(saved)
            error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PluginError) else str(exc)
            if old_loaded:
                return ReloadResult(name, "failed", old_version, fields.get("version"), error=error)
            plugins.set_record(PluginRecord(name, state="failed", error=error, source=source, **fields))
            return ReloadResult(name, "failed", None, fields.get("version"), error=error)
        new_record = PluginRecord(name, source=source, hooks=hooks, module_roots=roots, **fields)
        old_schemas = {section: host.section_schemas[section] for section, _ in schemas
                       if section in host.section_schemas}
        old_owned = {section: entry for section, entry in host.section_schemas.items() if entry[0] == name}

        # Phase 2: swap.
        drained = True
        old_obj = None
        old_connectors: list[Connector] = []
        if old_loaded:
            assert old is not None
            old_connectors = host.connectors_of(name)
            old_obj = old.obj
            drained = await self._retire(name, old, keep_connectors=True)
        for section, value in sections:
            host.config.set_section(section, value)
        plugins.register(name, obj, new_record)
        plugins.set_record(new_record)
        self._restore_sections(name, {section: (name, schema) for section, schema in schemas})
        started = await host.dispatcher.call_plugin(name, "on_startup", host=host)
        if started is not None and not started.ok:
            error = "on_startup timed out" if started.timed_out else f"on_startup raised {started.error!r}"
            await self._remove(name)
            _detach_modules(roots)
            sys.modules.update(saved)
            if old_obj is None:
                self._restore_sections(name, old_owned)
                plugins.set_record(PluginRecord(name, state="failed", error=error, source=source, **fields))
                return ReloadResult(name, "failed", None, fields.get("version"), error=error)
            assert old is not None
            for section, (owner, schema) in old_schemas.items():
                # The section was validated with the new version's schema: back to the old one.
                host.config.validate_section(section, schema)
                host.section_schemas[section] = (owner, schema)
            self._restore_sections(name, old_owned)
            plugins.register(name, old_obj, old)
            plugins.set_record(old)
            restarted = await host.dispatcher.call_plugin(name, "on_startup", host=host)
            if restarted is not None and not restarted.ok:
                plugins.mark_failed(name, f"rollback failed: {restarted.error or 'timeout'}")
            else:
                # The old version registers fresh connectors; the ones that kept serving during the
                # attempt stop once these are up (make before break, as for a successful reload).
                await self._activate(name, old_connectors=old_connectors)
            return ReloadResult(name, "rolled_back", old_version, fields.get("version"), error=error,
                                drained=drained)
        await self._activate(name, old_connectors=old_connectors)
        outcome: Outcome = "reloaded" if old_loaded else "loaded"
        return ReloadResult(name, outcome, old_version, fields.get("version"), drained=drained)

    def _restore_sections(self, name: str, owned: dict[str, tuple[str, Any]]) -> None:
        """Make ``owned`` the configuration schemas ``name`` has: a schema left behind by a removed
        plugin (or version) would go on validating, and refusing, the configuration on reload."""
        schemas = self.host.section_schemas
        for section in [s for s, (owner, _) in schemas.items() if owner == name and s not in owned]:
            del schemas[section]
        schemas.update(owned)

    def _sections_of(self, name: str, obj: Any) -> list[tuple[str, Any]]:
        func = getattr(obj, "register_config_sections", None)
        sections: list[tuple[str, Any]] = []
        if func is None:
            return sections
        token = current_plugin.set(name)
        try:
            func(lambda section, schema: sections.append((section, schema)))
        finally:
            current_plugin.reset(token)
        return sections

    async def _retire(self, name: str, record: PluginRecord, *, keep_connectors: bool = False) -> bool:
        """Stop routing to ``name``, drain it, shut it down and unregister it.

        New calls to the plugin wait at its gate (``Dispatcher.pause``) until ``reload_plugin`` is
        over, rather than skip it: a message arriving mid-swap is answered by the new version.
        """
        host = self.host
        host.dispatcher.pause(name)
        drained = await host.dispatcher.wait_plugin_idle(name, self.settings.drain_timeout)
        if not drained:
            logger.warning("plugin {} still busy after {}s; reloading anyway", name, self.settings.drain_timeout)
        await host.dispatcher.call_plugin(name, "on_shutdown", host=host)
        if not keep_connectors:
            await host.stop_connectors_of(name)
        await self._remove(name)
        return drained

    async def _remove(self, name: str) -> None:
        host = self.host
        await host.cancel_services(name)
        host.metrics.unregister_collectors(name)
        host.http.remove_routes(name)
        host.set_middleware([(p, f) for p, f in host.middleware if p != name])
        if host.plugins.pm.has_plugin(name):
            host.plugins.unregister(name)

    async def _activate(self, name: str, *, old_connectors: list[Connector]) -> None:
        """Start the (re)registered plugin's connectors and middleware, open its gate, then retire
        the old connectors."""
        host = self.host
        new_connectors: list[Connector] = []
        outcome = host.dispatcher.call_sync_plugin(
            name, "register_connectors", host=host, register=new_connectors.append
        )
        if outcome is not None and not outcome.ok:
            logger.error("plugin {} could not register its connectors after reload", name)
        for connector in new_connectors:
            await host.start_connector(connector, owner=name)  # make before break
        middleware: list[tuple[str, Middleware]] = []
        host.dispatcher.call_sync_plugin(
            name, "register_middleware", host=host, register=lambda f: middleware.append((name, f))
        )
        host.set_middleware([*[(p, f) for p, f in host.middleware if p != name], *middleware])
        # The plugin is complete again: open its gate before stopping the old connectors, whose
        # stop waits for the events they are handling, which may be waiting at this very gate.
        host.dispatcher.resume(name)
        for connector in old_connectors:
            await host.stop_connector(connector)


def _module_roots(module: str | None, old: PluginRecord | None) -> tuple[str, ...]:
    roots = set(old.module_roots if old else ())
    if module:
        roots.add(module.split(":")[0].split(".")[0])
    return tuple(sorted(roots))


def _detach_modules(roots: tuple[str, ...]) -> dict[str, ModuleType]:
    """Remove the plugin's modules from ``sys.modules`` (returned, so they can be put back)."""
    detached = {}
    for key in list(sys.modules):
        if any(key == root or key.startswith(root + ".") for root in roots):
            detached[key] = sys.modules.pop(key)
    return detached


def send_control_command(path: str, command: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one command to a running host's control socket and return its JSON answer (blocking)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(command).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
