"""NLP bridge overhead and throughput, against a local OpenAI-compatible server.

Run: ``python benchmarks/nlp_bridge_overhead.py`` (about 30 s). Needs host and host-nlp-bridge
installed (plus hypercorn and starlette for the local server).

1. **Overhead per call.** The same question, answered by the same local server (a separate process,
   so its CPU time is not ours), asked two ways in alternation: a bare httpx call (POST, parse the
   JSON or the SSE stream, nothing else) and ``Bridge.handle`` (rate limit, admission, lanes,
   memory, cache/coalescing keys, circuit breaker, retry loop, metrics, the same httpx underneath).
   The difference of the two latency distributions is what the bridge adds. Goal: under 1 ms at p99.
   On a shared machine wall-clock percentiles move with the neighbours' load, so the CPU time this
   process spends per call (``time.thread_time``) is printed too: it is what the bridge really costs.
2. **Throughput with 100 concurrent conversations.** A whole host (loopback connector, workers,
   dispatcher) with the bridge, 100 conversations each sending distinct messages back to back (each
   waits for its previous answer: per-conversation ordering), streamed answers, memory off so the
   requests are the same as the baseline's; answers/s and per-message latency, next to bare httpx
   streaming calls under the same concurrency limit. A last
   run has every conversation ask the same questions at the same time, which coalescing serves
   with one backend call each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

WARMUP = 100
CALLS = 1000
CONVERSATIONS = 100
MESSAGES_PER_CONVERSATION = 10
#: Backend calls in flight at once in the throughput runs (the bridge's max_concurrency, and the
#: bare client's limit). The server is one process: more only adds a connection storm at the start.
CALL_CONCURRENCY = 16
ANSWER = "The quick brown fox jumps over the lazy dog, twice, to measure a realistic small answer."


# -- the local server (child process) ----------------------------------------------------------------


def serve(port_file: str) -> None:
    """An OpenAI-compatible server answering at once (JSON or SSE, word by word)."""
    import hypercorn.config
    import hypercorn.trio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    words = [w if i == 0 else " " + w for i, w in enumerate(ANSWER.split(" "))]
    usage = {"prompt_tokens": 20, "completion_tokens": len(words)}

    def event(payload: Any) -> bytes:
        return b"data: " + (payload if isinstance(payload, bytes) else msgspec.json.encode(payload)) + b"\n\n"

    stream_body = b"".join(
        [event({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}) for w in words]
        + [event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), event({"choices": [], "usage": usage}), event(b"[DONE]")]
    )
    whole = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}], "usage": usage}

    async def chat(request: Request) -> Response:
        body = msgspec.json.decode(await request.body())
        if body.get("stream"):

            async def chunks() -> Any:
                yield stream_body

            return StreamingResponse(chunks(), media_type="text/event-stream")
        return JSONResponse(whole)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 600

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(hypercorn.trio.serve, app, config)
            await trio.Path(port_file).write_text(urls[0])

    trio.run(main)


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port_file = Path(tempfile.gettempdir()) / f"nlp_bridge_bench_{os.getpid()}.url"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    deadline = time.monotonic() + 20
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.05)
    url = port_file.read_text().strip()
    port_file.unlink()
    return process, url


# -- measurements ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_bridge(url: str, *, stream: bool) -> Any:
    from host_nlp_bridge import Bridge, NlpBridgeSection, resolve
    from host_nlp_bridge.bridge import HostLimits
    from host_nlp_bridge.metrics import BridgeMetrics

    from host.metrics import Metrics

    section = msgspec.convert(
        {
            "backends": {"main": {"type": "openai", "base_url": f"{url}/v1", "model": "bench", "api_key": "sk-bench-key"}},
            "stream": stream,
            "system_prompt": "You are a helpful assistant.",
            "limits": {"max_concurrency": 64, "queue_size": 10_000, "user_rate_per_minute": 60},
        },
        NlpBridgeSection,
        dec_hook=_secret_hook,
    )
    return Bridge(resolve(section, {}), BridgeMetrics(Metrics()), limits=HostLimits(300, 300))


def _secret_hook(type_: type, obj: Any) -> Any:
    from host.config import _dec_hook

    return _dec_hook(type_, obj)


async def bare_call(client: httpx.AsyncClient, url: str, text: str, stream: bool) -> str:
    from httpx_sse import EventSource

    body = msgspec.json.encode(
        {
            "model": "bench",
            "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}],
            "stream": stream,
        }
    )
    headers = {"Authorization": "Bearer sk-bench-key", "Content-Type": "application/json"}
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", content=body, headers=headers)
        return str(msgspec.json.decode(response.content)["choices"][0]["message"]["content"])
    parts = []
    async with client.stream("POST", f"{url}/v1/chat/completions", content=body, headers=headers) as response:
        async for event in EventSource(response).aiter_sse():
            if event.data == "[DONE]":
                continue  # read to the end, as the bridge does
            for choice in msgspec.json.decode(event.data)["choices"]:
                parts.append(choice["delta"].get("content") or "")
    return "".join(parts)


async def bridge_call(bridge: Any, message: Any) -> str:
    result = await bridge.handle(message)
    if hasattr(result, "__anext__"):
        parts = [chunk async for chunk in result]
        await result.aclose()
        return "".join(parts)
    return str(result.text)


def make_message(i: int, text: str) -> Any:
    from host import Conversation, Message, Sender, TextPart

    return Message(
        id=f"m{i}",
        platform="bench",
        connector="bench",
        conversation=Conversation(id=f"conv-{i}", type="single"),
        sender=Sender(platform_ids={"user_id": f"user-{i}"}, name="Bench", identity=f"user-{i}"),
        parts=[TextPart(text=text)],
        request_id=f"r{i}",
    )


async def overhead(url: str, *, stream: bool) -> dict[str, float]:
    bridge = make_bridge(url, stream=stream)
    timeout = httpx.Timeout(connect=5, read=60, write=60, pool=60)
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
        bare: list[float] = []
        bridged: list[float] = []
        bare_cpu: list[float] = []
        bridged_cpu: list[float] = []
        for i in range(WARMUP + CALLS):
            text = f"question number {i}"
            start, start_cpu = time.perf_counter(), time.thread_time()
            a = await bare_call(client, url, text, stream)
            middle, middle_cpu = time.perf_counter(), time.thread_time()
            b = await bridge_call(bridge, make_message(i, text))
            end, end_cpu = time.perf_counter(), time.thread_time()
            assert a == b == ANSWER, (a, b)
            if i >= WARMUP:
                bare.append(middle - start)
                bridged.append(end - middle)
                bare_cpu.append(middle_cpu - start_cpu)
                bridged_cpu.append(end_cpu - middle_cpu)
    await bridge.aclose()
    diffs = [b - a for a, b in zip(bare, bridged, strict=True)]
    return {
        # CPU time of this thread: what the call costs us, whatever the other processes do.
        "bare_cpu_p50": percentile(bare_cpu, 0.5),
        "bridge_cpu_p50": percentile(bridged_cpu, 0.5),
        "added_cpu_p50": percentile(bridged_cpu, 0.5) - percentile(bare_cpu, 0.5),
        "added_cpu_p99": percentile(bridged_cpu, 0.99) - percentile(bare_cpu, 0.99),
        "bare_p50": percentile(bare, 0.5),
        "bare_p99": percentile(bare, 0.99),
        "bridge_p50": percentile(bridged, 0.5),
        "bridge_p99": percentile(bridged, 0.99),
        "added_p50": percentile(bridged, 0.5) - percentile(bare, 0.5),
        "added_p99": percentile(bridged, 0.99) - percentile(bare, 0.99),
        "pair_diff_median": statistics.median(diffs),
    }


async def throughput(url: str, *, identical: bool = False) -> dict[str, float]:
    from host_nlp_bridge import plugin

    from host.config import load_config
    from host.loopback import LoopbackConnector
    from host.runtime import build_host

    data = {
        "logging": {"dir": "", "level": "WARNING"},
        # Only what is measured: no HTTP endpoint, control socket or plugin watcher.
        "http": {"enabled": False},
        "host": {"concurrency": 256, "queue_size": 4096, "control_socket": "", "reload": {"watch_entry_points": False}},
        "nlp_bridge": {
            "backends": {"main": {"type": "openai", "base_url": f"{url}/v1", "model": "bench", "max_connections": CALL_CONCURRENCY}},
            "limits": {"max_concurrency": CALL_CONCURRENCY, "queue_size": 1000, "user_rate_per_minute": 0},
            # Same requests as the bare baseline ([system, user]); with memory on they would grow
            # with each turn and measure the server's JSON parsing instead.
            "memory": {"enabled": False},
        },
    }
    host = build_host(load_config(data=data, environ={}), plugins=[("nlp_bridge", plugin)], entry_points=False)

    class Connector(LoopbackConnector):
        """Loopback that tells each conversation when its streamed answer is finalized."""

        def __init__(self) -> None:
            super().__init__()
            self.done: dict[str, trio.Event] = {}

        async def open_stream(self, message: Any) -> Any:
            stream = await super().open_stream(message)
            event = self.done[message.id]

            class Stream:
                async def append(self, chunk: str) -> None:
                    await stream.append(chunk)

                async def finish(self) -> None:
                    await stream.finish()
                    event.set()

                async def fail(self, note: str) -> None:
                    await stream.fail(note)
                    event.set()

            return Stream()

    connector = Connector()
    host.add_connector(connector)
    latencies: list[float] = []

    async def conversation(c: int) -> None:
        for j in range(MESSAGES_PER_CONVERSATION):
            # Distinct questions, or the same ones in every conversation (then coalescing kicks in).
            text = f"message {j}" if identical else f"conversation {c}, message {j}"
            message = connector.make_message(text, conversation_id=f"conv-{c}", sender_id=f"user-{c}")
            connector.done[message.id] = trio.Event()
            start = time.perf_counter()
            await connector.send_message(message)
            await connector.done[message.id].wait()
            latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        start, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as senders:
            for c in range(CONVERSATIONS):
                senders.start_soon(conversation, c)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        host.request_shutdown()
    answered = sum(1 for d in connector.deliveries if d.state == "finished" and d.text == ANSWER)
    total = CONVERSATIONS * MESSAGES_PER_CONVERSATION
    assert answered == total, f"{answered} of {total} answered"
    return {
        "messages": total,
        "seconds": elapsed,
        "per_second": total / elapsed,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p99": percentile(latencies, 0.99),
        "cpu_share": cpu / elapsed,
    }


async def bare_throughput(url: str) -> dict[str, float]:
    """The same load with bare httpx streaming calls (no host, no bridge): the server's ceiling."""
    timeout = httpx.Timeout(connect=5, read=60, write=60, pool=60)
    limits = httpx.Limits(max_connections=CALL_CONCURRENCY, max_keepalive_connections=CALL_CONCURRENCY)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        limiter = trio.CapacityLimiter(CALL_CONCURRENCY)

        async def conversation(c: int) -> None:
            for j in range(MESSAGES_PER_CONVERSATION):
                async with limiter:
                    await bare_call(client, url, f"conversation {c}, message {j}", True)

        start, cpu = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            for c in range(CONVERSATIONS):
                nursery.start_soon(conversation, c)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    total = CONVERSATIONS * MESSAGES_PER_CONVERSATION
    return {"per_second": total / elapsed, "seconds": elapsed, "cpu_share": cpu / elapsed}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.3f} ms"


