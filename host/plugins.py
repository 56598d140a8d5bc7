"""Plugin discovery and registration.

Plugins are found through entry points in the group ``host.plugins``; the entry point's name is the
plugin's name and its value a module (or object) holding ``@hookimpl`` functions. We run our own
loading loop instead of ``pluggy.PluginManager.load_setuptools_entrypoints`` because that one aborts
everything on the first broken plugin: here each plugin is loaded on its own, and one that fails to
import, whose hooks do not match the specs, or whose declared host API range excludes this host, is
recorded as ``failed``/``incompatible`` with the reason and skipped while the others load.

A plugin declares the host API it supports with a module attribute, a PEP 440 specifier::

    host_api = ">=1.0,<2"

Plugins without it are assumed compatible with the current major version.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy
import trio
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from host import hookspecs
from host.config import redact
from host.errors import IncompatiblePlugin, PluginError
from host.logs import logger

__all__ = [
    "ENTRY_POINT_GROUP",
    "HOST_API_VERSION",
    "PluginManager",
    "PluginRecord",
    "PluginState",
    "escaped_from_plugin",
]

ENTRY_POINT_GROUP = "host.plugins"
#: The version of the hook API plugins are written against. Bump the major on a breaking change.
HOST_API_VERSION = "1.0"

PluginState = Literal["loaded", "failed", "disabled", "incompatible"]


@dataclass
class PluginRecord:
    """What the host knows of one plugin, loaded or not."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    state: PluginState = "loaded"
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    obj: Any = field(default=None, repr=False)
    host_api: str | None = None
    #: Where the plugin came from, for hot reload: ``entry_point`` (value ``module:attr``),
    #: ``dropin`` (a file or package in the drop-in directory) or ``object`` (added in-process).
    source: str = "object"
    #: Top-level module name(s) whose ``sys.modules`` entries belong to this plugin.
    module_roots: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "state": self.state,
            "error": self.error,
            "hooks": self.hooks,
            "host_api": self.host_api,
        }


#: What ends a host's own work and must propagate through plugin code: trio's cancellation, Ctrl-C
#: delivered by trio when the host runs without the CLI's signal handling (embedded, in tests), and the
#: ``GeneratorExit`` that closes a suspended coroutine (resuming the next plugin then would be an error).
_HOST_EXITS = (trio.Cancelled, KeyboardInterrupt, GeneratorExit)


