"""``python -m host demo``: talk to your bot in the terminal, against a local DingTalk emulator.

No DingTalk account or credentials are needed. The demo

1. starts the DingTalk emulator in this process (``--port``, default 8780 or any free port);
2. runs the host with every installed plugin and your ``host.toml``, its DingTalk connector pointed
   at the emulator (the configured credentials, if any, are not used: plain ``python -m host``
   serves the real DingTalk with them), with AI cards on;
3. opens a chat: what you type is sent as a DingTalk user, in a 1:1 chat with the bot or in a group
   (``/single``, ``/group``), and the bot's answer is printed as it streams into its AI card.

Log lines go to a file (``--log-file``, else ``[logging] file``, else ``logs/demo.log``), not to the
terminal. The emulator's chat page (the same conversations in a browser) is printed at start.

``python -m host demo --say "hello"`` sends one message, prints the bot's complete reply on stdout
and exits 0; it exits 1 with a message on stderr when no reply arrives within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from host.runtime import Host
    from host_dingtalk_connector.emulator import Emulator

__all__ = ["DEMO_TEMPLATE", "configure_parser", "run_demo"]

#: The AI card template of the official SDK's public AI card (the emulator accepts any id).
DEMO_TEMPLATE = "382e4302-551d-4880-bf29-a30acfab2e71.schema"
DEFAULT_PORT = 8780
DEMO_USER = "demo.user"
DEMO_NICK = "You"
_TERMINAL = ("FINISHED", "FAILED")
_HELP = """commands:
  /single   talk to the bot in a 1:1 chat (the default)
  /group    talk in a group chat (the bot answers messages that @ it; yours always do)
  /page     print the emulator's chat page address
  /help     this list
  /quit     leave (also Ctrl-D, Ctrl-C)"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m host demo``."""
    parser.add_argument(
        "--say", metavar="TEXT", help="send one message, print the reply, exit (for scripts)"
    )
    parser.add_argument(
        "--group", action="store_true", help="start in a group chat instead of a 1:1 chat"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for a reply (default 60)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"emulator port: chat page and OpenAPIs (default {DEFAULT_PORT}, any free port if taken; 0 = any)",
    )  # fmt: skip
    parser.add_argument(
        "--log-file", metavar="PATH", help="log file (default: [logging] file, else logs/demo.log)"
    )


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of the ``demo`` command; returns the exit code."""
    import trio

    from host.config import load_config
    from host.errors import ConfigError

    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    data = copy.deepcopy(config.data)
    log_file = args.log_file or config.logging.file or os.path.join("logs", "demo.log")
    if _has_credentials(data.get("dingtalk")) and not args.say:
        print("note: DingTalk credentials are configured; the demo does not use them (run `python -m host` "
              "to serve DingTalk).", file=sys.stderr)  # fmt: skip
    try:
        return trio.run(_main, args, data, log_file, config.source)
    except KeyboardInterrupt:
        return 130


def _has_credentials(section: Any) -> bool:
    if os.environ.get("DINGTALK_CLIENT_ID") and os.environ.get("DINGTALK_CLIENT_SECRET"):
        return True
    return isinstance(section, dict) and bool(section.get("client_id") or section.get("apps"))


def _free_port(preferred: int) -> int:
    """``preferred`` if it can be bound on 127.0.0.1 now, else 0 (any free port)."""
    if preferred == 0:
        return 0
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def demo_config(data: dict[str, Any], emu: Emulator, log_file: str) -> dict[str, Any]:
    """The user's configuration with the connector pointed at ``emu`` and the demo's quiet defaults."""
    data = copy.deepcopy(data)
    data["logging"] = {**data.get("logging", {}), "file": log_file}
    # The demo must not collide with a host running here: no HTTP port, no control socket.
    data["http"] = {**data.get("http", {}), "enabled": False}
    host = data.setdefault("host", {})
    host["control_socket"] = ""
    host["reload"] = {**host.get("reload", {}), "watch_entry_points": False}
    mine = {k: v for k, v in (data.get("dingtalk") or {}).items()
            if k not in ("client_id", "client_secret", "robot_code", "apps", "openapi_endpoint", "oapi_endpoint")}  # fmt: skip
    mine.update(enabled=True, client_id=emu.settings.client_id, client_secret=emu.settings.client_secret,
                openapi_endpoint=emu.base_url)  # fmt: skip
    mine["cards"] = {"template_id": DEMO_TEMPLATE, **mine.get("cards", {})}
    if "mode" in mine:
        mine["mode"] = "stream"  # the demo talks to the emulator over the Stream connection
    data["dingtalk"] = mine
    if (
        importlib.util.find_spec("host_nlp_bridge") is not None
        and "nlp_bridge" not in data
        and not os.environ.get("NLP_BASE_URL")
    ):
        # The echo backend answers: let it type at a visible pace, like a model would.
        data["nlp_bridge"] = {"backends": {"echo": {"type": "echo", "chunk_delay": 0.05}}}
    return data


async def _main(args: argparse.Namespace, data: dict[str, Any], log_file: str, source: str) -> int:
    import trio

    from host.config import load_config
    from host.errors import ConfigError
    from host.logs import setup_logging
    from host.runtime import build_host
    from host_dingtalk_connector.emulator import open_emulator

    out = sys.stdout
    async with open_emulator(port=_free_port(args.port), users={DEMO_USER: DEMO_NICK}) as emu:
        try:
            config = load_config(data=demo_config(data, emu, log_file))
            setup_logging(config.logging)
            host = build_host(config)
        except ConfigError as exc:
            print(f"configuration error ({source}): {exc}", file=sys.stderr)
            return 2
        if "dingtalk" not in host.connectors:
            print("the DingTalk connector did not start; see the log: " + log_file, file=sys.stderr)
            return 1
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            try:
                if args.say is not None:
                    return await _say(emu, host, args, out)
                return await _chat(emu, host, args, out, log_file)
            finally:
                host.request_shutdown()
    return 0


async def _say(emu: Emulator, host: Host, args: argparse.Namespace, out: TextIO) -> int:
    import trio

    kind = "group" if args.group else "single"
    with trio.move_on_after(args.timeout):
        sent = await emu.send_user_message(
            args.say, conversation_type=kind, sender_staff_id=DEMO_USER
        )
        texts = await _replies(emu, host, sent["conversationId"], 0, None)
        print("\n".join(texts), file=out, flush=True)
        return 0
    print(f"no reply within {args.timeout:g}s (see the log for why)", file=sys.stderr)
    return 1


async def _chat(
    emu: Emulator, host: Host, args: argparse.Namespace, out: TextIO, log_file: str
) -> int:
    import trio

    plugins = ", ".join(sorted(r.name for r in host.plugins.loaded())) or "none"
    print("host demo: your bot, a local DingTalk emulator, no credentials needed.", file=out)
    print(f"  chat page  {emu.base_url}/   (the same chats in a browser)", file=out)
    print(f"  plugins    {plugins}", file=out)
    print(f"  log file   {log_file}", file=out)
    print("Type a message as a DingTalk user; /help lists the commands.", file=out, flush=True)
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()  # Ctrl-C: leave the chat, shut down gracefully
                    return

            nursery.start_soon(on_signal)
            await _chat_loop(emu, host, args, out, log_file)
            nursery.cancel_scope.cancel()
    print("\nbye", file=out, flush=True)
    return 0


async def _chat_loop(
    emu: Emulator, host: Host, args: argparse.Namespace, out: TextIO, log_file: str
) -> None:
    import trio

    kind = "group" if args.group else "single"
    while True:
        line = await _read_line(f"you ({'group' if kind == 'group' else '1:1'})> ", out)
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/quit", "/exit"):
                return
            if command in ("/group", "/single"):
                kind = command[1:]
                print(
                    f"(now in a {'group chat' if kind == 'group' else '1:1 chat with the bot'})",
                    file=out,
                )
            elif command == "/page":
                print(f"chat page: {emu.base_url}/", file=out)
            elif command == "/help":
                print(_HELP, file=out)
            else:
                print(f"unknown command {command}; /help lists the commands", file=out)
            continue
        conversation = _conversation_of(emu, kind)
        before = len(emu.bot_messages(conversation)) if conversation else 0
        sent = await emu.send_user_message(text, conversation_type=kind, sender_staff_id=DEMO_USER)
        with trio.move_on_after(args.timeout) as waited:
            await _replies(emu, host, sent["conversationId"], before, out)
        if waited.cancelled_caught:
            print(f"\n(no reply within {args.timeout:g}s; see {log_file})", file=out, flush=True)


def _conversation_of(emu: Emulator, kind: str) -> str | None:
    if kind == "group":
        return emu.state.default_group.id
    chat = emu.state.single_chat_of(DEMO_USER)
    return chat.id if chat is not None else None


async def _read_line(prompt: str, out: TextIO) -> str | None:
    """One line from stdin (``None`` at end of input), without blocking the event loop."""
    import trio

    out.write(prompt)
    out.flush()
    line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
    return line if line else None


async def _replies(
    emu: Emulator, host: Host, conversation: str, start: int, out: TextIO | None
) -> list[str]:
    """Follow the bot's replies in ``conversation`` from the ``start``-th on, until the host is idle.

    Cards are followed as they grow (printed to ``out`` as they stream, when given). Returns the
    final text of every reply.
    """

    def count() -> int:
        return len(emu.bot_messages(conversation))

    async def more_than(n: int) -> None:
        await emu.wait_until(lambda: True if count() > n else None)

    texts: list[str] = []
    index = start
    while True:
        await more_than(index)
        message = emu.bot_messages(conversation)[index]
        index += 1
        card = bool(message.get("outTrackId"))
        if out is not None:
            out.write("bot (AI card)> " if card else "bot> ")
            out.flush()
        if card:
            text, state = await _follow_card(emu, message["outTrackId"], out)
            if state == "FAILED" and out is not None:
                out.write("  [card marked failed]")
        else:
            text = message["text"]
            if out is not None:
                out.write(text)
        if out is not None:
            out.write("\n")
            out.flush()
        texts.append(text)
        # More replies may follow (the rest of a long answer, other plugins): wait until the host
        # has finished with the message, or another reply arrives.
        winner = await _first(functools.partial(more_than, index), host.wait_idle)
        if winner == 1 and count() <= index:
            return texts


async def _follow_card(emu: Emulator, out_track_id: str, out: TextIO | None) -> tuple[str, str]:
    shown = ""

    def changed(old: str) -> dict[str, Any] | None:
        card = emu.card(out_track_id)
        return card if card["text"] != old or card["state"] in _TERMINAL else None

    while True:
        card = await emu.wait_until(functools.partial(changed, shown))
        text = card["text"]
        if out is not None and text != shown:
            if text.startswith(shown):
                out.write(text[len(shown) :])
            else:  # the card's ending was replaced (a long answer's tail): show the new ending
                common = next(
                    (i for i, (a, b) in enumerate(zip(shown, text, strict=False)) if a != b),
                    len(shown),
                )
                out.write("\n" + text[common:])
            out.flush()
        shown = text
        if card["state"] in _TERMINAL:
            return text, card["state"]


async def _first(*waiters: Callable[[], Awaitable[Any]]) -> int:
    """Run the waiters together; return the index of the first to finish (the others are cancelled)."""
    import trio

    winner = -1
    async with trio.open_nursery() as nursery:
        for i, waiter in enumerate(waiters):

            async def run(i: int = i, waiter: Callable[[], Awaitable[Any]] = waiter) -> None:
                nonlocal winner
                await waiter()
                if winner < 0:
                    winner = i
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
    return winner
