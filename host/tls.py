"""The TLS policy: one way to build SSL contexts, for every outbound connection and for our server.

Why a module of our own rather than each client's defaults: httpx, trio-websocket and hypercorn each
build contexts differently (hypercorn allows any cipher its string names, httpx trusts ``certifi``
only, trio-websocket uses ``ssl.create_default_context``). One policy, stated once, is what can be
reviewed and tested. It is:

* **TLS 1.2 or newer** (``minimum_version``): TLS 1.0/1.1 have known weaknesses (BEAST, SHA-1/MD5
  in the handshake PRF) and are deprecated by RFC 8996.
* **Certificates and host names are verified** on every client connection (``CERT_REQUIRED`` and
  ``check_hostname``): without both, anyone on the path can impersonate DingTalk or the NLP service.
* **Only forward-secret AEAD ciphers for TLS 1.2** (``ECDHE`` key exchange with AES-GCM or
  ChaCha20-Poly1305): no RSA key exchange (no forward secrecy), no CBC (padding oracles), no SHA-1
  MAC, no RC4/3DES/NULL/EXPORT. TLS 1.3's suites are all AEAD and cannot be narrowed through
  ``set_ciphers``, so OpenSSL's defaults apply there.
* **No TLS compression** (CRIME) and no renegotiation (a CPU-exhaustion vector for servers).

Trust: the system's CA store (``ssl.create_default_context``; OpenSSL honours ``SSL_CERT_FILE`` and
``SSL_CERT_DIR``, which *replace* the system store), plus an optional extra CA bundle for private
CAs (a corporate proxy, a self-hosted NLP service): ``[tls] ca_file`` or ``HOST_TLS_CA_FILE``, added
to, not replacing, the trusted roots. The host sets it once at startup with ``configure``; plugins
simply call ``client_context()``::

    httpx.AsyncClient(verify=host.tls.client_context())
    trio_websocket.open_websocket_url(url, ssl_context=host.tls.client_context())

trio-websocket caveat (python-trio/trio-websocket#199, open): when the TLS handshake fails (refused
certificate or protocol), ``open_websocket_url`` does not raise; it waits for its ``connect_timeout``
and reports a timeout. To get the real reason at once, open the stream with ``open_tls_stream`` (it
completes the handshake and raises ``TlsHandshakeError`` naming the problem) and hand it to
``trio_websocket.wrap_client_stream``.

Each call returns a **new** context: clients mutate theirs (httpcore sets ALPN per connection), so a
shared one would leak settings between clients. Building one costs some 30 ms (loading the system
CA store): clients build it once, not per request.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from pathlib import Path

import trio

from host.errors import ConfigError, HostError

__all__ = [
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "TlsHandshakeError",
    "TlsPolicyError",
    "client_context",
    "configure",
    "describe_ssl_error",
    "extra_ca_file",
    "open_tls_stream",
    "policy_violations",
    "server_context",
]

#: The oldest protocol version any of our connections accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

#: OpenSSL cipher string for TLS 1.2: ECDHE key exchange (forward secrecy) and AEAD ciphers only.
#: ``!aNULL`` etc. are redundant with the positive selection but state the intent for reviewers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!RC4:!3DES"

_NO_RENEGOTIATION = getattr(ssl, "OP_NO_RENEGOTIATION", 0)  # OpenSSL >= 1.1.0h

_lock = threading.Lock()
_extra_ca_file: str | None = None


class TlsPolicyError(ConfigError):
    """A TLS file (CA bundle, certificate, key) could not be used; the message names it and why."""


class TlsHandshakeError(HostError):
    """A TLS connection was refused by our policy or by the peer; the message says why."""


def configure(ca_file: str | None) -> None:
    """Set the process-wide extra CA bundle used by ``client_context()`` (``None``/"" clears it).

    Called by the host at startup and on configuration reload with ``[tls] ca_file``. The file is
    checked now, so a wrong path is a configuration error at startup, not a failed connection later.
    """
    path = ca_file or None
    if path is not None:
        _load_ca_into(ssl.create_default_context(), path)  # raises TlsPolicyError naming the problem
    global _extra_ca_file
    with _lock:
        _extra_ca_file = path


def extra_ca_file() -> str | None:
    """The extra CA bundle in effect (``[tls] ca_file``, else ``$HOST_TLS_CA_FILE``), if any."""
    with _lock:
        configured = _extra_ca_file
    return configured or os.environ.get("HOST_TLS_CA_FILE") or None


def client_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A new client context following the policy.

    Trusts the system store (``SSL_CERT_FILE``/``SSL_CERT_DIR`` honoured), the configured extra CA
    bundle, and ``cafile`` when given (tests, a per-service private CA). Raises ``TlsPolicyError``
    when a CA file cannot be read.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    for path in (extra_ca_file(), cafile):
        if path:
            _load_ca_into(context, path)
    _harden(context)
    # create_default_context already sets these; asserted so a future default change cannot slip by.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    password: str | None = None,
    alpn_protocols: list[str] | None = None,
) -> ssl.SSLContext:
    """A new server context following the policy, serving ``certfile`` (PEM chain) and ``keyfile``.

    Clients are not asked for certificates. Raises ``TlsPolicyError`` naming the file and the
    reason when the certificate or key cannot be loaded (missing, unreadable, not matching).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    # Our cipher order, not the client's: a client preferring something weaker does not get it.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None, password=password)
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise TlsPolicyError(
            f"TLS certificate {str(certfile)!r} and key {str(keyfile)!r} are not a usable pair "
            f"(PEM expected; wrong password or mismatched key?): {exc.reason or exc.strerror}"
        ) from None
    except FileNotFoundError as exc:
        raise TlsPolicyError(f"TLS certificate or key file not found: {exc.filename}") from None
    except OSError as exc:
        raise TlsPolicyError(
            f"cannot read TLS certificate {str(certfile)!r} / key {str(keyfile)!r}: {exc.strerror}"
        ) from None
    if alpn_protocols:
        context.set_alpn_protocols(alpn_protocols)
    return context


