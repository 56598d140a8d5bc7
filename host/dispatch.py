"""The one place hooks are called.

Nothing else in the host touches ``pm.hook``. For each call the dispatcher walks the hook's
implementations itself (rather than letting pluggy call them all in one go) so that each one is
isolated:

* an implementation that raises is logged with its plugin name and the request id, counted, and the
  next implementation still runs. That includes ``SystemExit`` (``sys.exit()`` in a plugin) and any
  other ``BaseException`` of the plugin's; only trio's ``Cancelled``, ``KeyboardInterrupt`` and
  ``GeneratorExit`` propagate (``host.plugins.escaped_from_plugin``);
* an ``async def`` implementation (or a sync one returning an awaitable) runs under its timeout and is
  cancelled when it exceeds it; a synchronous implementation cannot be interrupted, so it is only timed
  (and a warning logged when it blocked the event loop past its timeout);
* latency and failures are recorded per (plugin, hook) in ``statistics()``;
* the number of calls in flight per plugin is tracked, and a plugin can be paused, which is what hot
  reload needs to drain a single plugin. A call counts as in flight while it waits: one that runs to
  completion without yielding to the event loop cannot be seen by any other task. An ``on_message``
  implementation that returns a stream (an async iterator) stays in flight until the host has read
  it: the outcome is ``held`` and the caller releases it (``release``).
* a call that reaches a paused plugin waits at the plugin's gate until ``resume`` (the reload is over),
  then calls whatever implementation the plugin has by then: the new version, the old one after a
  rollback, none if it was removed. The wait is bounded by ``[host.reload] drain_timeout`` + 30 s.
  ``call_plugin`` (the reload's own ``on_startup``/``on_shutdown``) goes through.

Cost: the per-call work is precomputed per implementation (``_Impl``) and done once per call where
possible (one clock read per implementation, one context-variable reset per call). A hook with an
``async def`` implementation that contains an ``await`` pays for one trio cancel scope per call (7-11
microseconds on the 2-core machine, more than the rest of a trivial call): its first step may open
scopes of its own, which must nest inside ours, and nothing tells in advance whether it will block.
The scope's deadline is armed only when an implementation actually blocks. An ``async def`` with no
``await`` at all cannot block (nor time out), so it runs like a synchronous implementation, without
a scope. ``benchmarks/host_dispatch.py`` measures both kinds against pluggy's own hook call.

Timeouts resolve as ``[host.plugin_timeouts.<plugin>] <hook>``, then ``[host.timeouts] <hook>``, then
``DEFAULT_TIMEOUTS``.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import math
import time
import types
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Coroutine, Generator
from dataclasses import dataclass
from operator import itemgetter
from types import CoroutineType
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from host.logs import current_plugin, logger
from host.metrics import LATENCY_BUCKETS, HookStats
from host.plugins import escaped_from_plugin

if TYPE_CHECKING:
    from host.config import HostSection
    from host.plugins import PluginManager

__all__ = ["DEFAULT_TIMEOUTS", "Dispatcher", "Outcome"]

# Results that are certainly not awaitable (checked by exact type: ABC isinstance checks are slow).
_PLAIN_RESULTS = frozenset({str, bool, int, float, list, tuple, dict})
# Upper bound of the first latency bucket: where nearly every observation lands.
_FIRST_BUCKET = LATENCY_BUCKETS[0]
# Stands in for the call-wide cancel scope when no implementation of a hook is ``async def``.
_NO_SCOPE = contextlib.nullcontext()
# What ``Dispatcher._wait`` returns when an awaitable hit its own (not call-wide) deadline.
_TIMED_OUT: Any = object()
# The opcodes through which a coroutine can suspend (``await``, ``async for``, ``async with``; every
# suspension goes through one of them on CPython 3.11+). A coroutine whose own code has none of them
# runs to its end in one step.
_SUSPENDING_OPCODES = frozenset(
    dis.opmap[name]
    for name in ("YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH")
    if name in dis.opmap
)

#: Seconds, per hook. Registration hooks are synchronous and untimed.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "on_startup": 30.0,
    "on_shutdown": 10.0,
    "on_message": 30.0,
    "on_event": 30.0,
    "on_audit": 5.0,
}


class Outcome(msgspec.Struct):
    """The result of one implementation: a value, or the error / timeout that replaced it.

    (A msgspec Struct rather than a dataclass: one is built per implementation per call, and its
    constructor costs about half as much.)
    """

    plugin: str
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    #: ``value`` is a stream (async iterator) from ``on_message``: the plugin counts as in flight
    #: until the caller calls ``Dispatcher.release(plugin)`` (after reading it, or dropping it).
    held: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


class _Impl:
    """One plugin's implementation of one hook, with everything a call needs precomputed."""

    __slots__ = (
        "argnames", "args_of", "function", "instant", "is_async", "none", "plugin", "single_arg", "stats", "timeout"
    )

    def __init__(
        self,
        plugin: str,
        function: Callable[..., Any],
        argnames: tuple[str, ...],
        timeout: float,
        stats: HookStats,
    ) -> None:
        self.plugin = plugin
        self.function = function
        self.argnames = argnames
        # Most hooks take one argument: index the call's kwargs directly. Otherwise a C-level
        # getter builds the positional tuple (a list comprehension costs a frame per call).
        self.single_arg: str | None = argnames[0] if len(argnames) == 1 else None
        self.args_of: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            itemgetter(*argnames) if len(argnames) > 1 else _no_args
        )
        self.is_async = inspect.iscoroutinefunction(function)
        #: ``async def`` without a single ``await``: it cannot block, so it cannot time out either.
        #: The dispatcher runs it to its end like a synchronous implementation, with no cancel scope.
        self.instant = self.is_async and _cannot_suspend(function)
        self.timeout = timeout
        self.stats = stats
        # The outcome "ran fine, returned None", by far the most common one, built once: callers
        # only read outcomes (``held`` is only ever set on a stream's own outcome).
        self.none = Outcome(plugin)


