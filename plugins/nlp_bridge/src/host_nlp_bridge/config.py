"""The ``[nlp_bridge]`` configuration section and the ``NLP_*`` environment variables.

The host validates the TOML table against ``NlpBridgeSection`` (types, and the checks in the
``__post_init__`` methods, reported as ``[nlp_bridge] <key>: <problem>``). ``resolve`` then merges
the environment (``NLP_BASE_URL``, ``NLP_API_KEY``, ``NLP_MODEL``) and checks the cross-references
(routes and fallbacks naming backends that exist), producing the ``BridgeSettings`` the bridge runs
with. Every field has a default: an empty section (and no variables) gives the built-in echo backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from host import Secret
from host_nlp_bridge.errors import ConfigurationError

__all__ = [
    "ECHO",
    "ENV_BACKEND",
    "BackendConfig",
    "BridgeSettings",
    "CacheConfig",
    "LimitsConfig",
    "MemoryConfig",
    "MessagesConfig",
    "NlpBridgeSection",
    "RouteConfig",
    "resolve",
]

#: The name of the built-in echo backend (always available, e.g. as a last fallback).
ECHO = "echo"
#: The name of the backend the ``NLP_*`` environment variables define.
ENV_BACKEND = "default"

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
_BROKEN_PLACEHOLDER = re.compile(r"\$\{(?!\w+\})[^}]{0,20}")
#: Names an http_json ``body`` template may use as ``${name}``.
TEMPLATE_VARIABLES = frozenset(
    {"text", "system", "messages", "history", "model", "conversation_id", "user_id", "user_name", "request_id"}
)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be greater than 0, got {value}")


def _not_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name}: must not be negative, got {value}")


class BackendConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge.backends.<name>]``: one NLP service."""

    #: ``openai`` (Chat Completions, SSE streaming), ``http_json`` (any JSON API) or ``echo``.
    type: Literal["openai", "http_json", "echo"] = "openai"

    # -- openai ---------------------------------------------------------------------------------
    #: openai: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
    base_url: str = ""
    #: openai: the model name; empty asks the server's ``/models`` once and takes the first.
    model: str = ""
    #: openai: extra body fields, e.g. ``{temperature = 0.2, max_tokens = 800}``.
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    #: openai: use SSE streaming when the bridge streams (false for servers without it).
    stream: bool = True
    #: openai: ask for token usage in streams (``stream_options.include_usage``).
    stream_usage: bool = True

    # -- http_json ------------------------------------------------------------------------------
    #: http_json: the full URL to call.
    url: str = ""
    #: http_json: the HTTP method.
    method: Literal["POST", "PUT"] = "POST"
    #: http_json: the request body, a table whose strings may use ``${text}``, ``${messages}``...
    body: dict[str, Any] = msgspec.field(default_factory=lambda: {"query": "${text}"})
    #: http_json: where the answer is in the response JSON, dotted (``data.answer``, ``choices.0.text``).
    answer_path: str = "answer"

    # -- shared by openai and http_json ---------------------------------------------------------
    #: Sent as ``Authorization: Bearer <key>`` (or in ``api_key_header`` as is). Never logged.
    api_key: Secret | None = None
    #: The header carrying ``api_key``; ``Authorization`` gets the ``Bearer`` scheme.
    api_key_header: str = "Authorization"
    #: Extra request headers.
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    #: Extra request headers whose values are secrets.
    secret_headers: dict[str, Secret] = msgspec.field(default_factory=dict)
    #: Overrides ``[nlp_bridge] system_prompt`` for this backend.
    system_prompt: str | None = None
    #: Seconds to open a connection.
    connect_timeout: float = 5.0
    #: Seconds of silence tolerated while reading: before the first byte, or between two chunks.
    read_timeout: float = 60.0
    #: Seconds one attempt may take in total, streaming included.
    total_timeout: float = 120.0
    #: Attempts per answer (1 = no retry). Only transient failures are retried.
    max_attempts: int = 3
    #: First backoff delay in seconds; doubles each retry, up to ``backoff_max``, with jitter.
    backoff_initial: float = 0.5
    #: Longest backoff delay in seconds.
    backoff_max: float = 8.0
    #: Longest ``Retry-After`` (seconds) honoured on 429/503; a longer one fails over at once.
    retry_after_max: float = 30.0
    #: Consecutive failed attempts that open the circuit breaker.
    breaker_failures: int = 5
    #: Seconds the breaker stays open before letting one probe call through (half-open).
    breaker_reset: float = 30.0
    #: Result cache: ``auto`` (only for requests without conversation memory), ``on`` or ``off``.
    cache: Literal["auto", "on", "off"] = "auto"
    #: Seconds a cached answer stays valid.
    cache_ttl: float = 300.0
    #: Most simultaneous HTTP connections to this backend.
    max_connections: int = 64

    # -- echo -----------------------------------------------------------------------------------
    #: echo: seconds before the first word (to simulate a slow model).
    delay: float = 0.0
    #: echo: seconds between words when streaming.
    chunk_delay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "total_timeout", "breaker_reset", "cache_ttl"):
            _positive(name, getattr(self, name))
        for name in ("backoff_initial", "backoff_max", "retry_after_max", "delay", "chunk_delay"):
            _not_negative(name, getattr(self, name))
        for name in ("max_attempts", "breaker_failures", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.type == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url: an openai backend needs an http:// or https:// URL such as "
                f"'http://127.0.0.1:8000/v1', got {self.base_url!r}"
            )
        if self.type == "http_json":
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url: an http_json backend needs an http:// or https:// URL, got {self.url!r}")
            if not self.answer_path.strip():
                raise ValueError("answer_path: must name where the answer is in the response JSON")
            unknown = sorted(_template_names(self.body) - TEMPLATE_VARIABLES)
            if unknown:
                raise ValueError(
                    f"body: unknown template variable(s) {', '.join(u if u.startswith('$') else '${' + u + '}' for u in unknown)}; "
                    f"known: {', '.join(sorted(TEMPLATE_VARIABLES))}"
                )