async def open_tls_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    https_compatible: bool = True,
) -> trio.SSLStream[trio.SocketStream]:
    """Connect to ``host:port`` and complete the TLS handshake now (``client_context()`` by default).

    Raises ``TlsHandshakeError`` naming the problem (certificate not trusted, host name mismatch,
    protocol version or ciphers refused) instead of deferring it to the first read or write; ``OSError``
    when the TCP connection itself fails. The caller owns (and closes) the returned stream.
    """
    context = ssl_context if ssl_context is not None else client_context()
    stream = await trio.open_ssl_over_tcp_stream(
        host, port, ssl_context=context, https_compatible=https_compatible
    )
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise TlsHandshakeError(f"TLS handshake with {host}:{port} failed: {describe_ssl_error(exc)}") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


def describe_ssl_error(exc: BaseException) -> str:
    """The most telling ``ssl.SSLError`` in ``exc``'s cause chain, without OpenSSL's source location."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return _SOURCE_SUFFIX.sub("", str(current.args[1] if len(current.args) > 1 else current))
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_SOURCE_SUFFIX = re.compile(r" \(_ssl\.c:\d+\)$")


def policy_violations(context: ssl.SSLContext, *, server: bool = False) -> list[str]:
    """What in ``context`` breaks the policy (empty when it complies). For tests and self-checks."""
    problems = []
    # MINIMUM_SUPPORTED (unset) is a negative sentinel, so it compares below TLS 1.2 too.
    if context.minimum_version < MINIMUM_VERSION:
        problems.append(f"minimum_version is {context.minimum_version.name}, expected TLSv1_2 or newer")
    if not context.options & ssl.OP_NO_COMPRESSION:
        problems.append("TLS compression is not disabled")
    if not server:
        if context.verify_mode != ssl.CERT_REQUIRED:
            problems.append(f"verify_mode is {context.verify_mode.name}, expected CERT_REQUIRED")
        if not context.check_hostname:
            problems.append("check_hostname is off")
    for cipher in context.get_ciphers():
        if cipher["protocol"] == "TLSv1.3":
            continue
        name = cipher["name"]
        if not name.startswith("ECDHE-") or not cipher["aead"]:
            problems.append(f"weak TLS 1.2 cipher enabled: {name}")
    return problems


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | _NO_RENEGOTIATION


def _load_ca_into(context: ssl.SSLContext, path: str | os.PathLike[str]) -> None:
    location = Path(path)
    try:
        if location.is_dir():
            context.load_verify_locations(capath=str(location))
        else:
            context.load_verify_locations(cafile=str(location))
    except ssl.SSLError as exc:  # before OSError: SSLError is one
        raise TlsPolicyError(
            f"CA bundle {str(location)!r} holds no usable PEM certificate: {exc.reason or exc.strerror}"
        ) from None
    except FileNotFoundError:
        raise TlsPolicyError(f"CA bundle not found: {str(location)!r} ([tls] ca_file / HOST_TLS_CA_FILE)") from None
    except OSError as exc:
        raise TlsPolicyError(f"cannot read CA bundle {str(location)!r}: {exc.strerror}") from None
