"""The admin API: plugins, reload, configuration and audit verification, behind strong checks.

Served under ``/admin`` on the host's HTTP server when ``[admin] enabled = true``
(``host.config.AdminSection``):

=====================================  ==============================================================
``GET  /admin/plugins``                every plugin and its state (``host.plugins.listing()``)
``POST /admin/plugins/{name}/reload``  reload one plugin (``host.reloader.reload_plugin``)
``POST /admin/reload``                 reload the configuration and every changed plugin
``GET  /admin/config``                 the running configuration, secrets redacted
``POST /admin/audit/verify``           verify the audit log (needs the ``audit`` plugin; else 404)
=====================================  ==============================================================

Every request passes, in this order (the first failure answers, as JSON ``{"error", "reason"}``):

1. **IP allow-list** (403): the connection's peer address must be in ``allow_ips`` (CIDRs; loopback
   by default). Behind a reverse proxy that is the proxy's address: no forwarded header is trusted.
2. **Body size** (413): at most ``max_body_bytes``.
3. **Request signature** (400/401/429), required when ``require_signed_requests``, else checked when
   present: headers ``X-Host-Key-Id``, ``X-Host-Timestamp`` (Unix seconds), ``X-Host-Nonce``
   (16-128 of ``A-Za-z0-9_-``) and ``X-Host-Signature``, the lowercase hex HMAC-SHA256 with the key
   ``request_keys[kid]`` of ``METHOD \\n PATH[?QUERY] \\n TIMESTAMP \\n NONCE \\n hex(SHA-256(body))``.
   The timestamp must be within ``signature_window`` (+ ``leeway``) of now; a nonce is accepted once
   per key (remembered for twice the window, in a bounded cache). Constant-time comparison.
4. **Bearer token** (401): ``Authorization: Bearer <JWT>`` verified with PyJWT: the ``kid`` header
   selects a key of ``[admin.keys]`` (unknown kid: refused), whose configured algorithm is the only
   one accepted (no ``none``, no HS/RS confusion); ``exp``, ``iat``, ``iss``, ``aud`` (exactly
   ``issuer``/``audience``) and ``sub`` are required; ``exp - iat`` may not exceed
   ``max_token_lifetime``; ``leeway`` seconds of clock skew are tolerated.

Every admin action is audited (``host.audit("admin", <action>, actor="admin:<sub>")``) with its
outcome, and every refused request too (``admin/denied`` with the reason, the address, the path;
at most ``audit_denied_per_minute``, the rest summarized as ``admin/denied_suppressed``). Errors
never carry a traceback, a token or a key.

Operators mint tokens with ``python -m host admin token --kid K --sub NAME`` (see ``host.cli``), or
call the API with ``python -m host admin call GET /admin/plugins``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib
import ipaddress
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from host.config import AdminKey, AdminSection, redact
from host.errors import ConfigError
from host.logs import logger

if TYPE_CHECKING:
    from host.runtime import Host

__all__ = [
    "ADMIN_PREFIX",
    "SIGNATURE_HEADERS",
    "AdminApi",
    "AdminAuth",
    "AdminKeys",
    "Principal",
    "load_keys",
    "mint_token",
    "sign_request",
    "signature_base",
]

ADMIN_PREFIX: Final = "/admin"
#: Request-signing headers: key id, timestamp, nonce, signature.
SIGNATURE_HEADERS: Final = ("x-host-key-id", "x-host-timestamp", "x-host-nonce", "x-host-signature")
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")
_PLUGIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_MAX_TOKEN_CHARS: Final = 8192
_REQUIRED_CLAIMS: Final = ["exp", "iat", "iss", "aud", "sub"]
_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Refused(Exception):
    """A request is answered with an error: HTTP ``status``, a bounded ``reason`` label, a message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# -- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    kid: str
    algorithm: str
    verify_key: Any = field(repr=False)  # HMAC secret bytes or a cryptography public key
    sign_key: Any = field(default=None, repr=False)  # HMAC secret bytes, a private key, or None


@dataclass(frozen=True)
class AdminKeys:
    """The loaded token keys of an ``[admin]`` section, by key id."""

    keys: Mapping[str, _Key]

    def __repr__(self) -> str:
        return f"AdminKeys({sorted(self.keys)})"