async def run(url: str) -> None:
    print(f"local server: {url} (separate process); {CALLS} calls per variant after {WARMUP} warm-up, interleaved")
    for stream in (False, True):
        r = await overhead(url, stream=stream)
        label = "streaming (SSE)" if stream else "whole answer (JSON)"
        print(f"\n[overhead] {label}")
        print(f"  bare httpx      p50 {ms(r['bare_p50'])}   p99 {ms(r['bare_p99'])}")
        print(f"  through bridge  p50 {ms(r['bridge_p50'])}   p99 {ms(r['bridge_p99'])}")
        print(
            f"  added by bridge p50 {ms(r['added_p50'])}   p99 {ms(r['added_p99'])}   "
            f"(median of paired differences {ms(r['pair_diff_median'])}; ratio p50 {r['bridge_p50'] / r['bare_p50']:.2f}x, "
            f"p99 {r['bridge_p99'] / r['bare_p99']:.2f}x)  goal: added p99 < 1 ms -> "
            f"{'OK' if r['added_p99'] < 0.001 else 'MISSED'}"
        )
        print(
            f"  CPU per call    bare p50 {ms(r['bare_cpu_p50'])}   bridge p50 {ms(r['bridge_cpu_p50'])}   "
            f"added p50 {ms(r['added_cpu_p50'])}   added p99 {ms(r['added_cpu_p99'])}"
        )
    base = await bare_throughput(url)
    t = await throughput(url)
    same = await throughput(url, identical=True)
    print(
        f"\n[throughput] {CONVERSATIONS} concurrent conversations x {MESSAGES_PER_CONVERSATION} messages, streamed answers, "
        f"{CALL_CONCURRENCY} backend calls at once"
    )
    print(f"  bare httpx (no host, no bridge)  {base['per_second']:8.0f} answers/s   client process busy {base['cpu_share']:.0%}")
    print(
        f"  host + loopback + bridge         {t['per_second']:8.0f} answers/s   client process busy {t['cpu_share']:.0%}   "
        f"({t['per_second'] / base['per_second']:.2f}x of bare); per message p50 {ms(t['latency_p50'])}, p99 {ms(t['latency_p99'])}"
    )
    print(
        f"  same, every conversation asking the same questions at once (coalesced): {same['per_second']:.0f} answers/s"
    )
    print("  (client process busy well under 100%: the local server, not the bridge, is the limit)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    from loguru import logger

    logger.remove()  # the bridge's debug lines would measure the terminal, not the bridge
    process, url = start_server()
    try:
        trio.run(run, url)
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    main()
