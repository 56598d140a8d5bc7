"""DingTalk end to end: reply latency at 200 msg/s, and AI card updates under load; ours vs the official SDK.

``python benchmarks/e2e_reply.py`` (about 40-50 s). The DingTalk emulator runs in this process on
127.0.0.1; each bot runs in its own subprocess, connected to the emulator exactly as to DingTalk:

* **host**: a real ``Host`` with the ``dingtalk_connector`` and ``nlp_bridge`` plugins, the NLP
  bridge answering with its built-in **echo** backend (the full path: Stream frame, ACK, host queue,
  worker, NLP bridge, streamed reply, session webhook or AI card).
* **official**: ``dingtalk-stream`` 0.24.x from PyPI, the way its documentation writes an echo bot:
  a ``ChatbotHandler`` calling ``reply_text``; for cards an ``AsyncChatbotHandler`` streaming an
  ``AIMarkdownCardInstance`` chunk by chunk (``ai_start``, ``ai_streaming`` per chunk, ``ai_finish``).

Two runs per bot, same pushes in the same run:

1. **Reply latency at 200 msg/s**: N messages, one every 5 ms, each from its own user; latency = the
   message injected into the emulator -> the reply recorded by the emulator (its ``sendBySession``
   handler). Goal (issue 5): p99 <= 20 ms.
2. **AI cards under load**: 20 users ask at once; every answer streams 60 words 30 ms apart into an
   AI card. Counted by the emulator: streaming updates accepted per second (mean over the run and the
   busiest 1 s window), ``403 QpsLimit`` answers (DingTalk allows 20 calls per second per app and
   API), cards that ended FINISHED. Our budget: ``[dingtalk.cards] updates_per_second = 8`` plus
   ``burst = 4``.

The emulator's own cost is in every figure (it is the other end of the loopback), equally for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import trio
from botprocess import cpu_seconds, pct, running_bot

TEMPLATE = "382e4302-551d-4880-bf29-a30acfab2e71.schema"
CARD_WORDS = 60
CARD_DELAY = 0.03
CARD_USERS = 20


# ---------------------------------------------------------------------------------------------
# Bot processes
# ---------------------------------------------------------------------------------------------


def run_host_bot(endpoint: str, client_id: str, mode: str) -> None:
    """Our side: a real Host, dingtalk_connector + nlp_bridge (echo backend)."""
    import host_nlp_bridge.plugin as nlp_plugin
    from host_dingtalk_connector import plugin as dingtalk_plugin

    from host.config import load_config
    from host.logs import setup_logging
    from host.runtime import build_host

    cards = mode == "cards"
    data = {
        "logging": {"dir": "", "level": "WARNING", "format": "text"},
        "http": {"enabled": False},
        "host": {
            "control_socket": "",
            "queue_size": 16384,
            "concurrency": 64,
            "reload": {"watch_entry_points": False},
        },
        "dingtalk": {
            "client_id": client_id,
            "client_secret": {"env": "BENCH_CLIENT_SECRET"},
            "openapi_endpoint": endpoint,
            "stream": {"app_idle_timeout": 0.0},
            "cards": {"template_id": TEMPLATE if cards else ""},
            "media": {"download": False},
        },
        "nlp_bridge": {
            "reply_format": "text",
            "backends": {"echo": {"type": "echo", "chunk_delay": CARD_DELAY if cards else 0.0}},
            "limits": {"max_concurrency": 64, "queue_size": 10000, "user_rate_per_minute": 0},
        },
    }
    config = load_config(data=data, environ={})
    setup_logging(config.logging)
    plugins = [("dingtalk_connector", dingtalk_plugin), ("nlp_bridge", nlp_plugin)]
    host = build_host(config, plugins=plugins, entry_points=False)

    async def main() -> None:
        import signal

        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    host.request_shutdown()
                    break

    trio.run(main)


def run_official_bot(client_id: str, mode: str) -> None:
    """The official SDK (reads DINGTALK_OPENAPI_ENDPOINT at import time)."""
    import logging
    import re

    logging.basicConfig(level=logging.WARNING)
    import dingtalk_stream

    class Echo(dingtalk_stream.ChatbotHandler):
        async def process(self, callback: Any) -> tuple[int, str]:
            incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
            self.reply_text("[echo] " + incoming.text.content.strip(), incoming)
            return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    class CardEcho(dingtalk_stream.AsyncChatbotHandler):
        def process(self, callback: Any) -> tuple[int, str]:
            incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
            card = dingtalk_stream.AIMarkdownCardInstance(self.dingtalk_client, incoming)
            card.ai_start()
            text = ""
            for i, word in enumerate(
                re.findall(r"\S+\s*", "[echo] " + incoming.text.content.strip())
            ):
                if i:
                    time.sleep(CARD_DELAY)
                text += word
                card.ai_streaming(markdown=text, append=False)
            card.ai_finish()
            return dingtalk_stream.AckMessage.STATUS_OK, "OK"

    credential = dingtalk_stream.Credential(client_id, os.environ["BENCH_CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    handler = CardEcho(max_workers=64) if mode == "cards" else Echo()
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, handler)
    client.start_forever()


# ---------------------------------------------------------------------------------------------
# Measurements (in the emulator's process)
# ---------------------------------------------------------------------------------------------


class ReplyProbe:
    """Notes when the emulator records each bot reply, keyed by the reply's text."""

    def __init__(self, emu: Any) -> None:
        self.arrived: dict[str, float] = {}
        self.events: dict[str, trio.Event] = {}
        original = emu.state.add_bot_message

        def add_bot_message(message: Any) -> Any:
            now = time.perf_counter()
            if message.text not in self.arrived:
                self.arrived[message.text] = now
                self.events.setdefault(message.text, trio.Event()).set()
            return original(message)

        emu.state.add_bot_message = add_bot_message  # the probe: every reply path goes through it

    async def wait(self, text: str) -> float:
        await self.events.setdefault(text, trio.Event()).wait()
        return self.arrived[text]


