"""Configuration: one TOML file, a section per plugin, validated with msgspec.

Where values come from, later wins:

1. the schema defaults;
2. the TOML file: ``--config PATH``, else ``$HOST_CONFIG``, else ``./host.toml`` if it exists;
3. environment overrides: the named ones in ``ENV_OVERRIDES`` (``HOST_LOG_LEVEL``...), then the generic
   ``HOST__<SECTION>__<KEY>=<value>`` (the value is parsed as a TOML value when it parses, else taken as
   a string; section and key are lower-cased; ``__`` nests further).

Secrets are ``Secret`` values: in TOML a literal string, ``{ env = "VAR" }`` or ``{ file = "/path" }``.
A ``Secret`` never shows its value in ``repr``/``str``; every secret value loaded is also registered with
the log sink, which masks it wherever it would appear.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import threading
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from host.errors import ConfigError

__all__ = [
    "ENV_OVERRIDES",
    "AccessRole",
    "AccessSection",
    "AdminKey",
    "AdminSection",
    "Config",
    "HostSection",
    "HttpSection",
    "LoggingSection",
    "PluginsSection",
    "ReloadSection",
    "Secret",
    "TlsSection",
    "known_secret_values",
    "load_config",
    "redact",
]

_secret_lock = threading.Lock()
_known_secrets: set[str] = set()


def known_secret_values() -> frozenset[str]:
    """Every secret value loaded in this process (for masking in log output)."""
    return frozenset(_known_secrets)


def register_secret_value(value: str) -> None:
    # Very short values would mask innocent substrings everywhere; they are weak secrets anyway.
    if len(value) >= 4:
        with _secret_lock:
            _known_secrets.add(value)


class Secret:
    """A secret string (AppSecret, API key, token). ``reveal()`` is the only way to read it."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str = "literal") -> None:
        self._value = value
        self._source = source
        register_secret_value(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('**********', source={self._source!r})"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def redact(value: Any) -> Any:
    """A copy of ``value`` safe to print or audit: Secrets and known secret strings masked."""
    if isinstance(value, Secret):
        return "**********"
    if isinstance(value, msgspec.Struct):
        return redact(msgspec.structs.asdict(value))
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        for secret in known_secret_values():
            if secret in value:
                value = value.replace(secret, "**********")
        return value
    return value


def _dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Secret:
        if isinstance(obj, Secret):
            return obj
        if isinstance(obj, str):
            return Secret(obj)
        if isinstance(obj, dict) and set(obj) == {"env"}:
            var = obj["env"]
            if var not in os.environ:
                raise ValueError(f"environment variable {var!r} named by the secret is not set")
            return Secret(os.environ[var], source=f"env:{var}")
        if isinstance(obj, dict) and set(obj) == {"file"}:
            path = Path(obj["file"])
            try:
                return Secret(path.read_text().strip(), source=f"file:{path}")
            except OSError as exc:
                raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
        raise ValueError('expected a string, {env = "VAR"} or {file = "/path"}')
    raise NotImplementedError(type_)


class ReloadSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[host.reload]``: hot reload of plugins and configuration."""

    #: A directory of drop-in plugins (``name.py`` or ``name/__init__.py``), loaded at startup and
    #: reloaded when their files change. Empty: none.
    plugins_dir: str = ""
    #: Reload drop-in plugins when their files change (watchfiles); else only on request/SIGHUP.
    watch_plugins_dir: bool = True
    #: Poll the installed ``host.plugins`` entry points and reload what pip installed, upgraded or removed.
    watch_entry_points: bool = True
    entry_point_poll_seconds: float = 5.0
    #: Quiet time after a file change before reloading (an editor saves several files at once).
    debounce_seconds: float = 0.5
    #: Seconds to wait for a plugin's in-flight calls before swapping it anyway.
    drain_timeout: float = 30.0


class HostSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[host]``: the runtime."""

    #: Messages handled at the same time (worker tasks).
    concurrency: int = 64
    #: Accepted messages waiting for a worker; when full, connectors stop taking messages.
    queue_size: int = 1024
    #: Seconds to drain in-flight messages on shutdown before cancelling them.
    shutdown_timeout: float = 10.0
    #: Seconds a streamed reply may run in total before it is cut and finalized.
    stream_timeout: float = 300.0
    #: Sent when handling a message failed and nobody answered.
    apology: str = "Sorry, something went wrong on my side and I could not answer. Please try again."
    #: Sent when every plugin passed on a message; empty means send nothing.
    fallback_reply: str = ""
    #: Per-hook timeouts in seconds, e.g. ``{on_message = 60}``.
    timeouts: dict[str, float] = msgspec.field(default_factory=dict)
    #: Per-plugin, per-hook timeouts, e.g. ``{nlp_bridge = {on_message = 120}}``.
    plugin_timeouts: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    #: ``development`` turns on loguru's variable-printing tracebacks (they may print secrets).
    environment: Literal["production", "development"] = "production"
    #: Unix socket (created 0600) through which ``python -m host reload`` commands the running host;
    #: empty disables it.
    control_socket: str = ".host/control.sock"
    reload: ReloadSection = msgspec.field(default_factory=ReloadSection)


class LoggingSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[logging]``."""

    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: ``auto``: readable text on a TTY, JSON lines otherwise.
    format: Literal["auto", "json", "text"] = "auto"
    #: Directory of the error log (``error.log``); empty disables it.
    dir: str = "logs"
    #: When the error log rotates (loguru rotation syntax).
    error_rotation: str = "00:00"
    #: How long rotated error logs are kept, in days (at least 30).
    error_retention_days: int = 30
    #: Also write every log line to this file (used by ``host demo``); empty means stderr only.
    file: str = ""


class PluginsSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[plugins]``: which installed plugins may load."""

    #: If non-empty, only these plugins load.
    allow: list[str] = msgspec.field(default_factory=list)
    #: These plugins never load (wins over ``allow``).
    deny: list[str] = msgspec.field(default_factory=list)


class HttpSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[http]``: the host's HTTP server (``/metrics``, ``/healthz``, ``/readyz``, plugin routes)."""

    #: Serve HTTP at all.
    enabled: bool = True
    #: ``HOST:PORT`` to listen on (``[::1]:9464`` for IPv6; port 0 picks a free port). Loopback by
    #: default: ``/metrics`` is not for the internet. Use ``0.0.0.0:9464`` in a container.
    addr: str = "127.0.0.1:9464"
    #: PEM certificate chain and private key: serve HTTPS instead of HTTP, with the host's TLS policy
    #: (TLS 1.2+, forward-secret AEAD ciphers; see ``host.tls``). Both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    #: Password of an encrypted ``tls_key``, if it is encrypted.
    tls_key_password: Secret | None = None

    def __post_init__(self) -> None:
        self.host_port()  # a malformed address is a configuration error, found at load time
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: set both (to serve HTTPS) or neither")

    @property
    def tls(self) -> bool:
        """Whether the server serves HTTPS."""
        return bool(self.tls_cert)

    def host_port(self) -> tuple[str, int]:
        """``addr`` split into host and port (``ValueError`` naming the problem if malformed)."""
        host, sep, port = self.addr.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"addr: expected HOST:PORT (e.g. 127.0.0.1:9464), got {self.addr!r}")
        return host, int(port)


class TlsSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[tls]``: the TLS policy of outbound connections (see ``host.tls``)."""

    #: An extra PEM CA bundle (file or hashed directory) trusted in addition to the system store,
    #: for private CAs. ``SSL_CERT_FILE``/``SSL_CERT_DIR`` replace the system store instead.
    ca_file: str = ""


#: Algorithms an admin token key may be pinned to. ``none`` and anything else are refused.
ADMIN_ALGORITHMS = ("EdDSA", "ES256", "RS256", "HS256", "HS384", "HS512")
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class AdminKey(msgspec.Struct, forbid_unknown_fields=True):
    """``[admin.keys.<kid>]``: one key admin tokens may be signed with, pinned to one algorithm."""

    algorithm: Literal["EdDSA", "ES256", "RS256", "HS256", "HS384", "HS512"]
    #: HS256/HS384/HS512: the shared secret (at least as long as the hash: 32/48/64 bytes).
    secret: Secret | None = None
    #: EdDSA/ES256/RS256: PEM public key that verifies tokens (the host needs only this).
    public_key_file: str = ""
    #: EdDSA/ES256/RS256: PEM private key, only where tokens are minted (``python -m host admin
    #: token``); the public key is derived from it when ``public_key_file`` is empty.
    private_key_file: str = ""

    @property
    def symmetric(self) -> bool:
        return self.algorithm.startswith("HS")


class AdminSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[admin]``: the admin API on the host's HTTP server (``/admin/...``; see ``host.admin``)."""

    enabled: bool = False
    #: Required ``iss`` and ``aud`` claims of admin tokens.
    issuer: str = "host-admin"
    audience: str = "host-admin-api"
    #: Longest accepted token lifetime, ``exp - iat``, in seconds.
    max_token_lifetime: float = 900.0
    #: Clock skew tolerated on ``exp``/``iat``/``nbf`` and the request-signature timestamp, seconds.
    leeway: float = 30.0
    #: Lifetime of tokens minted by ``python -m host admin token``, seconds.
    token_ttl: float = 300.0
    #: Token keys by key id (``kid`` header); several at once for rotation.
    keys: dict[str, AdminKey] = msgspec.field(default_factory=dict)
    #: Client addresses (CIDRs) allowed to call the admin API; the peer address of the connection.
    allow_ips: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    #: HMAC-SHA256 request-signing keys by key id (at least 32 bytes each).
    request_keys: dict[str, Secret] = msgspec.field(default_factory=dict)
    #: Every admin request must be signed (``X-Host-Signature`` ...); else signatures are checked
    #: when present.
    require_signed_requests: bool = False
    #: How far a signed request's timestamp may be from now, seconds (nonces are kept twice as long).
    signature_window: float = 300.0
    #: How many recent nonces are remembered (replay protection); beyond it signed requests get 429.
    nonce_cache_size: int = 10000
    #: Largest accepted request body, bytes.
    max_body_bytes: int = 65536
    #: Pinned audit-log public keys (PEM files) for ``/admin/audit/verify``; empty: the keys the log
    #: announces itself.
    audit_public_keys: list[str] = msgspec.field(default_factory=list)
    #: Denied attempts audited per minute at most (the rest are counted, then summarized).
    audit_denied_per_minute: int = 60

    def __post_init__(self) -> None:
        for kid, key in self.keys.items():
            _check_kid(kid, "keys")
            if key.symmetric:
                if key.secret is None or key.public_key_file or key.private_key_file:
                    raise ValueError(f"keys.{kid}: {key.algorithm} needs `secret` (and no key files)")
                need = _HMAC_MIN_BYTES[key.algorithm]
                if len(key.secret.reveal().encode()) < need:
                    raise ValueError(f"keys.{kid}: the {key.algorithm} secret must be at least {need} bytes")
            elif key.secret is not None or not (key.public_key_file or key.private_key_file):
                raise ValueError(
                    f"keys.{kid}: {key.algorithm} needs `public_key_file` (or `private_key_file`), not `secret`"
                )
        for kid, secret in self.request_keys.items():
            _check_kid(kid, "request_keys")
            if len(secret.reveal().encode()) < 32:
                raise ValueError(f"request_keys.{kid}: must be at least 32 bytes")
        for cidr in self.allow_ips:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"allow_ips: {cidr!r} is not an IP network (e.g. 10.0.0.0/8)") from None
        if not 0 < self.max_token_lifetime <= 86400:
            raise ValueError("max_token_lifetime: must be > 0 and at most 86400 seconds")
        if not 0 < self.token_ttl <= self.max_token_lifetime:
            raise ValueError("token_ttl: must be > 0 and at most max_token_lifetime")
        if not 0 <= self.leeway <= 300:
            raise ValueError("leeway: must be between 0 and 300 seconds")
        if not 0 < self.signature_window <= 3600:
            raise ValueError("signature_window: must be > 0 and at most 3600 seconds")
        if self.nonce_cache_size < 1 or self.max_body_bytes < 0 or self.audit_denied_per_minute < 0:
            raise ValueError("nonce_cache_size must be >= 1; max_body_bytes, audit_denied_per_minute >= 0")
        if self.enabled and not self.keys:
            raise ValueError("enabled = true needs at least one token key in [admin.keys.<kid>]")
        if self.require_signed_requests and not self.request_keys:
            raise ValueError("require_signed_requests = true needs at least one key in [admin.request_keys]")


