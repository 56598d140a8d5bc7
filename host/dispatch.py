"""The one place hooks are called.

Nothing else in the host touches ``pm.hook``. For each call the dispatcher walks the hook's
implementations itself (rather than letting pluggy call them all in one go) so that each one is
isolated:

* an implementation that raises is logged with its plugin name and the request id, counted, and the
  next implementation still runs;
* an ``async def`` implementation (or a sync one returning an awaitable) runs under its timeout and is
  cancelled when it exceeds it; a synchronous implementation cannot be interrupted, so it is only timed
  (and a warning logged when it blocked the event loop past its timeout);
* latency and failures are recorded per (plugin, hook) in ``statistics()``;
* the number of calls in flight per plugin is tracked, and a plugin can be paused (no new calls), which
  is what hot reload needs to drain a single plugin.

Timeouts resolve as ``[host.plugin_timeouts.<plugin>] <hook>``, then ``[host.timeouts] <hook>``, then
``DEFAULT_TIMEOUTS``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from host.logs import current_plugin, logger
from host.metrics import HookStats

if TYPE_CHECKING:
    from host.config import HostSection
    from host.plugins import PluginManager

__all__ = ["DEFAULT_TIMEOUTS", "Dispatcher", "Outcome"]

#: Seconds, per hook. Registration hooks are synchronous and untimed.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "on_startup": 30.0,
    "on_shutdown": 10.0,
    "on_message": 30.0,
    "on_event": 30.0,
    "on_audit": 5.0,
}


@dataclass(slots=True)
class Outcome:
    """The result of one implementation: a value, or the error / timeout that replaced it."""

    plugin: str
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


@dataclass(slots=True)
class _Impl:
    plugin: str
    function: Any
    argnames: tuple[str, ...]
    is_async: bool
    timeout: float
    stats: HookStats


class Dispatcher:
    """Calls hooks with per-implementation isolation, timeouts and timing."""

    def __init__(self, plugins: PluginManager, settings: HostSection | None = None) -> None:
        self.plugins = plugins
        self.settings = settings
        self._stats: dict[tuple[str, str], HookStats] = {}
        self._cache: dict[str, list[_Impl]] = {}
        self._cache_generation = -1
        self.inflight: dict[str, int] = {}
        self.paused: set[str] = set()
        self._idle = trio.Event()

    # -- configuration -----------------------------------------------------------------------

    def timeout_for(self, plugin: str, hook: str) -> float:
        if self.settings is not None:
            per_plugin = self.settings.plugin_timeouts.get(plugin, {})
            if hook in per_plugin:
                return per_plugin[hook]
            if hook in self.settings.timeouts:
                return self.settings.timeouts[hook]
        return DEFAULT_TIMEOUTS.get(hook, 30.0)

    def _impls(self, hook: str) -> list[_Impl]:
        if self._cache_generation != self.plugins.generation:
            self._cache.clear()
            self._cache_generation = self.plugins.generation
        impls = self._cache.get(hook)
        if impls is None:
            caller = getattr(self.plugins.pm.hook, hook)
            impls = []
            # pluggy calls implementations last-registered first; keep its order.
            for hi in reversed(caller.get_hookimpls()):
                key = (hi.plugin_name, hook)
                stats = self._stats.setdefault(key, HookStats())
                impls.append(
                    _Impl(
                        plugin=hi.plugin_name,
                        function=hi.function,
                        argnames=tuple(hi.argnames),
                        is_async=inspect.iscoroutinefunction(hi.function),
                        timeout=self.timeout_for(hi.plugin_name, hook),
                        stats=stats,
                    )
                )
            self._cache[hook] = impls
        return impls

    def implementers(self, hook: str) -> list[str]:
        return [i.plugin for i in self._impls(hook)]

    # -- calls -------------------------------------------------------------------------------

    def call_sync(self, hook: str, **kwargs: Any) -> list[Outcome]:
        """Call a synchronous hook (registration hooks). Awaitable results are an error."""
        outcomes = []
        for impl in self._impls(hook):
            token = current_plugin.set(impl.plugin)
            start = time.perf_counter()
            try:
                value = impl.function(*[kwargs[a] for a in impl.argnames])
                if inspect.isawaitable(value):
                    if inspect.iscoroutine(value):
                        value.close()
                    raise TypeError(f"{hook} must be synchronous, {impl.plugin} returned an awaitable")
                outcomes.append(Outcome(impl.plugin, value))
            except Exception as exc:
                impl.stats.errors += 1
                self._log_failure(impl.plugin, hook, exc)
                outcomes.append(Outcome(impl.plugin, error=exc))
            finally:
                impl.stats.observe(time.perf_counter() - start)
                current_plugin.reset(token)
        return outcomes

    async def call(self, hook: str, **kwargs: Any) -> list[Outcome]:
        """Call every implementation of ``hook`` in order, each isolated. Never raises for them."""
        outcomes = []
        for impl in self._impls(hook):
            if impl.plugin in self.paused:
                continue
            outcomes.append(await self._call_one(impl, hook, kwargs))
        return outcomes

    async def call_plugin(self, plugin: str, hook: str, **kwargs: Any) -> Outcome | None:
        """Call one plugin's implementation of ``hook`` (``None`` if it has none)."""
        for impl in self._impls(hook):
            if impl.plugin == plugin:
                return await self._call_one(impl, hook, kwargs)
        return None

    async def _call_one(self, impl: _Impl, hook: str, kwargs: dict[str, Any]) -> Outcome:
        plugin = impl.plugin
        token = current_plugin.set(plugin)
        self.inflight[plugin] = self.inflight.get(plugin, 0) + 1
        start = time.perf_counter()
        try:
            if impl.is_async:
                with trio.move_on_after(impl.timeout) as scope:
                    value = await impl.function(*[kwargs[a] for a in impl.argnames])
                if scope.cancelled_caught:
                    return self._timed_out(impl, hook)
            else:
                value = impl.function(*[kwargs[a] for a in impl.argnames])
                if isinstance(value, Awaitable):
                    with trio.move_on_after(impl.timeout) as scope:
                        value = await value
                    if scope.cancelled_caught:
                        return self._timed_out(impl, hook)
                elif time.perf_counter() - start > impl.timeout:
                    logger.warning(
                        "plugin {} blocked the event loop in {} for {:.1f}s (timeout {}s); "
                        "make it async",
                        plugin,
                        hook,
                        time.perf_counter() - start,
                        impl.timeout,
                    )
            return Outcome(plugin, value)
        except Exception as exc:
            impl.stats.errors += 1
            self._log_failure(plugin, hook, exc)
            return Outcome(plugin, error=exc)
        finally:
            impl.stats.observe(time.perf_counter() - start)
            remaining = self.inflight[plugin] = self.inflight[plugin] - 1
            if remaining == 0 and plugin in self.paused:
                self._wake_idle()
            current_plugin.reset(token)

    def _timed_out(self, impl: _Impl, hook: str) -> Outcome:
        impl.stats.timeouts += 1
        logger.error(
            "plugin {} timed out in {} after {}s; skipped", impl.plugin, hook, impl.timeout
        )
        return Outcome(impl.plugin, timed_out=True)

    @staticmethod
    def _log_failure(plugin: str, hook: str, exc: BaseException) -> None:
        logger.opt(exception=exc).error(
            "plugin {} raised in {}: {}: {}", plugin, hook, type(exc).__name__, exc
        )

    # -- hot-reload support ------------------------------------------------------------------

    def pause(self, plugin: str) -> None:
        """Stop routing new calls to ``plugin`` (calls in flight continue)."""
        self.paused.add(plugin)

    def resume(self, plugin: str) -> None:
        self.paused.discard(plugin)

    async def wait_plugin_idle(self, plugin: str, timeout: float) -> bool:
        """Wait until ``plugin`` has no call in flight; ``False`` if ``timeout`` passed first."""
        with trio.move_on_after(timeout):
            while self.inflight.get(plugin, 0) > 0:
                self._idle = trio.Event()
                await self._idle.wait()
            return True
        return False

    def _wake_idle(self) -> None:
        self._idle.set()

    # -- introspection -----------------------------------------------------------------------

    def statistics(self) -> dict[tuple[str, str], HookStats]:
        """Live per-(plugin, hook) latency and failure counters (not a copy)."""
        return self._stats

