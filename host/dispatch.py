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
import math
import time
import types
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import trio

from host.logs import current_plugin, logger
from host.metrics import HookStats

if TYPE_CHECKING:
    from host.config import HostSection
    from host.plugins import PluginManager

__all__ = ["DEFAULT_TIMEOUTS", "Dispatcher", "Outcome"]

# Results that are certainly not awaitable (checked by exact type: ABC isinstance checks are slow).
_PLAIN_RESULTS = frozenset({str, bool, int, float, list, tuple, dict})

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
        return self._call_sync_impls(self._impls(hook), hook, kwargs)

    def _call_sync_impls(self, impls: list[_Impl], hook: str, kwargs: dict[str, Any]) -> list[Outcome]:
        outcomes = []
        for impl in impls:
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

    def call_sync_plugin(self, plugin: str, hook: str, **kwargs: Any) -> Outcome | None:
        """Call one plugin's implementation of a synchronous hook (``None`` if it has none)."""
        impls = [i for i in self._impls(hook) if i.plugin == plugin]
        return self._call_sync_impls(impls, hook, kwargs)[0] if impls else None

    async def call(self, hook: str, **kwargs: Any) -> list[Outcome]:
        """Call every implementation of ``hook`` in order, each isolated. Never raises for them."""
        return await self._call_all(self._impls(hook), hook, kwargs)

    async def call_plugin(self, plugin: str, hook: str, **kwargs: Any) -> Outcome | None:
        """Call one plugin's implementation of ``hook`` (``None`` if it has none)."""
        impls = [i for i in self._impls(hook) if i.plugin == plugin]
        outcomes = await self._call_all(impls, hook, kwargs, include_paused=True)
        return outcomes[0] if outcomes else None

    async def _call_all(
        self, impls: list[_Impl], hook: str, kwargs: dict[str, Any], include_paused: bool = False
    ) -> list[Outcome]:
        # Timeouts: one cancel scope for the whole call, its deadline armed only while an
        # implementation is actually blocked. Trio charges several microseconds to enter a scope or
        # move a deadline, so a scope per implementation would dominate the cost of trivial hooks.
        outcomes: list[Outcome] = []
        if not any(impl.is_async for impl in impls):
            for impl in impls:
                if impl.plugin not in self.paused or include_paused:
                    outcomes.append(await self._call_one(impl, hook, kwargs, None))
            return outcomes
        index, count = 0, len(impls)
        while index < count:
            with trio.CancelScope() as scope:
                while index < count:
                    impl = impls[index]
                    index += 1
                    if impl.plugin in self.paused and not include_paused:
                        continue
                    outcomes.append(await self._call_one(impl, hook, kwargs, scope))
                    # Only an implementation that blocked can have hit the deadline (and this
                    # property is not free: it reads the clock).
                    if scope.deadline != math.inf and scope.cancel_called:
                        # It swallowed our Cancelled: still a timeout.
                        outcomes.pop()
                        break
            if scope.cancelled_caught or (scope.deadline != math.inf and scope.cancel_called):
                outcomes.append(self._timed_out(impls[index - 1], hook))
        return outcomes

    async def _call_one(
        self, impl: _Impl, hook: str, kwargs: dict[str, Any], scope: trio.CancelScope | None
    ) -> Outcome:
        plugin = impl.plugin
        token = current_plugin.set(plugin)
        inflight = self.inflight
        inflight[plugin] = inflight.get(plugin, 0) + 1
        start = time.perf_counter()
        try:
            value = impl.function(*[kwargs[a] for a in impl.argnames])
            if value is None or type(value) in _PLAIN_RESULTS:
                pass
            elif type(value) is CoroutineType and scope is not None:
                # Run the first step eagerly: most implementations finish without blocking, and
                # then no deadline needs arming at all.
                try:
                    trap = value.send(None)
                except StopIteration as done:
                    value = done.value
                else:
                    scope.deadline = trio.current_time() + impl.timeout
                    try:
                        value = await _resume(value, trap)
                    finally:
                        if not scope.cancel_called:
                            scope.deadline = math.inf
            elif hasattr(type(value), "__await__"):
                if scope is None:
                    # A sync implementation returned an awaitable that has not started yet.
                    with trio.move_on_after(impl.timeout) as own_scope:
                        value = await value
                    if own_scope.cancelled_caught:
                        return self._timed_out(impl, hook)
                else:
                    scope.deadline = trio.current_time() + impl.timeout
                    try:
                        value = await value
                    finally:
                        if not scope.cancel_called:
                            scope.deadline = math.inf
            elif time.perf_counter() - start > impl.timeout:
                logger.warning(
                    "plugin {} blocked the event loop in {} for {:.1f}s (timeout {}s); make it async",
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
            remaining = inflight[plugin] = inflight[plugin] - 1
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

    def hold(self, plugin: str) -> None:
        """Count work of ``plugin`` that outlives its hook call (a streamed reply being read)."""
        self.inflight[plugin] = self.inflight.get(plugin, 0) + 1

    def release(self, plugin: str) -> None:
        remaining = self.inflight[plugin] = self.inflight.get(plugin, 1) - 1
        if remaining <= 0 and plugin in self.paused:
            self._wake_idle()

    def pause(self, plugin: str) -> None:
        """Stop routing new calls to ``plugin`` (calls in flight continue)."""
        self.paused.add(plugin)

    def resume(self, plugin: str) -> None:
        self.paused.discard(plugin)

    async def wait_plugin_idle(self, plugin: str, deadline_seconds: float) -> bool:
        """Wait until ``plugin`` has no call in flight; ``False`` if ``deadline_seconds`` passed first."""
        with trio.move_on_after(deadline_seconds):
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



@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], trap: Any) -> Generator[Any, Any, Any]:
    """Continue driving a coroutine whose first step already ran, yielding its traps to trio."""
    while True:
        try:
            sent = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                trap = coro.send(sent)
            except StopIteration as done:
                return done.value