def load_keys(
    section: AdminSection,
    *,
    for_signing: bool = False,
    private_key_file: str | None = None,
    only: str | None = None,
) -> AdminKeys:
    """Read the key files of ``[admin.keys]``. ``ConfigError`` naming the key and file on failure.

    ``for_signing`` also loads private keys (token minting); ``private_key_file`` overrides the
    configured one and ``only`` restricts loading to one key id (a CLI call for one key).
    """
    from cryptography.hazmat.primitives import serialization

    loaded: dict[str, _Key] = {}
    for kid, key in section.keys.items():
        if only is not None and kid != only:
            continue
        if key.symmetric:
            assert key.secret is not None  # checked by AdminSection
            secret = key.secret.reveal().encode()
            loaded[kid] = _Key(kid, key.algorithm, secret, secret)
            continue
        private = None
        private_path = private_key_file or key.private_key_file
        if private_path and (for_signing or not key.public_key_file):
            data = _read_key_file(kid, private_path)
            try:
                private = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"[admin] keys.{kid}: {private_path!r} is not an unencrypted PEM private key ({exc})") from None
        if key.public_key_file:
            data = _read_key_file(kid, key.public_key_file)
            try:
                public = serialization.load_pem_public_key(data)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"[admin] keys.{kid}: {key.public_key_file!r} is not a PEM public key ({exc})") from None
        else:
            assert private is not None
            public = private.public_key()
        _check_key_type(kid, key, public)
        loaded[kid] = _Key(kid, key.algorithm, public, private)
    return AdminKeys(loaded)


def _read_key_file(kid: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"[admin] keys.{kid}: cannot read {path!r}: {exc.strerror}") from None


def _check_key_type(kid: str, key: AdminKey, public: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    ok = {
        "EdDSA": isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey),
        "ES256": isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1),
        "RS256": isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048,
    }[key.algorithm]
    if not ok:
        raise ConfigError(
            f"[admin] keys.{kid}: the key is not a valid {key.algorithm} key "
            "(EdDSA: Ed25519/Ed448; ES256: P-256; RS256: RSA of at least 2048 bits)"
        )


def mint_token(
    section: AdminSection,
    keys: AdminKeys,
    *,
    kid: str,
    subject: str,
    ttl: float | None = None,
    now: float | None = None,
) -> str:
    """A token for ``subject`` signed with key ``kid`` (which must have a signing key loaded)."""
    import jwt

    key = keys.keys.get(kid)
    if key is None:
        raise ConfigError(f"[admin] has no key {kid!r} (known: {', '.join(sorted(keys.keys)) or 'none'})")
    if key.sign_key is None:
        raise ConfigError(f"[admin] keys.{kid}: minting needs its private_key_file (or --private-key)")
    ttl = section.token_ttl if ttl is None else ttl
    if not 0 < ttl <= section.max_token_lifetime:
        raise ConfigError(f"token lifetime must be > 0 and at most {section.max_token_lifetime:g} seconds")
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": section.issuer,
        "aud": section.audience,
        "sub": subject,
        "iat": issued,
        "exp": issued + int(ttl),
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, key.sign_key, algorithm=key.algorithm, headers={"kid": kid})


# -- request signatures -----------------------------------------------------------------------