def _template_names(value: Any) -> set[str]:
    if isinstance(value, str):
        names = {m.group(1) for m in _PLACEHOLDER.finditer(value)}
        # "${ text }" or "${text" would silently be sent as is; report it as an unknown variable.
        names.update(m.group(0) for m in _BROKEN_PLACEHOLDER.finditer(value))
        return names
    if isinstance(value, dict):
        return set().union(*(_template_names(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_template_names(v) for v in value)) if value else set()
    return set()


class RouteConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[[nlp_bridge.routes]]``: send some messages to another backend."""

    #: The backend answering messages this route matches.
    backend: str
    #: Match messages starting with this command (e.g. ``/translate``); it is stripped from the text.
    command: str = ""
    #: Match messages in these conversation ids.
    conversations: list[str] = msgspec.field(default_factory=list)
    #: Answer without conversation memory (each message stands alone; cacheable under ``auto``).
    stateless: bool = False
    #: Overrides the system prompt for this route.
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.command and not self.conversations:
            raise ValueError(f"route to {self.backend!r}: set `command` or `conversations` (or both)")
        if self.command and (not self.command.startswith("/") or any(c.isspace() for c in self.command)):
            raise ValueError(f"command: expected one word starting with '/', got {self.command!r}")


class MemoryConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge.memory]``: what the bot remembers of a conversation."""

    #: Remember previous turns (false: every message stands alone).
    enabled: bool = True
    #: Most remembered turns (a turn is one question and its answer).
    max_turns: int = 10
    #: Most estimated tokens of remembered turns sent with a question (oldest dropped first).
    max_tokens: int = 3000
    #: Seconds without messages after which a conversation is forgotten.
    idle_ttl: float = 1800.0
    #: Most conversations remembered at once (least recently used forgotten first).
    max_conversations: int = 10_000
    #: Group chats: one shared memory per group (``conversation``) or one per member (``user``).
    group_scope: Literal["conversation", "user"] = "conversation"

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "max_conversations"):
            if getattr(self, name) < 1:
                raise ValueError(f"memory.{name}: must be at least 1")
        _positive("memory.idle_ttl", self.idle_ttl)


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge.limits]``: peak shaving."""

    #: Most backend calls in flight at once, all conversations together.
    max_concurrency: int = 8
    #: Most messages waiting for their turn; beyond it a message gets the ``busy`` reply at once.
    queue_size: int = 100
    #: Seconds a message may wait for its turn before it gets the ``busy`` reply.
    queue_timeout: float = 60.0
    #: Most messages of one conversation waiting at once; beyond it the ``busy`` reply (each waiting
    #: message holds a host worker: one flooding group must not take them all).
    max_waiting_per_conversation: int = 10
    #: A message arriving while its conversation is being answered: ``queue`` (answered next, in
    #: order) or ``merge`` (all messages waiting when the turn comes are answered as one).
    while_busy: Literal["queue", "merge"] = "queue"
    #: Messages per minute one user may send (0 disables the limit).
    user_rate_per_minute: float = 20.0
    #: Messages one user may send in a burst above the rate.
    user_burst: int = 5

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "queue_size", "user_burst", "max_waiting_per_conversation"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be at least 1")
        _positive("limits.queue_timeout", self.queue_timeout)
        _not_negative("limits.user_rate_per_minute", self.user_rate_per_minute)


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge.cache]``: the result cache (shared by all backends)."""

    #: Most cached answers.
    max_entries: int = 1000
    #: Most characters of cached answers, all together.
    max_chars: int = 2_000_000
    #: Serve identical requests in flight at the same time with one backend call.
    coalesce: bool = True

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_chars < 1:
            raise ValueError("cache.max_entries and cache.max_chars: must be at least 1")


class MessagesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge.messages]``: what users read when the bridge cannot simply answer."""

    busy: str = "I'm answering a lot of messages right now. Please try again in a minute."
    rate_limited: str = "You're sending messages faster than I can answer. Please wait about {seconds} s and try again."
    failure: str = "Sorry, I could not get an answer from the language service. Please try again later."
    timeout: str = "Sorry, the language service took too long to answer. Please try again."
    unavailable: str = "Sorry, the language service is temporarily unavailable. Please try again in a few minutes."
    incomplete: str = "\n\n(This answer is incomplete: the connection to the language service broke.)"
    reset: str = "Done: I've forgotten our conversation. Let's start over."
    #: Reply to a routed command without text (``{command}`` is replaced).
    command_usage: str = "Please write your message after {command}."
    #: Reply to a message without text (a picture, a file...); empty means stay silent.
    non_text: str = "I can only read text messages for now."


class NlpBridgeSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[nlp_bridge]``: the NLP bridge plugin."""

    #: Named backends. The ``NLP_*`` variables add (or replace) one named ``default``.
    backends: dict[str, BackendConfig] = msgspec.field(default_factory=dict)
    #: The backend answering messages no route matches; empty: ``default`` if the ``NLP_*``
    #: variables are set, else the first backend listed, else echo.
    default_backend: str = ""
    #: Backends tried in this order when the chosen one fails (after its retries) or its circuit is open.
    fallback: list[str] = msgspec.field(default_factory=list)
    routes: list[RouteConfig] = msgspec.field(default_factory=list)
    #: The system prompt sent first in every conversation (empty: none).
    system_prompt: str = "You are a helpful assistant in a company chat. Answer concisely."
    #: Stream answers token by token (an AI card on DingTalk) when the backend can.
    stream: bool = True
    #: Seconds from a message's arrival to the end of its answer, all retries and fallbacks included
    #: (also kept under the host's ``on_message`` timeout, or ``stream_timeout`` when streaming).
    answer_timeout: float = 120.0
    #: ``markdown`` or ``text`` replies (streamed replies are always markdown).
    reply_format: Literal["markdown", "text"] = "markdown"
    #: @-mention the asker when answering in a group chat.
    mention_sender: bool = False
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    messages: MessagesConfig = msgspec.field(default_factory=MessagesConfig)

    def __post_init__(self) -> None:
        _positive("answer_timeout", self.answer_timeout)
        for name in self.backends:
            if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"backends: invalid backend name {name!r} (letters, digits, _ . -)")
        commands = [r.command.lower() for r in self.routes if r.command]
        duplicates = sorted({c for c in commands if commands.count(c) > 1})
        if duplicates:
            raise ValueError(f"routes: command {duplicates[0]!r} is routed twice")
        if "/reset" in commands:
            raise ValueError("routes: '/reset' is the bridge's own command and cannot be routed")
        if ECHO in self.backends and self.backends[ECHO].type != "echo":
            raise ValueError(f"backends.{ECHO}: the name {ECHO!r} is reserved for the built-in echo backend")
        # The NLP_* variables define "default" later (resolve() checks it is then really defined).
        known = {*self.backends, ECHO, ENV_BACKEND}
        if self.default_backend and self.default_backend not in known:
            raise ValueError(f"default_backend: no backend named {self.default_backend!r}{_known(self.backends)}")
        for i, name in enumerate(self.fallback):
            if name not in known:
                raise ValueError(f"fallback[{i}]: no backend named {name!r}{_known(self.backends)}")
        for i, route in enumerate(self.routes):
            if route.backend not in known:
                raise ValueError(f"routes[{i}].backend: no backend named {route.backend!r}{_known(self.backends)}")


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """The validated configuration the bridge runs with (section + environment)."""

    section: NlpBridgeSection
    backends: dict[str, BackendConfig]
    default_backend: str
    fallback: tuple[str, ...]
    #: True when nothing was configured and the echo backend answers everything.
    echo_only: bool
    #: Names of the environment variables that were used.
    env_used: tuple[str, ...] = ()