async def reply_latency(emu: Any, label: str, total: int, rate: float) -> list[float]:
    """Push ``total`` messages at ``rate``; each is its own conversation and user, so nothing is
    serialized on the bot's side. The payload is a real one built once by the emulator; each push is
    a copy with its own msgId, conversation, user and text, delivered straight through the gateway
    (the emulator's per-message bookkeeping would only slow the injecting side down). Replies go
    through that payload's session webhook and are told apart by their text."""
    from host_dingtalk_connector.emulator import BOT_TOPIC

    template = (await emu.send_user_message("template", sender_staff_id=f"{label}-template"))[
        "payload"
    ]
    probe = ReplyProbe(emu)
    latencies: list[float] = []

    async def one(i: int, start_at: float) -> None:
        await trio.sleep_until(start_at)
        text = f"{label} latency {i}"
        payload = dict(template, msgId=f"msg{label}{i:06d}==", conversationId=f"cid{label}{i:06d}",
                       senderStaffId=f"{label}-{i:06d}", text={"content": text})  # fmt: skip
        pushed = time.perf_counter()
        if (
            emu.gateway.deliver(
                "CALLBACK", BOT_TOPIC, "bot_message", payload, delivery_key=payload["msgId"]
            )
            is None
        ):
            raise RuntimeError("not delivered: the bot has no open connection")
        with trio.move_on_after(30):
            latencies.append(await probe.wait(f"[echo] {text}") - pushed)

    async with trio.open_nursery() as nursery:
        start = trio.current_time() + 0.1
        for i in range(total):
            nursery.start_soon(one, i, start + i / rate)
    return latencies


