"""``python -m host_dingtalk_connector.emulator``: run the DingTalk emulator until Ctrl-C.

The first line printed is the base URL (scripts can read it); the chat page is at that URL.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import msgspec
import trio

from .settings import DEFAULT_CLIENT_ID, EmulatorSettings

DEFAULT_PORT = 8780


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    names = EmulatorSettings.field_names()
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or key not in names:
            raise SystemExit(f"--set expects KEY=VALUE with KEY one of the settings; got {item!r}")
        try:
            overrides[key] = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            overrides[key] = raw  # plain strings need no quotes
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m host_dingtalk_connector.emulator",
                                     description="A local DingTalk for bot development and tests.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"HTTP port: OpenAPIs, chat page, control API (default {DEFAULT_PORT}; 0 = any)")
    parser.add_argument("--gateway-port", type=int, default=0,
                        help="port of the Stream WebSocket endpoint (default 0 = any free port)")
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID, help="the app's Client ID (AppKey)")
    parser.add_argument("--client-secret", default=None,
                        help="the app's Client Secret (default: the documented emulator secret)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any EmulatorSettings field, value as JSON (repeatable), e.g. --set push_policy=newest")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    return parser


async def _serve(settings: EmulatorSettings) -> None:
    from .server import open_emulator

    # Ctrl-C / SIGTERM end the run through this receiver: a clean, ordinary shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_emulator(settings) as emu:
            print(emu.base_url, flush=True)
            print(f"  Stream gateway   {emu.gateway_url}", flush=True)
            print(f"  session webhooks {emu.webhook_url}", flush=True)
            print(f"  client id        {settings.client_id}", flush=True)
            print(f"  chat page        {emu.base_url}/", flush=True)
            print(f"  control API      {emu.base_url}/_emulator/", flush=True)
            print("  (Ctrl-C to stop)", flush=True)
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = _parse_set(args.set)
    overrides.update(host=args.host, port=args.port, gateway_port=args.gateway_port,
                     client_id=args.client_id)
    if args.client_secret is not None:
        overrides["client_secret"] = args.client_secret
    try:
        settings = EmulatorSettings(**overrides)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from host.config import LoggingSection
    from host.logs import setup_logging

    setup_logging(LoggingSection(level=args.log_level.upper(), dir=""))
    try:
        trio.run(_serve, settings)
    except KeyboardInterrupt:
        return 0
    except BaseExceptionGroup as group:
        # Ctrl-C can surface wrapped by a nursery (hypercorn's) rather than bare.
        interrupted, rest = group.split(KeyboardInterrupt)
        if interrupted is not None and rest is None:
            return 0
        raise
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