def resolve(section: NlpBridgeSection, environ: Mapping[str, str]) -> BridgeSettings:
    """Merge the ``NLP_*`` variables into ``section`` and check cross-references.

    Raises ``ConfigurationError`` naming the key at fault.
    """
    backends = dict(section.backends)
    env_used: list[str] = []
    base_url = environ.get("NLP_BASE_URL", "").strip()
    if base_url:
        api_key = environ.get("NLP_API_KEY", "")
        try:
            backends[ENV_BACKEND] = BackendConfig(
                type="openai",
                base_url=base_url.rstrip("/"),
                api_key=Secret(api_key, source="env:NLP_API_KEY") if api_key else None,
                model=environ.get("NLP_MODEL", "").strip(),
            )
        except ValueError as exc:
            raise ConfigurationError(f"NLP_BASE_URL: {str(exc).removeprefix('base_url: ')}") from None
        env_used = [v for v in ("NLP_BASE_URL", "NLP_API_KEY", "NLP_MODEL") if environ.get(v)]
    backends.setdefault(ECHO, BackendConfig(type="echo"))

    def check(key: str, name: str) -> None:
        if name not in backends:
            hint = " (it is defined by NLP_BASE_URL, which is not set)" if name == ENV_BACKEND else ""
            raise ConfigurationError(f"[nlp_bridge] {key}: no backend named {name!r}{hint}{_known(backends)}")

    default = section.default_backend
    if default:
        check("default_backend", default)
    else:
        configured = [n for n in backends if n != ECHO]
        default = ENV_BACKEND if base_url else (configured[0] if configured else ECHO)
    for i, name in enumerate(section.fallback):
        check(f"fallback[{i}]", name)
    for i, route in enumerate(section.routes):
        check(f"routes[{i}].backend", route.backend)
    echo_only = all(b.type == "echo" for b in backends.values())
    return BridgeSettings(
        section=section,
        backends=backends,
        default_backend=default,
        fallback=tuple(dict.fromkeys(section.fallback)),
        echo_only=echo_only,
        env_used=tuple(env_used),
    )


def _known(backends: Mapping[str, BackendConfig]) -> str:
    names = sorted({*backends, ECHO})
    return f" (configured: {', '.join(names)})"
