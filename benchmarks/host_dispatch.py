"""Host overhead per message: dispatch through 5 trivial plugins, no I/O.

Measures, in the same run and process:

* ``pluggy raw``: ``pm.hook.on_message(host=..., message=...)``, pluggy's own hook call (the baseline);
* ``dispatcher``: ``Dispatcher.call("on_message", ...)``, i.e. per-plugin isolation, timeouts, timing
  and in-flight accounting, through the 5 trivial plugins (2 of them ``async def``);
* ``dispatcher, 2 awaiting``: the same, but the 2 ``async def`` plugins ``await`` a coroutine that
  returns at once. An implementation that awaits could block, so the call runs under a trio cancel
  scope (an ``async def`` with no ``await`` cannot block and needs none): this is what a plugin that
  awaits pays on top of a trivial one;
* ``host.handle``: the whole per-message path of a worker: request-id binding, middleware chain,
  dispatch, reply delivery to the in-memory loopback connector, and metrics;
* ``trio CancelScope``: entering and leaving one bare cancel scope, for context.

The series run interleaved in rounds (so a load spike from another process on the machine hits them
all alike); the load average is printed before and after.
Run: ``python benchmarks/host_dispatch.py [--n 20000] [--rounds 10]``.
Goal (issue 2): dispatch p50 <= 15 us and p99 <= 50 us on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from host import hookimpl
from host.config import load_config
from host.loopback import LoopbackConnector
from host.runtime import build_host

GOAL_P50_US = 15.0
GOAL_P99_US = 50.0


class SyncPlugin:
    @hookimpl
    def on_message(self, message):
        return None


class AsyncPlugin:
    @hookimpl
    async def on_message(self, message):
        return None


async def returns_at_once() -> None:
    return None


class AwaitingPlugin:
    @hookimpl
    async def on_message(self, message):
        await returns_at_once()


class Answering:
    @hookimpl
    def on_message(self, message):
        return "ok"


def pct(samples: list[int], q: float) -> float:
    """The ``q`` quantile of nanosecond samples, in microseconds."""
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(q * len(samples)))] / 1000


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


async def measure(n: int, rounds: int) -> None:
    plugins = [("p1", SyncPlugin()), ("p2", AsyncPlugin()), ("p3", SyncPlugin()), ("p4", AsyncPlugin()),
               ("p5", Answering())]
    host = build_host(load_config(data={"logging": {"dir": ""}}, environ={}), plugins=plugins, entry_points=False)
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    message = loopback.make_message("hello")
    message.request_id = "bench"
    pm_hook = host.plugins.pm.hook.on_message
    dispatcher = host.dispatcher
    awaiting_plugins = [("p1", SyncPlugin()), ("p2", AwaitingPlugin()), ("p3", SyncPlugin()),
                        ("p4", AwaitingPlugin()), ("p5", Answering())]
    awaiting_host = build_host(load_config(data={"logging": {"dir": ""}}, environ={}), plugins=awaiting_plugins,
                               entry_points=False)
    awaiting_dispatcher = awaiting_host.dispatcher

    async def sample_raw(count: int, out: list[int]) -> None:
        for _ in range(count):
            t = time.perf_counter_ns()
            coros = pm_hook(host=host, message=message)
            out.append(time.perf_counter_ns() - t)
            for c in coros:  # pluggy does not await async implementations: close them unawaited
                if hasattr(c, "close"):
                    c.close()

    async def sample_dispatch(count: int, out: list[int]) -> None:
        for _ in range(count):
            t = time.perf_counter_ns()
            await dispatcher.call("on_message", host=host, message=message)
            out.append(time.perf_counter_ns() - t)

    async def sample_dispatch_awaiting(count: int, out: list[int]) -> None:
        for _ in range(count):
            t = time.perf_counter_ns()
            await awaiting_dispatcher.call("on_message", host=awaiting_host, message=message)
            out.append(time.perf_counter_ns() - t)

    async def sample_handle(count: int, out: list[int]) -> None:
        for _ in range(count):
            t = time.perf_counter_ns()
            await host.handle(message)
            out.append(time.perf_counter_ns() - t)
            loopback.deliveries.clear()

    async def sample_scope(count: int, out: list[int]) -> None:
        for _ in range(count):
            t = time.perf_counter_ns()
            with trio.CancelScope():  # noqa: ASYNC100 (the cost of the scope itself is the point)
                pass
            out.append(time.perf_counter_ns() - t)

    series: dict[str, Callable[[int, list[int]], Awaitable[None]]] = {
        "pluggy raw hook call": sample_raw,
        "dispatcher (isolated)": sample_dispatch,
        "dispatcher, 2 awaiting": sample_dispatch_awaiting,
        "host.handle (full path)": sample_handle,
        "trio CancelScope in+out": sample_scope,
    }
    for sample in series.values():  # warm up every path
        await sample(max(1, n // 10), [])
    results: dict[str, list[int]] = {label: [] for label in series}
    load_before = load_average()
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for label, sample in series.items():
            await sample(per_round, results[label])
    load_after = load_average()

    print(f"messages per series: {per_round * rounds} in {rounds} interleaved rounds; "
          "5 plugins (2 async, 1 answering)")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}; cpus: {os.cpu_count()}")
    print(f"{'series':<28}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for label, data in results.items():
        print(f"{label:<28}{pct(data, 0.5):>10.2f}{pct(data, 0.99):>10.2f}{statistics.mean(data) / 1000:>10.2f}")
    raw, disp, awaiting, handle = (results[label] for label in list(series)[:4])
    print(f"ratio to pluggy p50: dispatcher {pct(disp, 0.5) / pct(raw, 0.5):.1f}x, "
          f"dispatcher with 2 awaiting {pct(awaiting, 0.5) / pct(raw, 0.5):.1f}x, "
          f"host.handle {pct(handle, 0.5) / pct(raw, 0.5):.1f}x")
    met = pct(disp, 0.5) <= GOAL_P50_US and pct(disp, 0.99) <= GOAL_P99_US
    print(f"goal dispatcher p50 <= {GOAL_P50_US:g} us, p99 <= {GOAL_P99_US:g} us: {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000, help="calls per series")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the calls are split into")
    args = parser.parse_args()
    trio.run(measure, args.n, args.rounds)


if __name__ == "__main__":
    main()