def _check_kid(kid: str, table: str) -> None:
    if not _KID.match(kid):
        raise ValueError(f"{table}: key id {kid!r} must be 1-64 of A-Z a-z 0-9 . _ -")


class AccessRole(msgspec.Struct, forbid_unknown_fields=True):
    """``[access.roles.<role>]``: who has a role, by identity or department."""

    users: list[str] = msgspec.field(default_factory=list)
    departments: list[str] = msgspec.field(default_factory=list)


class AccessSection(msgspec.Struct, forbid_unknown_fields=True):
    """``[access]``: who may use the bot, where, and which commands need the ``admin`` role.

    Users are matched on ``message.sender.identity`` (the resolved site-wide id) and
    ``message.sender.departments``; conversations on ``message.conversation.id``. Deny wins over
    allow; empty allow lists allow everyone. Applied live on configuration reload (see
    ``host.access``).
    """

    #: If either is non-empty, only these identities / members of these departments may use the bot.
    allow_users: list[str] = msgspec.field(default_factory=list)
    allow_departments: list[str] = msgspec.field(default_factory=list)
    #: Never answered (wins over the allow lists and roles).
    deny_users: list[str] = msgspec.field(default_factory=list)
    deny_departments: list[str] = msgspec.field(default_factory=list)
    #: 1:1 chats with the bot.
    allow_direct_chats: bool = True
    #: Group chats at all; ``allow_groups`` non-empty: only these group conversation ids.
    allow_group_chats: bool = True
    allow_groups: list[str] = msgspec.field(default_factory=list)
    deny_groups: list[str] = msgspec.field(default_factory=list)
    #: Roles by name, e.g. ``[access.roles.admin] users = ["alice"]``.
    roles: dict[str, AccessRole] = msgspec.field(default_factory=dict)
    #: Message text prefixes (e.g. ``/reload``) only senders with role ``admin`` may use.
    admin_commands: list[str] = msgspec.field(default_factory=list)
    #: Reply to a denied message in a 1:1 chat (empty: ignore silently).
    refusal: str = "Sorry, you are not allowed to use this bot here."
    #: Reply to a denied message in a group chat (empty: ignore silently, the default).
    group_refusal: str = ""
    #: Reply to an admin-only command from a sender without the ``admin`` role.
    command_refusal: str = "Sorry, that command is for administrators only."

    def __post_init__(self) -> None:
        for prefix in self.admin_commands:
            if not prefix.strip():
                raise ValueError("admin_commands: an empty prefix would match every message")


