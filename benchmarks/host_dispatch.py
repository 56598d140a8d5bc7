"""Host overhead per message: dispatch through 5 trivial plugins, no I/O.

Measures, in the same run and process:

* ``pluggy raw``: ``pm.hook.on_message(host=..., message=...)``, pluggy's own hook call (the baseline);
* ``dispatcher``: ``Dispatcher.call("on_message", ...)``, i.e. per-plugin isolation, timeouts (async
  implementations run under a cancel scope), timing and in-flight accounting;
* ``host.handle``: the whole per-message path of a worker: request-id binding, middleware chain,
  dispatch, reply delivery to the in-memory loopback connector, and metrics.

Half the plugins are ``async def``. Run: ``python benchmarks/host_dispatch.py [--n 20000]``.
Goal (issue 2): dispatch p50 <= 15 us and p99 <= 50 us on the 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from host import hookimpl
from host.config import load_config
from host.loopback import LoopbackConnector
from host.runtime import build_host


class SyncPlugin:
    @hookimpl
    def on_message(self, message):
        return None


class AsyncPlugin:
    @hookimpl
    async def on_message(self, message):
        return None


class Answering:
    @hookimpl
    def on_message(self, message):
        return "ok"


def pct(samples: list[int], q: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(q * len(samples)))] / 1000


async def measure(n: int) -> None:
    plugins = [("p1", SyncPlugin()), ("p2", AsyncPlugin()), ("p3", SyncPlugin()), ("p4", AsyncPlugin()),
               ("p5", Answering())]
    host = build_host(load_config(data={"logging": {"dir": ""}}, environ={}), plugins=plugins, entry_points=False)
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    message = loopback.make_message("hello")
    message.request_id = "bench"
    pm_hook = host.plugins.pm.hook.on_message
    dispatcher = host.dispatcher

    def sample_raw() -> list[int]:
        out = []
        for _ in range(n):
            t = time.perf_counter_ns()
            coros = pm_hook(host=host, message=message)
            out.append(time.perf_counter_ns() - t)
            for c in coros:  # pluggy does not await async implementations: close them unawaited
                if hasattr(c, "close"):
                    c.close()
        return out

    async def sample_dispatch() -> list[int]:
        out = []
        for _ in range(n):
            t = time.perf_counter_ns()
            await dispatcher.call("on_message", host=host, message=message)
            out.append(time.perf_counter_ns() - t)
        return out

    async def sample_handle() -> list[int]:
        out = []
        for _ in range(n):
            t = time.perf_counter_ns()
            await host.handle(message)
            out.append(time.perf_counter_ns() - t)
            loopback.deliveries.clear()
        return out

    # warm up every path
    sample_raw()
    await sample_dispatch()
    await sample_handle()
    raw = sample_raw()
    disp = await sample_dispatch()
    handle = await sample_handle()
    print(f"messages per series: {n}; 5 plugins (2 async, 1 answering)")
    print(f"{'series':<28}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for label, data in (("pluggy raw hook call", raw), ("dispatcher (isolated)", disp), ("host.handle (full path)", handle)):
        print(f"{label:<28}{pct(data, 0.5):>10.2f}{pct(data, 0.99):>10.2f}{statistics.mean(data) / 1000:>10.2f}")
    print(f"ratio dispatcher/pluggy p50: {pct(disp, 0.5) / pct(raw, 0.5):.1f}x, "
          f"host.handle/pluggy p50: {pct(handle, 0.5) / pct(raw, 0.5):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    trio.run(measure, args.n)


if __name__ == "__main__":
    main()
