"""DingTalk Stream: ACK throughput, ACK latency and burst memory, ours versus the official client.

``python benchmarks/stream_ack.py`` (about 40-60 s). The DingTalk emulator runs in this process on
127.0.0.1; each client runs in its own subprocess (so the two cores are split emulator / client and
the client's memory is measured alone), connected to the emulator exactly as it would be to
DingTalk:

* **host**: a real ``Host`` with the ``dingtalk_connector`` plugin and a plugin that passes on every
  message (the full path: decode, dedup, convert, ``intake.offer``, host queue and workers, ACK).
* **official**: ``dingtalk-stream`` 0.24.x from PyPI (``DINGTALK_OPENAPI_ENDPOINT`` pointed at the
  emulator) with a ``ChatbotHandler`` that returns at once (its ACK follows the handler).

Both are driven the same way, in the same run, with the same pushes:

1. **Sustained ACK throughput** on one connection: N bot messages pushed with at most W un-ACKed at a
   time; messages/second from the first push to the last ACK. Goal (issue 4): >= 2,000 msg/s.
2. **ACK latency at 200 msg/s**: pushes paced every 5 ms; latency = push -> ACK received, measured by
   the emulator. Goal: p99 <= 10 ms.
3. **Memory under a 10,000-message burst**: all pushed at once; the client's resident set size
   (``/proc/PID/status`` VmRSS) sampled every 20 ms until every message is ACKed; peak growth over
   the idle baseline.

The emulator's own cost is in every figure (it is the other end of the loopback), equally for both
clients; ratios are host / official. CPU per message is reported for each client process and for
the emulator's process (which also runs this driver) during the throughput run, with the load
average: on a shared machine they are steadier than the wall-clock throughput.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import trio
from botprocess import cpu_seconds, pct, running_bot

PASSIVE_PLUGIN = "benchmark_passive"


# ---------------------------------------------------------------------------------------------
# Client processes
# ---------------------------------------------------------------------------------------------


def run_host_client(endpoint: str, client_id: str) -> None:
    """Our side: a real Host with the dingtalk plugin (config from arguments and environment)."""
    from host_dingtalk_connector import plugin as dingtalk_plugin

    from host import hookimpl
    from host.config import load_config
    from host.logs import setup_logging
    from host.runtime import build_host

    class Passive:
        @hookimpl
        def on_message(self, message: Any) -> None:
            return None

    data = {
        "logging": {"dir": "", "level": "WARNING", "format": "text"},
        "http": {"enabled": False},
        # A queue deep enough that the 10,000-message burst is not shed (shedding would leave
        # messages un-ACKed until redelivery, which the emulator is not told to do here).
        "host": {"control_socket": "", "queue_size": 16384, "reload": {"watch_entry_points": False}},
        "dingtalk": {
            "client_id": client_id,
            "client_secret": {"env": "BENCH_CLIENT_SECRET"},
            "openapi_endpoint": endpoint,
            "stream": {"app_idle_timeout": 0.0},
        },
    }
    config = load_config(data=data, environ={})
    setup_logging(config.logging)
    host = build_host(config, plugins=[("dingtalk_connector", dingtalk_plugin), (PASSIVE_PLUGIN, Passive())], entry_points=False)

    async def main() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    host.request_shutdown()
                    break

    trio.run(main)


def run_official_client(client_id: str) -> None:
    """The official SDK (reads DINGTALK_OPENAPI_ENDPOINT at import time)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import dingtalk_stream

    class Handler(dingtalk_stream.ChatbotHandler):
        async def process(self, callback: Any) -> tuple[int, str]:
            return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    credential = dingtalk_stream.Credential(client_id, os.environ["BENCH_CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, Handler())
    client.start_forever()


# ---------------------------------------------------------------------------------------------
# Measurements (in the emulator's process)
# ---------------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def own_cpu_seconds() -> float:
    """User + system CPU time of this (the emulator's) process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Driver:
    """Pushes bot messages through the emulator's gateway and waits for their ACKs.

    The payload is a real one built by ``Emulator.send_user_message`` once; each push is a copy with
    its own ``msgId`` and text, delivered with ``gateway.deliver`` (a real Stream frame on the
    client's WebSocket, skipping only the per-message conversation bookkeeping of
    ``send_user_message``). ACKs are awaited on the frame records (no task per message), and
    only when not already there, so that pushes made in one go leave in one write.
    """

    template: dict[str, Any] | None = None
    counter = 0

    def __init__(self, emu: Any) -> None:
        self.emu = emu

    async def push(self, text: str) -> Any:
        from host_dingtalk_connector.emulator import BOT_TOPIC

        if Driver.template is None:
            Driver.template = (await self.emu.send_user_message("template"))["payload"]
        Driver.counter += 1
        payload = dict(Driver.template, msgId=f"msgbench{Driver.counter:08d}==", text={"content": text})
        record = self.emu.gateway.deliver("CALLBACK", BOT_TOPIC, "bot_message", payload, delivery_key=payload["msgId"])
        if record is None:
            raise RuntimeError("not delivered: no open connection")
        return record

    @staticmethod
    async def acked(record: Any) -> None:
        if record.ack is None:
            await record.acked.wait()


async def throughput(emu: Any, total: int, window: int) -> float:
    """N pushes with at most ``window`` un-ACKed (waiting for the oldest), first push to last ACK."""
    driver = Driver(emu)
    in_flight: deque[Any] = deque()
    started = time.perf_counter()
    for i in range(total):
        if len(in_flight) >= window:
            await driver.acked(in_flight.popleft())
        in_flight.append(await driver.push(f"throughput {i}"))
    for record in in_flight:
        await driver.acked(record)
    return total / (time.perf_counter() - started)


async def latency(emu: Any, total: int, rate: float) -> list[float]:
    driver = Driver(emu)
    records = []
    start = trio.current_time()
    for i in range(total):
        await trio.sleep_until(start + i / rate)
        records.append(await driver.push(f"latency {i}"))
    for record in records:
        await driver.acked(record)
    return [r.ack.latency for r in records]


async def burst(emu: Any, pid: int, total: int) -> tuple[int, int, float]:
    """(baseline KiB, peak KiB, seconds until all ACKed)."""
    driver = Driver(emu)
    baseline = rss_kib(pid)
    peak = baseline
    done = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            with trio.move_on_after(0.02):
                await done.wait()
        peak = max(peak, rss_kib(pid))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        started = time.perf_counter()
        records = [await driver.push(f"burst {i}") for i in range(total)]
        for record in records:
            await driver.acked(record)
        elapsed = time.perf_counter() - started
        done.set()
    return baseline, peak, elapsed


async def measure(emu: Any, label: str, command: list[str], env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    async with running_bot(emu, command, env) as process:
        # Warm-up (imports, caches, JIT-free but allocator warm).
        await throughput(emu, 300, 50)
        result: dict[str, Any] = {"client": label}
        cpu, own = cpu_seconds(process.pid), own_cpu_seconds()
        result["throughput"] = await throughput(emu, args.messages, args.window)
        result["cpu_us"] = (cpu_seconds(process.pid) - cpu) / args.messages * 1e6
        result["emu_cpu_us"] = (own_cpu_seconds() - own) / args.messages * 1e6
        result["load"] = os.getloadavg()[0]
        lat = await latency(emu, args.latency_messages, 200.0)
        result["p50_ms"] = pct(lat, 0.5) * 1000
        result["p99_ms"] = pct(lat, 0.99) * 1000
        result["mean_ms"] = statistics.fmean(lat) * 1000
        base, peak, seconds = await burst(emu, process.pid, args.burst)
        result["rss_base_mib"] = base / 1024
        result["rss_growth_mib"] = (peak - base) / 1024
        result["burst_rate"] = args.burst / seconds
        return result


async def orchestrate(args: argparse.Namespace) -> None:
    from host_dingtalk_connector.emulator import open_emulator

    secret = "bench-secret-0123456789"
    client_id = "dingbenchapp"
    results = []
    async with open_emulator(client_id=client_id, client_secret=secret) as emu:
        env = {**os.environ, "BENCH_CLIENT_SECRET": secret, "NO_PROXY": "127.0.0.1,localhost"}
        me = [sys.executable, __file__]
        # BENCH_PROFILE=/path.prof: run our client under cProfile (for finding hot spots).
        profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        if profile:
            me = [sys.executable, *profile, __file__]
            profile = []
        clients = [
            ("host", [*profile, *me, "--client", "host", "--endpoint", emu.base_url, "--client-id", client_id], env),
            ("official", [*me, "--client", "official", "--client-id", client_id], {**env, "DINGTALK_OPENAPI_ENDPOINT": emu.base_url}),
        ]
        for label, command, client_env in clients:
            if args.only and label != args.only:
                continue
            results.append(await measure(emu, label, command, client_env, args))
            print(f"  measured {label}", flush=True)
    print()
    print(
        f"{'client':<10}{'ACK msg/s':>11}{'CPU us/msg':>12}{'msg/s/core':>12}{'emu us/msg':>12}{'load':>6}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'mean ms':>9}{'RSS MiB':>9}{'burst +MiB':>12}{'burst msg/s':>13}"
    )
    for r in results:
        print(
            f"{r['client']:<10}{r['throughput']:>11.0f}{r['cpu_us']:>12.0f}{1e6 / r['cpu_us']:>12.0f}{r['emu_cpu_us']:>12.0f}{r['load']:>6.2f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}"
            f"{r['rss_base_mib']:>9.1f}{r['rss_growth_mib']:>12.1f}{r['burst_rate']:>13.0f}"
        )
    if len(results) == 2:
        ours, theirs = results
        print()
        print("ratios host / official (throughput: higher is better; latency and memory: lower is better)")
        print(f"  ACK throughput   {ours['throughput'] / theirs['throughput']:.2f}x")
        print(f"  client CPU/msg   {ours['cpu_us'] / theirs['cpu_us']:.2f}x")
        print(f"  p50 latency      {ours['p50_ms'] / theirs['p50_ms']:.2f}x")
        print(f"  p99 latency      {ours['p99_ms'] / theirs['p99_ms']:.2f}x")
        growth = theirs["rss_growth_mib"]
        print(f"  burst RSS growth {ours['rss_growth_mib'] / growth:.2f}x" if growth > 0 else "  burst RSS growth n/a")
    print()
    print(
        f"goals (issue 4): throughput >= 2000 msg/s, p99 <= 10 ms at 200 msg/s; "
        f"N={args.messages} window={args.window}, latency run {args.latency_messages} msgs, burst {args.burst}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=["host", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["host", "official"], help="measure one client only")
    parser.add_argument("--messages", type=int, default=5000, help="messages in the throughput run")
    parser.add_argument("--window", type=int, default=200, help="un-ACKed messages allowed in flight")
    parser.add_argument("--latency-messages", type=int, default=1500, help="messages at 200 msg/s")
    parser.add_argument("--burst", type=int, default=10_000, help="messages in the memory burst")
    args = parser.parse_args()
    if args.client == "host":
        run_host_client(args.endpoint, args.client_id)
    elif args.client == "official":
        run_official_client(args.client_id)
    else:
        trio.run(orchestrate, args)


if __name__ == "__main__":
    main()