async def card_load(emu: Any, label: str) -> dict[str, Any]:
    question = " ".join(f"word{i}" for i in range(CARD_WORDS - 1))
    calls_before = len(emu.calls())
    started = time.perf_counter()
    sent = [
        await emu.send_user_message(question, sender_staff_id=f"{label}-card-{i:02d}")
        for i in range(CARD_USERS)
    ]
    conversations = {s["conversationId"] for s in sent}

    def finished() -> list[Any] | None:
        cards = [
            c
            for c in emu.all_cards()
            if any(s["conversationId"] in conversations for s in c["spaces"])
        ]
        done = [c for c in cards if c["state"] in ("FINISHED", "FAILED")]
        return cards if len(cards) == CARD_USERS and len(done) == CARD_USERS else None

    cards: list[Any] = []
    with trio.move_on_after(60):
        cards = await emu.wait_until(finished)
    elapsed = time.perf_counter() - started
    calls = list(emu.calls())[calls_before:]
    streaming = [c for c in calls if c["api"] == "PUT /v1.0/card/streaming"]
    accepted = [c["at"] / 1000 for c in streaming if c["status"] == 200]
    card_calls = [c for c in calls if "/card/" in c["api"]]
    rejected = sum(1 for c in card_calls if c["code"].startswith("Forbidden.AccessDenied.Qps"))
    busiest = max((sum(1 for t in accepted if s <= t < s + 1) for s in accepted), default=0)
    span = (max(accepted) - min(accepted)) if len(accepted) > 1 else 1.0
    return {
        "updates": len(accepted),
        "updates_per_s": len(accepted) / span if span > 0 else float("nan"),
        "busiest_1s": busiest,
        "qps_403": rejected,
        "card_calls": len(card_calls),
        "finished": sum(1 for c in cards if c["state"] == "FINISHED"),
        "seconds": elapsed,
    }


async def with_bot(emu: Any, command: list[str], env: dict[str, str], measure: Any) -> Any:
    async with running_bot(emu, command, env) as process:
        cpu_bot, cpu_emu = cpu_seconds(process.pid), time.process_time()
        result = await measure()
        return result, cpu_seconds(process.pid) - cpu_bot, time.process_time() - cpu_emu