#: Named environment overrides: variable -> (section, key, kind).
ENV_OVERRIDES: dict[str, tuple[str, str, str]] = {
    "HOST_LOG_LEVEL": ("logging", "level", "str"),
    "HOST_LOG_FORMAT": ("logging", "format", "str"),
    "HOST_LOG_DIR": ("logging", "dir", "str"),
    "HOST_ENVIRONMENT": ("host", "environment", "str"),
    "HOST_CONCURRENCY": ("host", "concurrency", "int"),
    "HOST_CONTROL_SOCKET": ("host", "control_socket", "str"),
    "HOST_AUDIT_DIR": ("audit", "dir", "str"),
    "HOST_PLUGINS_ALLOW": ("plugins", "allow", "list"),
    "HOST_PLUGINS_DENY": ("plugins", "deny", "list"),
    "HOST_HTTP_ADDR": ("http", "addr", "str"),
    "HOST_TLS_CA_FILE": ("tls", "ca_file", "str"),
}

_CORE_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "host": HostSection,
    "logging": LoggingSection,
    "plugins": PluginsSection,
    "http": HttpSection,
    "tls": TlsSection,
    "admin": AdminSection,
    "access": AccessSection,
}


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"environment override: '{'.'.join(path)}' is not a table")
        node = child
    node[path[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply environment overrides in place; return the names of the variables used."""
    used = []
    for var, (section, key, kind) in ENV_OVERRIDES.items():
        if var in environ:
            raw = environ[var]
            value: Any = raw
            if kind == "int":
                try:
                    value = int(raw)
                except ValueError:
                    raise ConfigError(f"{var}: expected an integer, got {raw!r}") from None
            elif kind == "list":
                value = [item.strip() for item in raw.split(",") if item.strip()]
            _set_path(data, [section, key], value)
            used.append(var)
    for var in sorted(environ):
        if var.startswith("HOST__") and len(var) > 6:
            path = [p.lower() for p in var[6:].split("__") if p]
            if len(path) >= 2:
                _set_path(data, path, _parse_env_value(environ[var]))
                used.append(var)
    return used


def _describe_validation_error(exc: msgspec.ValidationError, section: str, source: str) -> str:
    message = str(exc)
    match = re.search(r" - at `\$((?:\.[A-Za-z0-9_]+|\[[^\]]*\])*)`$", message)
    where = f"[{section}]"
    if match:
        key = match.group(1).lstrip(".")
        message = message[: match.start()]
        if key:
            where = f"[{section}] {key}"
    return f"{source}: {where}: {message}"


class Config:
    """The validated configuration: core sections as attributes, plugin sections by name."""

    def __init__(
        self,
        data: dict[str, Any],
        source: str,
        sections: dict[str, msgspec.Struct],
    ) -> None:
        self.data = data
        self.source = source
        self._sections = sections

    @property
    def host(self) -> HostSection:
        section = self._sections["host"]
        assert isinstance(section, HostSection)
        return section

    @property
    def logging(self) -> LoggingSection:
        section = self._sections["logging"]
        assert isinstance(section, LoggingSection)
        return section

    @property
    def plugins(self) -> PluginsSection:
        section = self._sections["plugins"]
        assert isinstance(section, PluginsSection)
        return section

    @property
    def tls(self) -> TlsSection:
        section = self._sections["tls"]
        assert isinstance(section, TlsSection)
        return section

    @property
    def admin(self) -> AdminSection:
        section = self._sections["admin"]
        assert isinstance(section, AdminSection)
        return section

    @property
    def access(self) -> AccessSection:
        section = self._sections["access"]
        assert isinstance(section, AccessSection)
        return section

    def section(self, name: str) -> Any:
        """The validated struct of a registered section (``KeyError`` if none was registered)."""
        return self._sections[name]

    def has_section(self, name: str) -> bool:
        return name in self._sections

    def raw_section(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        return value if isinstance(value, dict) else {}

    def validate_section(self, name: str, schema: type[msgspec.Struct]) -> msgspec.Struct:
        """Validate ``[name]`` against ``schema``, store and return it (``ConfigError`` if invalid)."""
        value = self.check_section(name, schema)
        self._sections[name] = value
        return value

    def set_section(self, name: str, value: msgspec.Struct) -> None:
        """Store an already validated section (hot reload swaps it in at the right moment)."""
        self._sections[name] = value

    def check_section(self, name: str, schema: type[msgspec.Struct]) -> msgspec.Struct:
        """Validate ``[name]`` against ``schema`` without storing it (``ConfigError`` if invalid)."""
        raw = self.data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.source}: [{name}]: expected a table, got {type(raw).__name__}")
        try:
            value = msgspec.convert(raw, type=schema, dec_hook=_dec_hook, str_keys=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(_describe_validation_error(exc, name, self.source)) from None
        return value

    def unknown_sections(self) -> list[str]:
        return sorted(k for k in self.data if k not in self._sections)

    def redacted(self) -> dict[str, Any]:
        """Every validated section as plain data with secrets masked (for display and audit)."""
        return {name: redact(section) for name, section in sorted(self._sections.items())}

    def __repr__(self) -> str:
        return f"Config(source={self.source!r}, sections={sorted(self._sections)})"


def resolve_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if environ.get("HOST_CONFIG"):
        return Path(environ["HOST_CONFIG"])
    default = Path("host.toml")
    return default if default.exists() else None


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """Read, override and validate the core sections; plugin sections are validated later.

    ``data`` (a dict) replaces the file, for tests and embedding. Raises ``ConfigError`` with one
    message that names the file, the key and the expected type.
    """
    environ = os.environ if environ is None else environ
    if data is not None:
        source = "<config dict>"
        merged: dict[str, Any] = _deep_copy(data)
    else:
        resolved = resolve_config_path(str(path) if path else None, environ)
        if resolved is None:
            source, merged = "<defaults>", {}
        else:
            source = str(resolved)
            try:
                merged = tomllib.loads(resolved.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{source}: configuration file not found") from None
            except OSError as exc:
                raise ConfigError(f"{source}: cannot read configuration: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    apply_env_overrides(merged, environ)
    config = Config(merged, source, {})
    for name, schema in _CORE_SECTIONS.items():
        config.validate_section(name, schema)
    if config.logging.error_retention_days < 30:
        raise ConfigError(
            f"{source}: [logging] error_retention_days: must be at least 30, "
            f"got {config.logging.error_retention_days}"
        )
    for field in ("concurrency", "queue_size"):
        if getattr(config.host, field) < 1:
            raise ConfigError(f"{source}: [host] {field}: must be at least 1")
    return config


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