def escaped_from_plugin(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of plugin code, is that plugin's failure to isolate (log, count,
    apologize) rather than the host's own exit, which must propagate.

    ``SystemExit`` (``sys.exit()`` in a plugin) and any other ``BaseException`` subclass a plugin
    raises are its failure: one plugin must not stop the bot. Not trio's ``Cancelled``,
    ``KeyboardInterrupt`` or ``GeneratorExit`` (alone or in an exception group): see ``_HOST_EXITS``.
    """
    if isinstance(exc, BaseExceptionGroup):
        host_exits, _rest = exc.split(_HOST_EXITS)
        return host_exits is None
    return not isinstance(exc, _HOST_EXITS)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginManager:
    """Loads plugins into a pluggy manager and keeps a record of each, failed ones included."""

    def __init__(self, *, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.pm = pluggy.PluginManager("host")
        self.pm.add_hookspecs(hookspecs)
        self.allow = set(allow)
        self.deny = set(deny)
        self.records: dict[str, PluginRecord] = {}
        #: Called with (record) after every state change; the runtime audits and re-counts.
        self.listeners: list[Callable[[PluginRecord], None]] = []
        self.generation = 0

    # -- discovery ---------------------------------------------------------------------------

    @staticmethod
    def entry_points() -> list[md.EntryPoint]:
        return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)

    def load_entry_points(self) -> list[PluginRecord]:
        """Load every installed plugin; never raises for a single broken plugin."""
        loaded = []
        seen: set[str] = set()
        for ep in self.entry_points():
            if ep.name in seen:
                # Two distributions claim the same name: the first (sorted) wins, loudly.
                logger.error("plugin name {!r} is provided twice; ignoring {}", ep.name, ep.value)
                continue
            seen.add(ep.name)
            dist = ep.dist
            loaded.append(
                self.load(
                    ep.name,
                    ep.load,
                    distribution=dist.metadata["Name"] if dist is not None else None,
                    version=dist.version if dist is not None else None,
                    module=ep.value,
                    source="entry_point",
                )
            )
        return loaded

    @staticmethod
    def find_entry_point(name: str) -> md.EntryPoint | None:
        """The installed entry point named ``name`` now (metadata re-read from disk)."""
        for ep in PluginManager.entry_points():
            if ep.name == name:
                return ep
        return None

    def is_enabled(self, name: str) -> bool:
        if name in self.deny:
            return False
        return not self.allow or name in self.allow

    def load(
        self,
        name: str,
        loader: Callable[[], Any],
        *,
        distribution: str | None = None,
        version: str | None = None,
        module: str | None = None,
        source: str = "object",
    ) -> PluginRecord:
        """Import (via ``loader``), check and register one plugin. Failures become a record."""
        record = PluginRecord(name, distribution, version, module, source=source)
        if module:
            record.module_roots = (module.split(":")[0].split(".")[0],)
        if not self.is_enabled(name):
            record.state = "disabled"
            record.error = (
                "denied by the deny-list" if name in self.deny else "not in the allow-list"
            )
            return self._set(record)
        try:
            obj = loader()
        except BaseException as exc:  # an import-time sys.exit() fails this plugin, not the host
            if not escaped_from_plugin(exc):
                raise
            record.state, record.error = "failed", f"import failed: {_error_text(exc)}"
            return self._set(record)
        try:
            self.register(name, obj, record)
        except IncompatiblePlugin as exc:
            record.state, record.error = "incompatible", str(exc)
        except PluginError as exc:
            record.state, record.error = "failed", str(exc)
        return self._set(record)

    def add(self, name: str, obj: Any, *, version: str | None = None) -> PluginRecord:
        """Register an in-process plugin object (tests, embedding); raises ``PluginError``."""
        record = PluginRecord(name, None, version, getattr(obj, "__name__", type(obj).__name__))
        if not self.is_enabled(name):
            record.state, record.error = "disabled", "disabled by allow/deny lists"
            return self._set(record)
        self.register(name, obj, record)
        return self._set(record)

    def _set(self, record: PluginRecord) -> PluginRecord:
        if record.error:
            # Error texts come from plugin exceptions; they end up in listings, /admin and audit.
            record.error = redact(record.error)
        self.records[record.name] = record
        if record.state != "loaded":
            log = logger.warning if record.state == "disabled" else logger.error
            log(
                "plugin {} ({} {}) {}: {}",
                record.name,
                record.distribution or "-",
                record.version or "-",
                record.state,
                record.error,
            )
        for listener in self.listeners:
            listener(record)
        return record

    # -- registration ------------------------------------------------------------------------

    def check_host_api(self, name: str, obj: Any) -> str | None:
        spec_text = getattr(obj, "host_api", None)
        if spec_text is None:
            return None
        try:
            spec = SpecifierSet(str(spec_text))
        except InvalidSpecifier:
            raise PluginError(f"plugin {name!r}: invalid host_api specifier {spec_text!r}") from None
        if Version(HOST_API_VERSION) not in spec:
            raise IncompatiblePlugin(
                f"plugin {name!r} supports host API {spec_text}, but this host provides "
                f"{HOST_API_VERSION}; install a version of the plugin whose host_api includes "
                f"{HOST_API_VERSION} (or a host whose API version matches {spec_text})"
            )
        return str(spec_text)

    def validate(self, name: str, obj: Any) -> list[str]:
        """Check ``obj`` against the specs and the host API without registering it; its hooks."""
        self.check_host_api(name, obj)
        scratch = pluggy.PluginManager("host")
        scratch.add_hookspecs(hookspecs)
        return self._register_into(scratch, name, obj)

    def _register_into(self, pm: pluggy.PluginManager, name: str, obj: Any) -> list[str]:
        try:
            pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {name!r} does not match the hook specs: {exc}") from None
        callers = pm.get_hookcallers(obj) or []
        unknown = [hc.name for hc in callers if hc.spec is None]
        if unknown:
            pm.unregister(obj, name=name)
            hints = []
            for hook in unknown:
                close = difflib.get_close_matches(hook, hookspecs.HOOK_NAMES, n=1)
                hints.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise PluginError(f"plugin {name!r} implements unknown hooks: {', '.join(hints)}")
        return sorted(hc.name for hc in callers)

    def register(self, name: str, obj: Any, record: PluginRecord) -> None:
        if self.pm.has_plugin(name):
            raise PluginError(f"plugin {name!r} is already registered")
        record.host_api = self.check_host_api(name, obj)
        self._register_into(self.pm, name, obj)
        record.obj = obj
        record.state = "loaded"
        record.error = None
        record.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(obj) or [])
        for attr, value in inspect.getmembers(obj):
            if (
                attr in hookspecs.HOOK_NAMES
                and callable(value)
                and attr not in record.hooks
            ):
                logger.warning(
                    "plugin {}: {}() looks like a hook but lacks @hookimpl; it will not be called",
                    name,
                    attr,
                )
        self.generation += 1

    def unregister(self, name: str) -> Any:
        """Remove a plugin's hooks; returns the plugin object (for hot reload)."""
        obj = self.pm.unregister(name=name)
        self.generation += 1
        return obj

    def set_record(self, record: PluginRecord) -> PluginRecord:
        """Store a record and notify listeners (used by hot reload)."""
        return self._set(record)

    def mark_failed(self, name: str, error: str) -> None:
        """A loaded plugin failed later (e.g. in ``on_startup``): unregister and record."""
        if self.pm.has_plugin(name):
            self.unregister(name)
        record = self.records.get(name) or PluginRecord(name)
        record.state, record.error, record.obj = "failed", error, None
        self._set(record)

    def loaded(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.state == "loaded"]

    def listing(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in sorted(self.records.values(), key=lambda r: r.name)]


def lists_from_env(environ: Mapping[str, str] | None = None) -> tuple[set[str], set[str]]:
    """``HOST_PLUGINS_ALLOW`` / ``HOST_PLUGINS_DENY`` as sets (comma-separated names)."""
    environ = os.environ if environ is None else environ

    def split(var: str) -> set[str]:
        return {p.strip() for p in environ.get(var, "").split(",") if p.strip()}

    return split("HOST_PLUGINS_ALLOW"), split("HOST_PLUGINS_DENY")
