"""``python -m host``: run the host, inspect plugins, check configuration, plugin subcommands.

Plugin-contributed subcommands (``register_commands``) are added after the installed plugins are
discovered, so ``python -m host --help`` lists them. Exit codes: 0 success, 1 runtime failure,
2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio

from host import __version__, admin_cli
from host.config import Config, load_config
from host.dispatch import Dispatcher
from host.errors import ConfigError, HostError
from host.logs import current_plugin, logger, setup_logging
from host.plugins import HOST_API_VERSION, PluginManager
from host.reload import send_control_command
from host.runtime import Host, build_host

__all__ = ["main", "run_until_signal"]

_BUILTIN = {"run", "plugins", "config", "reload", "admin"}


class _Command:
    def __init__(self, plugin: str, name: str, run: Callable[[argparse.Namespace], int], help: str,
                 configure: Callable[[argparse.ArgumentParser], None] | None) -> None:
        self.plugin, self.name, self.run, self.help, self.configure = plugin, name, run, help, configure


def _plugin_commands(manager: PluginManager) -> dict[str, _Command]:
    commands: dict[str, _Command] = {}

    def register(
        name: str,
        run: Callable[[argparse.Namespace], int],
        *,
        help: str = "",
        configure: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> None:
        plugin = current_plugin.get()
        if name in _BUILTIN:
            raise ValueError(f"command {name!r} is built into the host")
        if name in commands:
            raise ValueError(f"command {name!r} is already provided by plugin {commands[name].plugin!r}")
        commands[name] = _Command(plugin, name, run, help, configure)

    Dispatcher(manager).call_sync("register_commands", register=register)
    return commands


def _build_parser(commands: dict[str, _Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m host",
        description="A minimal plugin host for enterprise chat bots. Without a command, runs the host.",
    )
    parser.add_argument("--version", action="version",
                        version=f"host {__version__} (host API {HOST_API_VERSION})")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default: $HOST_CONFIG, else ./host.toml if present)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the host until SIGINT/SIGTERM (the default)")
    plugins = sub.add_parser("plugins", help="list installed plugins and their state")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_sub.add_parser("check", help="validate the configuration without running")
    config_sub.add_parser("show", help="print the validated configuration, secrets redacted")
    reload = sub.add_parser(
        "reload",
        help="tell the running host to reload a plugin (or the configuration and every changed plugin)",
    )
    reload.add_argument("plugin", nargs="?", help="plugin name; omit to reload everything that changed")
    reload.add_argument("--json", action="store_true", help="print the host's JSON answer")
    admin_cli.configure_parser(sub)
    for command in commands.values():
        p = sub.add_parser(command.name, help=f"{command.help} [plugin {command.plugin}]")
        if command.configure is not None:
            command.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config: Config | None
    config_error: ConfigError | None = None
    try:
        config = load_config(known.config)
    except ConfigError as exc:
        config, config_error = None, exc
    # Until we know the command, keep discovery quiet on stderr (warnings only).
    setup_logging(config.logging if config else load_config(data={}).logging, stream=sys.stderr)
    _quiet()
    manager = PluginManager(
        allow=config.plugins.allow if config else (),
        deny=config.plugins.deny if config else (),
    )
    manager.load_entry_points()
    commands = _plugin_commands(manager)
    parser = _build_parser(commands)
    args = parser.parse_args(argv)
    command = args.command or "run"

    if command == "plugins":
        return _cmd_plugins(manager, as_json=args.json)
    if config is None:
        assert config_error is not None
        print(f"configuration error: {config_error}", file=sys.stderr)
        return 2
    if command == "config":
        return _cmd_config(config, manager, show=args.config_command == "show")
    if command == "run":
        return run(config, manager)
    if command == "reload":
        return _cmd_reload(config, args.plugin, as_json=args.json)
    if command == "admin":
        return admin_cli.run(config, args)
    return commands[command].run(args)


def _quiet() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}", diagnose=False)


def _cmd_plugins(manager: PluginManager, *, as_json: bool) -> int:
    listing = manager.listing()
    if as_json:
        print(msgspec.json.encode(listing).decode())
        return 0
    if not listing:
        print("no plugins installed (entry-point group 'host.plugins')")
        return 0
    rows = [("NAME", "DISTRIBUTION", "VERSION", "STATE", "HOOKS / ERROR")]
    for item in listing:
        detail = item["error"] if item["error"] else ", ".join(item["hooks"])
        rows.append((item["name"], item["distribution"] or "-", item["version"] or "-", item["state"], detail))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + str(row[4]))
    return 0


def _cmd_config(config: Config, manager: PluginManager, *, show: bool) -> int:
    try:
        host = Host(config, manager)
        host.configure()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if show:
        print(msgspec.json.encode(config.redacted()).decode())
    else:
        print(f"configuration OK: {config.source} (sections: {', '.join(sorted(config.redacted()))})")
    return 0


def _cmd_reload(config: Config, plugin: str | None, *, as_json: bool) -> int:
    path = config.host.control_socket
    if not path:
        print("the control socket is disabled ([host] control_socket is empty); send SIGHUP instead",
              file=sys.stderr)
        return 2
    try:
        answer = send_control_command(path, {"command": "reload", "plugin": plugin})
    except OSError as exc:
        print(f"cannot reach the running host at {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if as_json:
        print(msgspec.json.encode(answer).decode())
    elif "error" in answer:
        print(f"refused: {answer['error']}", file=sys.stderr)
    else:
        if not answer["results"]:
            print("nothing changed")
        for result in answer["results"]:
            versions = f"{result['old_version'] or '-'} -> {result['new_version'] or '-'}"
            error = f": {result['error']}" if result.get("error") else ""
            print(f"{result['plugin']}: {result['outcome']} ({versions}){error}")
    return 0 if answer.get("ok") else 1


def run(config: Config, manager: PluginManager | None = None) -> int:
    """Run the host until a signal; returns the exit code."""
    setup_logging(config.logging, development=config.host.environment == "development")
    try:
        if manager is None:
            host = build_host(config)
        else:
            host = Host(config, manager)
            host.configure()
    except ConfigError as exc:
        logger.error("configuration error: {}", exc)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    failures: list[BaseException] = []
    try:
        trio.run(run_until_signal, host)
    except* HostError as group:
        # e.g. the HTTP server cannot listen: one clear line, not nested exception groups.
        failures.extend(_leaves(group))
    if failures:
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def run_until_signal(host: Host, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run ``host``; the first SIGINT/SIGTERM shuts down gracefully, a second one immediately.

    SIGHUP reloads the configuration and every plugin whose installed version changed.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        logger.info("received SIGHUP: reloading configuration and changed plugins")
                        host.reloader.request(None)
                        continue
                    if host._shutdown.is_set():
                        logger.warning("second {}: stopping immediately", name)
                        nursery.cancel_scope.cancel()
                        return
                    logger.info("received {}: shutting down gracefully", name)
                    host.request_shutdown()

            nursery.start_soon(watch)
            await host.run(task_status=task_status)
            nursery.cancel_scope.cancel()