def _no_args(kwargs: dict[str, Any]) -> tuple[()]:
    return ()


def _cannot_suspend(function: Callable[..., Any]) -> bool:
    """Whether calling the coroutine function ``function`` runs it to its end in one step.

    Reads the code the call runs (a bound method's function's; a decorator's wrapper's, not what it
    wraps): only an ``await``, ``async for`` or ``async with`` in it can suspend the coroutine. Code
    this cannot read counts as able to suspend.
    """
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None or "YIELD_VALUE" not in dis.opmap:  # an interpreter this does not know
        return False
    return not any(instruction.opcode in _SUSPENDING_OPCODES for instruction in dis.get_instructions(code))


@dataclass(slots=True)
class _Hook:
    """The implementations of one hook in call order, and whether any of them can block (is
    ``async def`` with an ``await``): only then does a call need a cancel scope."""

    impls: list[_Impl]
    needs_scope: bool


class Dispatcher:
    """Calls hooks with per-implementation isolation, timeouts and timing."""

    def __init__(self, plugins: PluginManager, settings: HostSection | None = None) -> None:
        self.plugins = plugins
        self.settings = settings
        self._stats: dict[tuple[str, str], HookStats] = {}
        self._cache: dict[str, _Hook] = {}
        self._cache_generation = -1
        #: Calls in progress per plugin, counted while they wait (see the module docstring).
        self.inflight: dict[str, int] = {}
        self.paused: set[str] = set()
        self._gates: dict[str, trio.Event] = {}  # per paused plugin, set by ``resume``
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

    def _hook(self, hook: str) -> _Hook:
        if self._cache_generation != self.plugins.generation:
            self._cache.clear()
            self._cache_generation = self.plugins.generation
        entry = self._cache.get(hook)
        if entry is None:
            caller = getattr(self.plugins.pm.hook, hook)
            impls = []
            # pluggy calls implementations last-registered first; keep its order.
            for hi in reversed(caller.get_hookimpls()):
                stats = self._stats.setdefault((hi.plugin_name, hook), HookStats())
                impls.append(
                    _Impl(
                        plugin=hi.plugin_name,
                        function=hi.function,
                        argnames=tuple(hi.argnames),
                        timeout=self.timeout_for(hi.plugin_name, hook),
                        stats=stats,
                    )
                )
            entry = self._cache[hook] = _Hook(impls, any(_needs_scope(impl) for impl in impls))
        return entry

    def implementers(self, hook: str) -> list[str]:
        return [i.plugin for i in self._hook(hook).impls]

    # -- calls -------------------------------------------------------------------------------

    def call_sync(self, hook: str, **kwargs: Any) -> list[Outcome]:
        """Call a synchronous hook (registration hooks). Awaitable results are an error."""
        return self._call_sync_impls(self._hook(hook).impls, hook, kwargs)

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
            except BaseException as exc:  # even sys.exit() in a plugin is only that plugin's failure
                if not escaped_from_plugin(exc):
                    raise
                impl.stats.errors += 1
                self._log_failure(impl.plugin, hook, exc)
                outcomes.append(Outcome(impl.plugin, error=exc))
            finally:
                impl.stats.observe(time.perf_counter() - start)
                current_plugin.reset(token)
        return outcomes

    def call_sync_plugin(self, plugin: str, hook: str, **kwargs: Any) -> Outcome | None:
        """Call one plugin's implementation of a synchronous hook (``None`` if it has none)."""
        impls = [i for i in self._hook(hook).impls if i.plugin == plugin]
        return self._call_sync_impls(impls, hook, kwargs)[0] if impls else None

    async def call(self, hook: str, **kwargs: Any) -> list[Outcome]:
        """Call every implementation of ``hook`` in order, each isolated. Never raises for them."""
        entry = self._hook(hook)
        return await self._call_all(entry.impls, entry.needs_scope, hook, kwargs, False)

    async def call_plugin(self, plugin: str, hook: str, **kwargs: Any) -> Outcome | None:
        """Call one plugin's implementation of ``hook`` (``None`` if it has none)."""
        impls = [i for i in self._hook(hook).impls if i.plugin == plugin]
        needs_scope = any(_needs_scope(impl) for impl in impls)
        outcomes = await self._call_all(impls, needs_scope, hook, kwargs, True)
        return outcomes[0] if outcomes else None

    async def _call_all(
        self, impls: list[_Impl], needs_scope: bool, hook: str, kwargs: dict[str, Any], include_paused: bool
    ) -> list[Outcome]:
        # Timeouts: one cancel scope for the whole call (entered only when an implementation is
        # ``async def`` with an ``await``: its first step may open scopes of its own, which must
        # nest inside ours), its deadline armed only while an implementation is actually blocked.
        # Trio charges microseconds to enter a scope or move a deadline, more than a trivial hook
        # costs. After a timeout the scope is spent, so the remaining implementations get a fresh one.
        outcomes: list[Outcome] = []
        count = len(impls)
        if not count:
            return outcomes
        paused: Container[str] = () if include_paused else self.paused
        hold_streams = hook == "on_message"
        clock = time.perf_counter
        set_plugin = current_plugin.set
        index = 0
        waited = False  # did the last implementation run block (only then can a deadline fire)
        token = set_plugin(impls[0].plugin)
        try:
            while index < count:
                scope = _CancelScope() if needs_scope else None
                with scope if scope is not None else _NO_SCOPE:
                    # One clock read per implementation: each one's latency runs from the end of
                    # the previous one.
                    start = clock()
                    while index < count:
                        impl = impls[index]
                        index += 1
                        plugin = impl.plugin
                        if plugin in paused:
                            current = await self._through_gate(hook, impl)
                            if current is None:
                                continue
                            impl = current
                            start = clock()  # the time at the gate is not the plugin's latency
                        set_plugin(plugin)
                        waited = False
                        try:
                            single = impl.single_arg
                            if single is not None:
                                value = impl.function(kwargs[single])
                            else:
                                value = impl.function(*impl.args_of(kwargs))
                            if value is None or type(value) in _PLAIN_RESULTS:
                                pass
                            elif impl.instant and type(value) is CoroutineType:
                                # No ``await`` in it: its one step is the whole call.
                                try:
                                    value.send(None)
                                except StopIteration as done:
                                    value = done.value
                                else:  # pragma: no cover (it has nothing to suspend with)
                                    value.close()
                                    raise RuntimeError(f"{plugin}'s {hook} suspended without an await")
                            elif type(value) is CoroutineType and scope is not None:
                                # Run the first step eagerly: most implementations finish without
                                # blocking, and then no deadline needs arming at all.
                                try:
                                    trap = value.send(None)
                                except StopIteration as done:
                                    value = done.value
                                else:
                                    waited = True
                                    value = await self._wait(impl, _resume(value, trap), scope)
                            elif hasattr(type(value), "__await__"):
                                waited = True
                                value = await self._wait(impl, value, scope)
                            if value is None:
                                outcome = impl.none
                            elif (
                                hold_streams
                                and type(value) not in _PLAIN_RESULTS
                                and isinstance(value, AsyncIterator)  # what the host streams
                            ):
                                # A stream: the plugin's code runs while the host reads it, so a
                                # reload must wait for it from now on (no gap before the reading).
                                self.hold(plugin)
                                outcome = Outcome(plugin, value, held=True)
                            else:
                                outcome = Outcome(plugin, value)
                        except BaseException as exc:  # SystemExit & co too (not Cancelled: ours)
                            if not escaped_from_plugin(exc):
                                raise
                            impl.stats.errors += 1
                            self._log_failure(plugin, hook, exc)
                            outcome = Outcome(plugin, error=exc)
                        finally:
                            end = clock()
                            elapsed = end - start
                            start = end
                            # HookStats.observe, inlined (a method call is a measurable share here);
                            # almost every call lands in the first bucket, which needs no search.
                            stats = impl.stats
                            stats.count += 1
                            stats.total_seconds += elapsed
                            if elapsed <= _FIRST_BUCKET:
                                stats.buckets[0] += 1
                            else:
                                stats.buckets[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
                            if elapsed > impl.timeout and not waited:
                                self._log_blocked(impl, hook, elapsed)
                        if waited:
                            if scope is not None:
                                if scope.cancel_called:
                                    break  # it swallowed our Cancelled: still a timeout (below)
                            elif outcome.value is _TIMED_OUT:
                                outcome = self._timed_out(impl, hook)
                        outcomes.append(outcome)
                if waited and scope is not None and scope.cancel_called:
                    # The implementation before ``index`` hit its deadline (and let our Cancelled
                    # through, or swallowed it).
                    outcomes.append(self._timed_out(impls[index - 1], hook))
        finally:
            current_plugin.reset(token)
        return outcomes

    async def _through_gate(self, hook: str, impl: _Impl) -> _Impl | None:
        """``impl``'s plugin is being reloaded: wait until it is resumed, then return its current
        implementation of ``hook`` (``None``: it has none any more, or the wait exceeded its bound)."""
        plugin = impl.plugin
        with trio.move_on_after(self.gate_bound()):
            while plugin in self.paused:
                await self._gates.setdefault(plugin, trio.Event()).wait()
            for current in self._hook(hook).impls:
                if current.plugin == plugin:
                    return current
            return None
        logger.warning(
            "plugin {} is still being reloaded after {:.0f}s; {} skips it", plugin, self.gate_bound(), hook
        )
        return None

    def gate_bound(self) -> float:
        """How long a call waits at a reloading plugin's gate at most (``drain_timeout`` + 30 s)."""
        drain = self.settings.reload.drain_timeout if self.settings is not None else 30.0
        return drain + 30.0

    async def _wait(self, impl: _Impl, awaitable: Awaitable[Any], scope: trio.CancelScope | None) -> Any:
        """Await a blocked implementation under its deadline, counting it in flight meanwhile."""
        plugin = impl.plugin
        inflight = self.inflight
        inflight[plugin] = inflight.get(plugin, 0) + 1
        try:
            if scope is None:
                # No call-wide scope (no ``async def`` implementation of this hook): this awaitable
                # has not started yet, so a scope of its own nests correctly.
                with trio.move_on_after(impl.timeout):
                    return await awaitable
                return _TIMED_OUT
            scope.deadline = trio.current_time() + impl.timeout
            try:
                return await awaitable
            finally:
                if not scope.cancel_called:
                    scope.deadline = math.inf
        finally:
            remaining = inflight[plugin] = inflight[plugin] - 1
            if remaining == 0 and plugin in self.paused:
                self._wake_idle()

    def _timed_out(self, impl: _Impl, hook: str) -> Outcome:
        impl.stats.timeouts += 1
        logger.error(
            "plugin {} timed out in {} after {}s; skipped", impl.plugin, hook, impl.timeout
        )
        return Outcome(impl.plugin, timed_out=True)

    @staticmethod
    def _log_blocked(impl: _Impl, hook: str, elapsed: float) -> None:
        logger.warning(
            "plugin {} blocked the event loop in {} for {:.1f}s (timeout {}s); make it async",
            impl.plugin,
            hook,
            elapsed,
            impl.timeout,
        )

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
        """Hold new calls to ``plugin`` at its gate (calls in flight continue)."""
        self.paused.add(plugin)
        self._gates.setdefault(plugin, trio.Event())

    def resume(self, plugin: str) -> None:
        """Open ``plugin``'s gate: the calls waiting there go on."""
        self.paused.discard(plugin)
        gate = self._gates.pop(plugin, None)
        if gate is not None:
            gate.set()

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



def _needs_scope(impl: _Impl) -> bool:
    return impl.is_async and not impl.instant


# A module-level name: one lookup less per call, and what the tests count scopes with.
_CancelScope = trio.CancelScope


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