def signature_base(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """The exact bytes a request signature covers."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n{digest}".encode()


def sign_request(
    key: bytes | str,
    kid: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The signature headers for a request (``path`` includes ``?query`` when there is one)."""
    secret = key.encode() if isinstance(key, str) else key
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_urlsafe(24)
    mac = hmac.new(secret, signature_base(method, path, ts, nonce, body), hashlib.sha256).hexdigest()
    return {
        "X-Host-Key-Id": kid,
        "X-Host-Timestamp": ts,
        "X-Host-Nonce": nonce,
        "X-Host-Signature": mac,
    }


class _NonceCache:
    """Nonces seen recently, per key, each kept for ``ttl`` seconds; at most ``size`` at once."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()  # insertion = expiry order

    def add(self, kid: str, nonce: str, now: float) -> None:
        """Remember ``nonce``; ``_Refused`` if it was seen within ``ttl`` or the cache is full."""
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if (kid, nonce) in self._seen:
            raise _Refused(401, "replayed_nonce", "request refused: this nonce was already used")
        if len(self._seen) >= self.size:
            # Evicting a live nonce would allow replaying it: refuse instead (only holders of a
            # signing key can fill the cache, since nonces are stored after the signature verifies).
            raise _Refused(429, "nonce_cache_full", "too many signed requests; retry in a few seconds")
        self._seen[(kid, nonce)] = now + self.ttl

    def inherit(self, other: _NonceCache) -> None:
        """Keep remembering ``other``'s nonces (a configuration reload must not reopen replays)."""
        merged = OrderedDict(sorted({**other._seen, **self._seen}.items(), key=lambda item: item[1]))
        self._seen = merged

    def __len__(self) -> int:
        return len(self._seen)


# -- authentication ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who made an authenticated admin request."""

    subject: str
    kid: str
    token_id: str | None
    ip: str
    signed_with: str | None = None

    @property
    def actor(self) -> str:
        return f"admin:{self.subject}"


@dataclass
class _RequestFacts:
    """What we learned about a request, for the audit record of its outcome (never a secret)."""

    ip: str
    method: str
    path: str
    kid: str | None = None
    subject: str | None = None


class AdminAuth:
    """Checks admin requests against one ``[admin]`` configuration and its loaded keys."""

    def __init__(self, section: AdminSection, keys: AdminKeys) -> None:
        self.section = section
        self.keys = keys
        self.networks = [ipaddress.ip_network(cidr, strict=False) for cidr in section.allow_ips]
        self.request_keys = {kid: s.reveal().encode() for kid, s in section.request_keys.items()}
        self.nonces = _NonceCache(section.nonce_cache_size, 2 * (section.signature_window + section.leeway))

    def __repr__(self) -> str:
        return f"AdminAuth(keys={sorted(self.keys.keys)}, request_keys={sorted(self.request_keys)})"

    def check_address(self, ip: str) -> None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise _Refused(403, "ip_not_allowed", "request refused: unknown client address") from None
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if not any(address in network for network in self.networks):
            raise _Refused(403, "ip_not_allowed", f"request refused: address {address} is not in [admin] allow_ips")

    def check_signature(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, now: float
    ) -> str | None:
        """Verify the request signature when present or required; the signing key id, or None."""
        values = [headers.get(name) for name in SIGNATURE_HEADERS]
        if all(v is None for v in values):
            if self.section.require_signed_requests:
                raise _Refused(401, "signature_missing", "request refused: a request signature is required")
            return None
        kid, timestamp, nonce, signature = values
        if kid is None or timestamp is None or nonce is None or signature is None:
            raise _Refused(400, "signature_incomplete", "request refused: incomplete signature headers "
                           "(X-Host-Key-Id, X-Host-Timestamp, X-Host-Nonce, X-Host-Signature)")
        key = self.request_keys.get(kid)
        if key is None:
            raise _Refused(401, "signature_unknown_key", "request refused: unknown signing key id")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
            raise _Refused(400, "signature_bad_timestamp", "request refused: X-Host-Timestamp must be Unix seconds")
        if abs(now - int(timestamp)) > self.section.signature_window + self.section.leeway:
            raise _Refused(401, "signature_expired", "request refused: the signature timestamp is outside the window")
        if not _NONCE.match(nonce):
            raise _Refused(400, "signature_bad_nonce", "request refused: X-Host-Nonce must be 16-128 of A-Z a-z 0-9 _ -")
        if not _SIGNATURE.match(signature):
            raise _Refused(400, "signature_malformed", "request refused: X-Host-Signature must be 64 lowercase hex digits")
        expected = hmac.new(key, signature_base(method, path, timestamp, nonce, body), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            raise _Refused(401, "signature_invalid", "request refused: the request signature does not verify")
        self.nonces.add(kid, nonce, now)
        return kid

    def check_token(self, authorization: str | None, now: float, facts: _RequestFacts) -> tuple[str, str, str | None]:
        """Verify the bearer token; (subject, kid, jti)."""
        import jwt

        if authorization is None:
            raise _Refused(401, "token_missing", "authentication required: send Authorization: Bearer <token>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Refused(401, "token_missing", "authentication required: send Authorization: Bearer <token>")
        if len(token) > _MAX_TOKEN_CHARS:
            raise _Refused(401, "token_malformed", "token refused: too long")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:  # PyJWT wraps most decoding errors; anything else is malformed too
            raise _Refused(401, "token_malformed", "token refused: not a well-formed JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _Refused(401, "token_no_kid", "token refused: its header has no kid")
        key = self.keys.keys.get(kid)
        if key is None:
            raise _Refused(401, "token_unknown_kid", "token refused: unknown key id")
        facts.kid = kid
        section = self.section
        try:
            claims = jwt.decode(
                token,
                key.verify_key,
                algorithms=[key.algorithm],  # pinned per key, never taken from the token
                audience=section.audience,
                issuer=section.issuer,
                leeway=section.leeway,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": True, "enforce_minimum_key_length": True},
            )
        except jwt.InvalidTokenError as exc:
            raise _Refused(401, *_describe_jwt_error(exc)) from None
        except Exception:
            raise _Refused(401, "token_malformed", "token refused: not a well-formed JWT") from None
        subject, issued, expires = claims.get("sub"), claims.get("iat"), claims.get("exp")
        if not isinstance(subject, str) or not 0 < len(subject) <= 128:
            raise _Refused(401, "token_bad_subject", "token refused: sub must be a non-empty string (at most 128)")
        facts.subject = subject
        try:
            lifetime = float(expires) - float(issued)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise _Refused(401, "token_bad_claims", "token refused: exp and iat must be numbers") from None
        if not lifetime <= section.max_token_lifetime:  # also catches NaN
            raise _Refused(
                401, "token_lifetime", f"token refused: lifetime exceeds {section.max_token_lifetime:g} seconds"
            )
        jti = claims.get("jti")
        return subject, kid, jti if isinstance(jti, str) else None


def _describe_jwt_error(exc: Exception) -> tuple[str, str]:
    """A bounded reason and a fixed message for a PyJWT error (never the error's own text)."""
    import jwt

    table: list[tuple[type[Exception], str, str]] = [
        (jwt.ExpiredSignatureError, "token_expired", "token refused: expired"),
        (jwt.ImmatureSignatureError, "token_not_yet_valid", "token refused: not yet valid (iat or nbf in the future)"),
        (jwt.InvalidAudienceError, "token_audience", "token refused: wrong audience (aud)"),
        (jwt.InvalidIssuerError, "token_issuer", "token refused: wrong issuer (iss)"),
        (jwt.InvalidSignatureError, "token_signature", "token refused: the signature does not verify"),
        (jwt.InvalidAlgorithmError, "token_algorithm", "token refused: algorithm not allowed for this key"),
        (jwt.InvalidIssuedAtError, "token_bad_claims", "token refused: iat must be a number"),
    ]
    if isinstance(exc, jwt.MissingRequiredClaimError):
        claim = exc.claim if exc.claim in _REQUIRED_CLAIMS else "?"
        return "token_missing_claim", f"token refused: the {claim} claim is required"
    for kind, reason, message in table:
        if isinstance(exc, kind):
            return reason, message
    return "token_invalid", "token refused: invalid token"


# -- the API ----------------------------------------------------------------------------------


Handler = Callable[[Request, Principal, dict[str, str]], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class _Endpoint:
    method: str
    pattern: re.Pattern[str]
    action: str
    handler: Handler


class AdminApi:
    """The admin API of one host (``host.admin``). Mounted at ``/admin`` when enabled."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.auth: AdminAuth | None = None
        self.mounted = False
        self._verify_limiter = trio.CapacityLimiter(1)  # one audit verification at a time
        self._denied_window = 0.0
        self._denied_in_window = 0
        self._denied_suppressed = 0
        self._requests = host.metrics.counter(
            "admin_requests_total", "Admin API requests by endpoint and outcome.", ["action", "outcome"]
        )
        self._endpoints = [
            _Endpoint("GET", re.compile(r"^/plugins/?$"), "plugins.list", self._plugins),
            _Endpoint("POST", re.compile(r"^/plugins/(?P<name>[^/]+)/reload$"), "plugins.reload", self._reload_plugin),
            _Endpoint("POST", re.compile(r"^/reload$"), "reload", self._reload_all),
            _Endpoint("GET", re.compile(r"^/config/?$"), "config.view", self._config),
            _Endpoint("POST", re.compile(r"^/audit/verify$"), "audit.verify", self._audit_verify),
        ]
        self.app = Starlette(routes=[Route("/{rest:path}", self._entry, methods=_METHODS)])

    # -- configuration -----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.auth is not None and self.auth.section.enabled

    @staticmethod
    def prepare(section: AdminSection) -> AdminAuth | None:
        """Load the keys of ``section`` (``ConfigError`` on failure); ``None`` when disabled."""
        if not section.enabled:
            return None
        keys = load_keys(section)
        if section.audit_public_keys:
            try:
                audit_keys = importlib.import_module("host_audit.keys")
            except ImportError:
                raise ConfigError("[admin] audit_public_keys: the audit plugin (host-audit) is not installed") from None
            for path in section.audit_public_keys:
                try:
                    audit_keys.load_public_key_file(Path(path))
                except Exception as exc:
                    raise ConfigError(f"[admin] audit_public_keys: cannot load {path!r}: {exc}") from None
        return AdminAuth(section, keys)

    def apply(self, auth: AdminAuth | None) -> None:
        """Use a prepared configuration; mount the API on the HTTP server the first time."""
        if auth is not None and self.auth is not None:
            auth.nonces.inherit(self.auth.nonces)
        self.auth = auth
        if auth is None or self.mounted:
            return
        if not self._host.http.enabled:
            logger.warning("[admin] enabled = true, but [http] enabled = false: the admin API is not served")
            return
        try:
            self._host.http.mount(ADMIN_PREFIX, self.app, name="admin", owner="host")
        except ValueError as exc:
            raise ConfigError(f"[admin]: cannot serve the admin API: {exc}") from None
        self.mounted = True
        logger.info("admin API enabled under {} (keys: {})", ADMIN_PREFIX, ", ".join(sorted(auth.keys.keys)))
        http = self._host.http.settings
        if not http.tls and not _is_loopback(http.host_port()[0]):
            logger.warning(
                "the admin API is served over plain HTTP on {}: bearer tokens cross the network in clear; "
                "set [http] tls_cert / tls_key (or keep [http] addr on loopback behind a TLS proxy)",
                http.addr,
            )

    # -- request handling --------------------------------------------------------------------

    async def _entry(self, request: Request) -> Response:
        auth = self.auth
        path = request.url.path
        query = request.scope.get("query_string", b"").decode("latin-1")
        signed_path = f"{path}?{query}" if query else path
        ip = request.client.host if request.client else ""
        facts = _RequestFacts(ip=ip, method=request.method, path=path[:200])
        if auth is None:
            return _json(404, {"error": "the admin API is disabled", "reason": "disabled"})
        relative = path[len(ADMIN_PREFIX):] if path.startswith(ADMIN_PREFIX) else path
        endpoint, params = self._route(request.method, relative)
        action = endpoint.action if endpoint is not None else "unknown"
        now = time.time()
        try:
            auth.check_address(ip)
            body = await _read_body(request, auth.section.max_body_bytes)
            signed_with = auth.check_signature(request.method, signed_path, request.headers, body, now)
            subject, kid, jti = auth.check_token(request.headers.get("authorization"), now, facts)
        except _Refused as refused:
            self._requests.labels(action, "denied").inc()
            await self._audit_denied(refused, facts)
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if refused.status == 401 else None
            return _json(refused.status, {"error": refused.message, "reason": refused.reason}, headers)
        principal = Principal(subject, kid, jti, ip, signed_with)
        if endpoint is None:
            self._requests.labels(action, "not_found").inc()
            allowed = sorted({e.method for e in self._endpoints if e.pattern.match(relative)})
            if allowed:
                return _json(405, {"error": f"method not allowed; use {', '.join(allowed)}", "reason": "method"},
                             {"Allow": ", ".join(allowed)})
            return _json(404, {"error": "no such admin endpoint", "reason": "not_found"})
        try:
            status, payload = await endpoint.handler(request, principal, params)
        except _Refused as refused:
            status, payload = refused.status, {"error": refused.message, "reason": refused.reason}
        except Exception as exc:
            logger.opt(exception=exc).error("admin action {} failed: {!r}", action, exc)
            status, payload = 500, {"error": "internal error; see the host log", "reason": "internal"}
        outcome = "ok" if status < 400 else ("failed" if status >= 500 else "refused")
        self._requests.labels(action, outcome).inc()
        details = {"outcome": outcome, "status": status, "ip": ip, "kid": kid, "jti": jti, "signed_with": signed_with,
                   **{k: v for k, v in params.items()}}
        if status >= 400:
            details["error"] = payload.get("error")
        logger.info("admin {} by {} from {}: {}", action, principal.actor, ip, outcome)
        await self._host.audit("admin", action, actor=principal.actor, target=params.get("name"), details=details)
        return _json(status, payload)

    def _route(self, method: str, path: str) -> tuple[_Endpoint | None, dict[str, str]]:
        for endpoint in self._endpoints:
            match = endpoint.pattern.match(path)
            if match and endpoint.method == method:
                return endpoint, match.groupdict()
        return None, {}

    async def _audit_denied(self, refused: _Refused, facts: _RequestFacts) -> None:
        logger.warning(
            "admin request refused ({}): {} {} from {}{}",
            refused.reason, facts.method, facts.path, facts.ip or "?",
            f" (kid {facts.kid}, sub {facts.subject})" if facts.kid else "",
        )
        limit = self.auth.section.audit_denied_per_minute if self.auth else 0
        now = time.monotonic()
        if now - self._denied_window >= 60:
            if self._denied_suppressed:
                await self._host.audit(
                    "admin", "denied_suppressed", details={"count": self._denied_suppressed, "per_minute": limit}
                )
            self._denied_window, self._denied_in_window, self._denied_suppressed = now, 0, 0
        if self._denied_in_window >= limit:
            self._denied_suppressed += 1  # a flood of bad requests must not flood the audit log
            return
        self._denied_in_window += 1
        details: dict[str, Any] = {"reason": refused.reason, "ip": facts.ip, "method": facts.method, "path": facts.path}
        if facts.kid and _KID.match(facts.kid):
            details["kid"] = facts.kid
        actor = f"admin:{facts.subject[:128]}" if facts.subject else "anonymous"
        await self._host.audit("admin", "denied", actor=actor, details=details)

    # -- endpoints ---------------------------------------------------------------------------

    async def _plugins(self, request: Request, who: Principal, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        return 200, {"plugins": self._host.plugins.listing()}

    async def _reload_plugin(self, request: Request, who: Principal, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        name = params["name"]
        if not _PLUGIN_NAME.match(name):
            raise _Refused(400, "bad_plugin_name", "plugin names are 1-100 of A-Z a-z 0-9 _ . -")
        if not self._host.reloader.knows(name):
            raise _Refused(404, "no_such_plugin", f"no plugin named {name!r} is installed or loaded")
        result = await self._host.reloader.reload_plugin(name, reason=f"admin:{who.subject}")
        return 200, {"ok": result.ok, "results": [result.as_dict()]}

    async def _reload_all(self, request: Request, who: Principal, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        results = await self._host.reloader.reload_all(reason=f"admin:{who.subject}")
        return 200, {"ok": all(r.ok for r in results), "results": [r.as_dict() for r in results]}

    async def _config(self, request: Request, who: Principal, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        config = self._host.config
        return 200, {"source": config.source, "sections": config.redacted()}

    async def _audit_verify(self, request: Request, who: Principal, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            # The audit plugin is optional: imported by name, never a dependency of the host.
            audit_keys = importlib.import_module("host_audit.keys")
            audit_settings = importlib.import_module("host_audit.settings")
            audit_verify = importlib.import_module("host_audit.verify")
        except ImportError:
            raise _Refused(404, "audit_not_installed", "the audit plugin (host-audit) is not installed") from None
        record = self._host.plugins.records.get("audit")
        if record is None or record.state != "loaded" or not self._host.config.has_section("audit"):
            raise _Refused(404, "audit_not_loaded", "the audit plugin is installed but not loaded")
        section = self._host.config.section("audit")
        settings = audit_settings.LogSettings.from_section(section)
        assert self.auth is not None
        pinned = [audit_keys.load_public_key_file(Path(p)) for p in self.auth.section.audit_public_keys]
        verify = functools.partial(
            audit_verify.verify_log, settings.directory, public_keys=pinned or None, clock_tolerance_ms=section.clock_tolerance_ms
        )
        async with self._verify_limiter:
            # Reading and hashing the whole log takes a while: never on the event loop.
            report = await trio.to_thread.run_sync(verify)
        problem = report.problem
        return 200, {
            "ok": report.ok,
            "directory": str(report.directory),
            "problem": None if problem is None else {
                "where": problem.where, "seq": problem.seq, "kind": problem.kind, "reason": problem.reason,
            },
            "records": report.records,
            "segments": report.segments,
            "checkpoints_in_log": report.checkpoints_in_log,
            "keys_used": report.keys_used,
            "pinned": report.pinned,
            "unanchored": report.unanchored,
            "warnings": report.warnings,
            "seconds": round(report.elapsed, 3),
        }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise _Refused(400, "bad_content_length", "request refused: invalid Content-Length")
        if int(declared) > limit:
            raise _Refused(413, "body_too_large", f"request refused: body larger than {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "body_too_large", f"request refused: body larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Refused(400, "client_disconnected", "request refused: the client went away") from None
    return b"".join(chunks)


def _json(status: int, payload: dict[str, Any], headers: Mapping[str, str] | None = None) -> Response:
    payload = redact(payload)  # known secret values masked wherever they hide (plugin errors...)
    try:
        body = msgspec.json.encode(payload)
    except (TypeError, msgspec.EncodeError):  # a value msgspec cannot encode: fall back to str()
        body = json.dumps(payload, default=str).encode()
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers or {}))
