"""DingTalk webhook mode: cost of a signed callback through the host, against the bare HTTP stack.

``python benchmarks/webhook_callbacks.py`` (about 20-40 s on a loaded 2-core machine). One process, one trio run: a real
``Host`` with its HTTP server on 127.0.0.1, the ``dingtalk_connector`` plugin in webhook mode and a
plugin answering every message at once (so each callback is answered inline), and an httpx client
with ``--concurrency`` requests in flight. Measured in the same run, same client, same server:

* **baseline**: ``GET /healthz`` (hypercorn + Starlette + httpx round trip, nothing else);
* **callback**: a signed bot message POSTed to ``/dingtalk/callback`` (verify the signature, replay
  memory, parse, convert, host queue, worker, plugin, inline answer in the response).

Printed: requests/second and latency p50/p99 for both, the ratio, and the webhook's own cost per
request (difference of the per-request wall times). Also micro-figures of the pure functions:
``match_signature`` (1 and 5 apps) and ``ReplayGuard.check``. Client and server share one process,
so the figures are end-to-end costs on one core, not the server's capacity alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable
from itertools import count
from typing import Any

import httpx
import msgspec
import trio

SECRET = "SEC-benchmark-0123456789abcdef"


def bot_message(i: int) -> bytes:
    return msgspec.json.encode({
        "msgId": f"msgbench{i}==", "msgtype": "text", "text": {"content": f"question {i}"},
        "conversationId": "cidbench=", "conversationType": "1", "senderStaffId": "user1",
        "senderId": "$:LWCP_v1:$bench", "senderNick": "Bench", "robotCode": "dingbench",
        "sessionWebhook": "http://127.0.0.1:9/robot/sendBySession?session=x",
        "sessionWebhookExpiredTime": int(time.time() * 1000) + 5_400_000, "createAt": int(time.time() * 1000),
    })  # fmt: skip


async def drive(n: int, concurrency: int, request: Callable[[int], Awaitable[httpx.Response]]) -> tuple[float, list[float]]:
    """``n`` requests with ``concurrency`` in flight; returns (seconds, per-request latencies)."""
    latencies: list[float] = []
    numbers = iter(range(n))

    async def worker() -> None:
        for i in numbers:
            start = time.perf_counter()
            response = await request(i)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"request {i}: HTTP {response.status_code} {response.text}")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - start, latencies


def describe(name: str, seconds: float, latencies: list[float]) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=100)
    figures = {"rate": len(latencies) / seconds, "p50": q[49] * 1000, "p99": q[98] * 1000,
               "per_request_us": seconds / len(latencies) * 1e6}  # fmt: skip
    print(f"  {name:<9} {figures['rate']:8.0f} req/s   p50 {figures['p50']:6.2f} ms   p99 {figures['p99']:6.2f} ms"
          f"   {figures['per_request_us']:7.0f} us/request")
    return figures


async def end_to_end(n: int, concurrency: int) -> None:
    from host_dingtalk_connector import plugin as dingtalk_plugin
    from host_dingtalk_connector.emulator.callbacks import sign_callback

    from host import hookimpl
    from host.config import load_config
    from host.runtime import build_host

    class Answer:
        @hookimpl
        def on_message(self, message: Any) -> str:
            return "answer"

    data = {
        "logging": {"dir": "", "level": "WARNING"},
        "http": {"enabled": True, "addr": "127.0.0.1:0"},
        "host": {"control_socket": "", "reload": {"watch_entry_points": False}},
        "dingtalk": {"client_id": "dingbench", "client_secret": SECRET, "openapi_endpoint": "http://127.0.0.1:9",
                     "mode": "webhook", "webhook": {"inline_reply_timeout": 1.9}},
    }  # fmt: skip
    host = build_host(load_config(data=data, environ={}), plugins=[("dingtalk_connector", dingtalk_plugin),
                      ("answer", Answer())], entry_points=False)  # fmt: skip
    stamps = count(int(time.time() * 1000))
    msg_ids = count()  # msgIds must differ too: a known msgId is a redelivery, answered "empty"
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        base = host.http.url
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

            async def healthz(i: int) -> httpx.Response:
                return await client.get("/healthz")

            async def callback(i: int) -> httpx.Response:
                timestamp = str(next(stamps))  # a signature is only good once: one millisecond each
                headers = {"content-type": "application/json", "timestamp": timestamp,
                           "sign": sign_callback(SECRET, timestamp)}  # fmt: skip
                response = await client.post("/dingtalk/callback", content=bot_message(next(msg_ids)),
                                             headers=headers)
                if response.status_code == 200 and response.json().get("msgtype") != "text":
                    raise RuntimeError(f"callback {i} was not answered inline: {response.text}")
                return response

            await drive(200, concurrency, healthz)  # warm-up: connections, imports, caches
            await drive(200, concurrency, callback)
            print(f"end to end, {n} requests, {concurrency} in flight (client and server in this process):")
            baseline = describe("baseline", *await drive(n, concurrency, healthz))
            webhook = describe("callback", *await drive(n, concurrency, callback))
        print(f"  ratio callback/baseline: {webhook['per_request_us'] / baseline['per_request_us']:.2f}x time per "
              f"request; webhook's own cost ~{webhook['per_request_us'] - baseline['per_request_us']:.0f} us/request "
              "(verify, replay memory, convert, queue, worker, plugin, inline answer)")
        host.request_shutdown()


def micro() -> None:
    from host_dingtalk_connector.signing import ReplayGuard, compute_sign, match_signature

    now = time.time()
    timestamp = str(int(now * 1000))
    sign = compute_sign(SECRET, timestamp)
    one = {"a": SECRET}
    five = {f"app{i}": f"{SECRET}{i}" for i in range(4)} | {"a": SECRET}
    loops = 20_000
    t1 = timeit.timeit(lambda: match_signature(timestamp, sign, one, window_seconds=3600), number=loops)
    t5 = timeit.timeit(lambda: match_signature(timestamp, sign, five, window_seconds=3600), number=loops)
    guard = ReplayGuard(window_seconds=3600, max_entries=10**6)
    stamps = count(int(now * 1000))
    body = bot_message(1)
    tg = timeit.timeit(lambda: guard.check("a", next(stamps), sign, body), number=loops)
    print("pure functions:")
    print(f"  match_signature, 1 app   {t1 / loops * 1e6:6.1f} us")
    print(f"  match_signature, 5 apps  {t5 / loops * 1e6:6.1f} us  ({t5 / t1:.1f}x: one HMAC per app)")
    print(f"  ReplayGuard.check        {tg / loops * 1e6:6.1f} us  (new signature, {len(guard)} remembered)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    micro()
    trio.run(end_to_end, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
