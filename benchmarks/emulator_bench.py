"""DingTalk emulator: start-up time, push -> ACK round trip, and webhook reply throughput.

``python benchmarks/emulator_bench.py`` (about 20-40 s). Each figure has a baseline measured in the
same run, and the ratio says what the emulator (or its gateway endpoint) adds:

1. **Start-up** (goal: < 1 s): ``python -m host_dingtalk_connector.emulator --port 0`` until it prints
   its base URL, median of 5 runs, with byte-code cached (as after ``pip install``; a private
   ``PYTHONPYCACHEPREFIX`` is used so the shared venv is not touched) and without (every module
   compiled from source, as in a venv run with ``PYTHONDONTWRITEBYTECODE``). Baselines:
   ``python -c pass`` and ``import host_dingtalk_connector`` (the parent package, imported by
   ``python -m`` before the emulator).
2. **Push -> ACK round trip**: the emulator pushes a bot message, a bare trio-websocket client ACKs
   it, the emulator records the ACK; sequential, N messages. Through the gateway endpoint handed out
   by ``connections/open`` (the emulator's own WebSocket server on wsproto, which makes TCP faults
   possible) versus ``/connect`` on the HTTP port (hypercorn + Starlette; baseline).
3. **Webhook replies**: sequential ``POST /robot/sendBySession`` (validated, recorded) versus
   ``GET /_emulator`` (the smallest handler on the same server) as the baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import trio
from host_dingtalk_connector.emulator import BOT_TOPIC, open_emulator
from trio_websocket import open_websocket_url

N_PUSH = 1000
N_HTTP = 1000


def startup_seconds(argv: list[str], *, until_line: bool, env: dict[str, str]) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        if until_line:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            runs.append(time.perf_counter() - start)
            assert line.startswith(b"http://"), line
            proc.terminate()
            proc.wait(10)
            proc.stdout.close()
        else:
            subprocess.run(argv, check=True, env=env)
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


async def round_trips(direct: bool) -> list[float]:
    async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
        info = (await http.post("/v1.0/gateway/connections/open", json={
            "clientId": emu.settings.client_id, "clientSecret": emu.settings.client_secret,
            "subscriptions": [{"type": "CALLBACK", "topic": BOT_TOPIC}]})).json()
        endpoint = emu.base_url.replace("http://", "ws://") + "/connect" if direct else info["endpoint"]
        async with open_websocket_url(f"{endpoint}?ticket={info['ticket']}") as ws:
            await emu.wait_for_connection()
            times = []
            for i in range(N_PUSH):
                start = time.perf_counter()
                sent = await emu.send_user_message(f"m{i}")
                frame = json.loads(await ws.get_message())
                await ws.send_message(json.dumps({
                    "code": 200, "headers": {"contentType": "application/json",
                                             "messageId": frame["headers"]["messageId"]},
                    "message": "OK", "data": '{"response": null}'}))
                await emu.wait_for_ack(sent["messageId"])
                times.append(time.perf_counter() - start)
            return times


async def http_rate(webhook: bool) -> float:
    async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
        sent = await emu.send_user_message("hi")
        body = {"msgtype": "text", "text": {"content": "reply"}}
        start = time.perf_counter()
        for _ in range(N_HTTP):
            if webhook:
                r = await http.post(sent["sessionWebhook"], json=body)
            else:
                r = await http.get("/_emulator")
            assert r.status_code == 200
        return N_HTTP / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    py = sys.executable
    cli_argv = [py, "-m", "host_dingtalk_connector.emulator", "--port", "0"]
    parent_argv = [py, "-c", "import host_dingtalk_connector"]
    with tempfile.TemporaryDirectory() as cache:
        cold_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        warm_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        warm_env["PYTHONPYCACHEPREFIX"] = cache
        subprocess.run([py, "-c", "import host_dingtalk_connector.emulator.__main__"], env=warm_env, check=True)
        bare = startup_seconds([py, "-c", "pass"], until_line=False, env=warm_env)
        parent = startup_seconds(parent_argv, until_line=False, env=warm_env)
        warm = startup_seconds(cli_argv, until_line=True, env=warm_env)
        cold = startup_seconds(cli_argv, until_line=True, env=cold_env)
    print("1. start-up (median of 5)")
    print(f"   python -c pass                          {bare * 1000:6.0f} ms")
    print(f"   import host_dingtalk_connector (parent) {parent * 1000:6.0f} ms")
    print(f"   CLI until the base URL, byte-code cached {warm * 1000:5.0f} ms   (goal < 1000 ms)")
    print(f"   CLI until the base URL, no byte-code     {cold * 1000:5.0f} ms   (x{cold / warm:.1f})")

    gateway = trio.run(round_trips, False)
    direct = trio.run(round_trips, True)
    print(f"2. push -> ACK round trip, {N_PUSH} sequential messages")
    for name, times in (("direct /connect (baseline)", direct), ("gateway endpoint", gateway)):
        print(f"   {name:28} p50 {pct(times, .5) * 1e3:6.2f} ms  p99 {pct(times, .99) * 1e3:6.2f} ms  "
              f"{len(times) / sum(times):7.0f} msg/s")
    print(f"   gateway / direct p50: x{pct(gateway, .5) / pct(direct, .5):.2f}")

    base = trio.run(http_rate, False)
    hook = trio.run(http_rate, True)
    print(f"3. sequential HTTP requests, {N_HTTP} each")
    print(f"   GET /_emulator (baseline)            {base:7.0f} req/s")
    print(f"   POST /robot/sendBySession            {hook:7.0f} req/s   (x{hook / base:.2f})")


if __name__ == "__main__":
    main()