async def orchestrate(args: argparse.Namespace) -> None:
    from host_dingtalk_connector.emulator import open_emulator

    secret = "bench-secret-0123456789"
    client_id = "dingbenchapp"
    rows: dict[str, dict[str, Any]] = {}
    async with open_emulator(client_id=client_id, client_secret=secret) as emu:
        env = {**os.environ, "BENCH_CLIENT_SECRET": secret, "NO_PROXY": "127.0.0.1,localhost"}
        me = [sys.executable, __file__]
        # BENCH_PROFILE=/path.prof: run our bot under cProfile timed in CPU seconds (for finding hot
        # spots: time spent waiting for a core on a busy machine is not counted).
        profile = os.environ.get("BENCH_PROFILE")
        bots = {
            "host": ([*me, "--bot", "host", "--endpoint", emu.base_url, "--client-id", client_id], env),
            "official": ([*me, "--bot", "official", "--client-id", client_id],
                         {**env, "DINGTALK_OPENAPI_ENDPOINT": emu.base_url}),
        }  # fmt: skip
        for label, (command, bot_env) in bots.items():
            if args.only and label != args.only:
                continue
            row = rows[label] = {}
            # Warm-up, then the measured run.
            if profile and label == "host":
                command = [*command, "--profile", profile]
            latencies, cpu_bot, cpu_emu = await with_bot(
                emu, [*command, "--mode", "reply"], bot_env,
                lambda label=label: warm_then_measure(emu, label, args),
            )  # fmt: skip
            pushed = args.messages + WARM_UP
            row["bot_cpu_ms"] = cpu_bot / pushed * 1000
            row["emu_cpu_ms"] = cpu_emu / pushed * 1000
            row["replied"] = len(latencies)
            row["p50_ms"] = pct(latencies, 0.5) * 1000
            row["p99_ms"] = pct(latencies, 0.99) * 1000
            row["mean_ms"] = statistics.fmean(latencies) * 1000
            print(f"  {label}: reply latency measured", flush=True)
            if profile and label == "host":
                command[command.index(profile)] = profile + ".cards"
            cards, _, _ = await with_bot(
                emu,
                [*command, "--mode", "cards"],
                bot_env,
                lambda label=label: card_load(emu, label),
            )
            row.update(cards)
            print(f"  {label}: card load measured", flush=True)
    print()
    print(
        f"reply latency at {args.rate:.0f} msg/s, {args.messages} messages (inject -> reply recorded by the emulator)"
    )
    print(
        f"{'bot':<10}{'replied':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'bot CPU ms/msg':>16}{'emulator CPU ms/msg':>21}"
    )
    for label, r in rows.items():
        print(
            f"{label:<10}{r['replied']:>9}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['mean_ms']:>9.2f}"
            f"{r['bot_cpu_ms']:>16.2f}{r['emu_cpu_ms']:>21.2f}"
        )
    print(
        "  (CPU per message: a rate R needs R x (bot + emulator) ms of CPU per second, on this machine's cores)"
    )
    print()
    print(
        f"AI cards: {CARD_USERS} users at once, {CARD_WORDS} words {CARD_DELAY * 1000:.0f} ms apart each"
    )
    print(
        f"{'bot':<10}{'updates':>9}{'upd/s':>8}{'busiest 1s':>12}{'403 Qps':>9}{'card calls':>12}{'FINISHED':>10}{'seconds':>9}"
    )
    for label, r in rows.items():
        print(
            f"{label:<10}{r['updates']:>9}{r['updates_per_s']:>8.1f}{r['busiest_1s']:>12}{r['qps_403']:>9}"
            f"{r['card_calls']:>12}{r['finished']:>10}{r['seconds']:>9.1f}"
        )
    if len(rows) == 2:
        ours, theirs = rows["host"], rows["official"]
        print()
        print("ratios host / official (lower is better)")
        print(f"  p50 reply latency   {ours['p50_ms'] / theirs['p50_ms']:.2f}x")
        print(f"  p99 reply latency   {ours['p99_ms'] / theirs['p99_ms']:.2f}x")
        print(f"  card calls          {ours['card_calls'] / max(1, theirs['card_calls']):.2f}x")
        print(f"  403 QpsLimit        {ours['qps_403']} vs {theirs['qps_403']}")
    print()
    print(
        "goals (issue 5): p99 <= 20 ms at 200 msg/s; card updates within the budget (8/s + burst 4), no QpsLimit storm"
    )


WARM_UP = 200


async def warm_then_measure(emu: Any, label: str, args: argparse.Namespace) -> list[float]:
    await reply_latency(emu, f"{label}-warm", WARM_UP, args.rate)
    # BENCH_PROFILE_EMULATOR=/path.prof: the emulator's side of the measured run under cProfile
    # (CPU seconds), with the host as the bot.
    path = os.environ.get("BENCH_PROFILE_EMULATOR")
    if not path or label != "host":
        return await reply_latency(emu, label, args.messages, args.rate)
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        return await reply_latency(emu, label, args.messages, args.rate)
    finally:
        profiler.disable()
        profiler.dump_stats(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bot", choices=["host", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["reply", "cards"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--client-id", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["host", "official"], help="measure one bot only")
    parser.add_argument("--messages", type=int, default=2000, help="messages in the latency run")
    parser.add_argument(
        "--rate", type=float, default=200.0, help="messages per second in the latency run"
    )
    args = parser.parse_args()
    if args.bot == "host" and args.profile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)
        profiler.runcall(run_host_bot, args.endpoint, args.client_id, args.mode)
        profiler.dump_stats(args.profile)
    elif args.bot == "host":
        run_host_bot(args.endpoint, args.client_id, args.mode)
    elif args.bot == "official":
        run_official_bot(args.client_id, args.mode)
    else:
        trio.run(orchestrate, args)


if __name__ == "__main__":
    main()
