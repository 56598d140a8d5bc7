"""Every hook the host calls, with its contract.

Plugins implement these with ``from host import hookimpl``. Implementations may leave out parameters
they do not need (pluggy passes only the ones named), but must never add parameters with defaults.

Calling rules shared by all hooks (enforced by ``host.dispatch``, the only module that calls hooks):

* **sync or async**: every hook marked "async allowed" may be implemented with ``async def``; the host
  awaits the coroutine. Registration hooks must be synchronous.
* **isolation**: each implementation runs on its own. One that raises, or runs past its timeout, is
  logged with its plugin name and the request id, counted in ``Dispatcher.statistics()``, and skipped;
  the other implementations and the connection carry on.
* **order**: pluggy's order (last registered first; ``tryfirst``/``trylast`` respected).
* **timeouts**: per hook, configurable per plugin in ``[host.timeouts]`` / ``[host.plugin_timeouts]``.

Adding a hook here requires a section in ``docs/hooks.md`` under its exact signature and a test that
names it (``tests/test_docs.py`` enforces both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from host.model import AuditEntry, Event, Message, ReplyResult
    from host.runtime import Host

hookspec = pluggy.HookspecMarker("host")

# ---------------------------------------------------------------------------------------------------
# Registration: called once per plugin at load time, synchronously, before anything runs.
# ---------------------------------------------------------------------------------------------------


@hookspec
def register_config_sections(register: Callable[..., None]) -> None:
    """Declare this plugin's configuration section(s).

    Called once when the plugin is loaded, before the configuration is validated.

    :param register: ``register(name, schema)`` where ``name`` is the TOML table (``[name]``) and
        ``schema`` a ``msgspec.Struct`` type whose fields all have defaults. The host validates the
        table against it and exposes the result as ``host.config.section(name)``. Fields typed
        ``host.Secret`` accept a literal, ``{env = "VAR"}`` or ``{file = "/path"}`` and are never logged.

    Return nothing. Results: every implementation is called. Must be synchronous. If it raises, the
    plugin is marked failed and unloaded; other plugins are unaffected.
    """


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Contribute subcommands to ``python -m host``.

    Called once when the CLI is built, after plugins are discovered.

    :param register: ``register(name, run, *, help="", configure=None)``. ``run(args) -> int`` is
        called with the parsed ``argparse.Namespace`` and returns the exit code; ``configure(parser)``
        adds arguments to the subcommand's parser. A name already taken (by the host or another
        plugin) is refused with an error naming both plugins.

    Return nothing. Results: every implementation is called. Must be synchronous. If it raises, the
    error is reported and the plugin's commands are left out; the CLI still works.
    """


@hookspec
def register_connectors(host: Host, register: Callable[..., None]) -> None:
    """Contribute connectors (the bridges to chat platforms).

    Called once at startup after configuration is validated, before ``on_startup``.

    :param host: the running host (for ``host.config``, ``host.metrics``).
    :param register: ``register(connector)`` with an object implementing
        ``host.connector.Connector``. Connector names must be unique.

    Return nothing. Results: every implementation is called. Must be synchronous (connect in the
    connector's ``serve``, not here). If it raises, the error is logged and the plugin's connectors
    are left out; the host starts with the others.
    """


@hookspec
def register_middleware(host: Host, register: Callable[..., None]) -> None:
    """Wrap message handling, e.g. to time, trace, rate-limit or authorize it.

    pluggy's own wrappers cannot time ``async`` code, so middleware is a plain async callable:
    ``async def middleware(message, call_next) -> None`` that awaits ``call_next(message)`` to continue
    (or does not, to stop the message). Called once at startup (again on hot reload); the host builds
    the chain from what is registered, the first registered middleware outermost.

    :param host: the running host.
    :param register: ``register(middleware)``.

    Return nothing. Results: every implementation is called. Must be synchronous. A middleware that
    raises while handling a message is logged with its plugin and request id; the user gets the
    host's apology reply (``[host] apology``) instead of silence.
    """


# ---------------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------------


@hookspec
def on_startup(host: Host) -> None:
    """The host is starting: open resources (clients, pools, files).

    Called once after all plugins are loaded and configuration is validated, before connectors start
    taking messages. For a plugin hot-reloaded later, called when its new version is registered.

    :param host: the running host.

    Return nothing. Results: every implementation is called. ``async def`` allowed. Timeout
    ``[host.timeouts] on_startup`` (default 30 s). If it raises or times out, the plugin is marked
    failed, unregistered and its ``on_shutdown`` is not called; the host starts without it.
    """


@hookspec
def on_shutdown(host: Host) -> None:
    """The host is stopping: release what ``on_startup`` opened.

    Called once after intake stopped and in-flight messages drained (or the drain deadline passed).
    For a hot-reloaded plugin, called before its old version is unregistered.

    :param host: the running host.

    Return nothing. Results: every implementation is called. ``async def`` allowed. Timeout
    ``[host.timeouts] on_shutdown`` (default 10 s). If it raises or times out, the error is logged
    and shutdown continues.
    """


# ---------------------------------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------------------------------


@hookspec
def on_message(host: Host, message: Message) -> ReplyResult:
    """A chat message arrived and was accepted into the host's queue.

    Called once per message (redeliveries are deduplicated by connectors), inside the middleware
    chain, with ``message.request_id`` set and bound to every log line.

    :param host: the running host.
    :param message: the platform-neutral message.

    Return ``None`` to pass; a ``host.Reply`` or ``str`` to answer; or an async iterator of ``str``
    chunks (e.g. an async generator) for a streamed reply, which the host feeds into the connector's
    streamed reply (an AI card on DingTalk) and always finalizes. Results: every implementation is
    called and every non-``None`` result is delivered, in hook order. ``async def`` allowed. Timeout
    ``[host.timeouts] on_message`` (default 30 s) bounds producing the result; a stream is bounded by
    ``[host] stream_timeout``. If an implementation raises or times out and no other implementation
    answered, the sender receives the apology reply.
    """


@hookspec
def on_event(host: Host, event: Event) -> None:
    """A platform event arrived (member added, group renamed, card button pressed...).

    Called once per event as the connector receives it (connectors deduplicate on the event id).

    :param host: the running host.
    :param event: the typed event.

    Return nothing. Results: every implementation is called. ``async def`` allowed. Timeout
    ``[host.timeouts] on_event`` (default 30 s). If any implementation raises or times out, the
    connector reports the event as not consumed (DingTalk: ACK ``LATER``, so it is redelivered).
    """


@hookspec
def on_audit(host: Host, entry: AuditEntry) -> None:
    """Record an auditable action (plugin loaded, config changed, permission changed...).

    Called by ``host.audit(...)``, which the host itself uses for plugin lifecycle and configuration
    events and which any plugin may call for its own sensitive operations. Secrets are redacted
    before this hook sees the entry.

    :param host: the running host.
    :param entry: the action.

    Return nothing. Results: every implementation is called. ``async def`` allowed. Timeout
    ``[host.timeouts] on_audit`` (default 5 s). If it raises or times out, the error is logged at
    ERROR (a lost audit record is serious) and counted; the audited action itself is not undone.
    """


#: Hook names, in documentation order (used by tests and ``host plugins``).
HOOK_NAMES: tuple[str, ...] = (
    "register_config_sections",
    "register_commands",
    "register_connectors",
    "register_middleware",
    "on_startup",
    "on_shutdown",
    "on_message",
    "on_event",
    "on_audit",
)
