"""``python -m host admin ...``: operator tools for the admin API (see ``host.admin``).

* ``admin token --kid K --sub NAME [--ttl S] [--private-key PEM]``: print a token signed with key
  ``K`` of ``[admin.keys]`` (HMAC keys: the configured secret; EdDSA/ES256/RS256: the key's
  ``private_key_file`` or ``--private-key``). Lifetime ``[admin] token_ttl`` unless ``--ttl``.
* ``admin keygen --kid K [--dir DIR]``: write an Ed25519 key pair ``K.key`` (0600) / ``K.pub`` and
  print the ``[admin.keys.K]`` table to add to the host's configuration.
* ``admin call METHOD PATH [--kid K] [--sub NAME] [--url BASE] [--data JSON]``: mint a token, sign
  the request when ``[admin] request_keys`` has a key (always, if ``require_signed_requests``), call
  the running host (``[http] addr``, HTTPS with the host's TLS policy when ``tls_cert`` is set) and
  print its JSON answer. Exit code 0 for a 2xx answer, 1 otherwise.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from host import tls
from host.admin import load_keys, mint_token, sign_request
from host.config import Config
from host.errors import ConfigError

__all__ = ["configure_parser", "run"]


def configure_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="admin API tools: mint a token, create a key pair, call the API")
    actions = admin.add_subparsers(dest="admin_command", metavar="ACTION", required=True)
    token = actions.add_parser("token", help="print a short-lived admin token signed with a configured key")
    token.add_argument("--kid", required=True, help="key id in [admin.keys]")
    token.add_argument("--sub", required=True, help="who the token is for (audited as admin:<sub>)")
    token.add_argument("--ttl", type=float, help="lifetime in seconds (default: [admin] token_ttl)")
    token.add_argument("--private-key", metavar="PEM", help="private key file (EdDSA/ES256/RS256 keys)")
    keygen = actions.add_parser("keygen", help="create an Ed25519 key pair for [admin.keys]")
    keygen.add_argument("--kid", required=True, help="key id, e.g. ops-2026-11")
    keygen.add_argument("--dir", default=".", help="where to write <kid>.key and <kid>.pub")
    call = actions.add_parser("call", help="call the running host's admin API")
    call.add_argument("method", help="GET or POST")
    call.add_argument("path", help="e.g. /admin/plugins")
    call.add_argument("--kid", help="token key id (default: the first key that can sign)")
    call.add_argument("--sub", default=None, help="token subject (default: your user name)")
    call.add_argument("--private-key", metavar="PEM", help="private key file for the token")
    call.add_argument("--url", help="base URL (default: from [http] addr and tls_cert)")
    call.add_argument("--data", default="", help="request body (JSON text)")
    call.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")


def run(config: Config, args: argparse.Namespace) -> int:
    try:
        if args.admin_command == "token":
            print(_token(config, args.kid, args.sub, args.ttl, args.private_key))
            return 0
        if args.admin_command == "keygen":
            return _keygen(args.kid, Path(args.dir))
        return _call(config, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _token(config: Config, kid: str, subject: str, ttl: float | None, private_key: str | None) -> str:
    section = config.admin
    if kid not in section.keys:
        known = ", ".join(sorted(section.keys)) or "none configured"
        raise ConfigError(f"[admin] has no key {kid!r} (known: {known})")
    keys = load_keys(section, for_signing=True, private_key_file=private_key, only=kid)
    return mint_token(section, keys, kid=kid, subject=subject, ttl=ttl)


def _keygen(kid: str, directory: Path) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{kid}.key", directory / f"{kid}.pub"
    if private_path.exists() or public_path.exists():
        print(f"error: {private_path} or {public_path} already exists; not overwriting", file=sys.stderr)
        return 1
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    print(f"wrote {private_path} (keep it with the operators, not on the host) and {public_path}")
    print("add to the host's configuration:\n")
    print(f'[admin.keys."{kid}"]\nalgorithm = "EdDSA"\npublic_key_file = "{public_path.resolve()}"')
    return 0


def _call(config: Config, args: argparse.Namespace) -> int:
    section = config.admin
    kid = args.kid or _signing_kid(config, args.private_key)
    subject = args.sub or getpass.getuser()
    token = _token(config, kid, subject, None, args.private_key)
    path = args.path if args.path.startswith("/") else f"/{args.path}"
    body = args.data.encode()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    if body:
        headers["Content-Type"] = "application/json"
    if section.request_keys:
        request_kid = sorted(section.request_keys)[0]
        headers.update(
            sign_request(section.request_keys[request_kid].reveal(), request_kid, args.method, path, body)
        )
    base = (args.url or _base_url(config)).rstrip("/")
    request = urllib.request.Request(base + path, data=body or None, method=args.method.upper(), headers=headers)
    context = tls.client_context() if base.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as response:
            status, text = response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"error: cannot reach the admin API at {base}: {reason}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(json.loads(text), indent=2, ensure_ascii=False))
    except ValueError:
        print(text)
    if status >= 400:
        print(f"error: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def _signing_kid(config: Config, private_key: str | None) -> str:
    for kid, key in sorted(config.admin.keys.items()):
        if key.symmetric or key.private_key_file or private_key:
            return kid
    raise ConfigError("[admin] has no key that can sign tokens here (an HMAC key, or a private_key_file); use --kid")


def _base_url(config: Config) -> str:
    http = config.section("http")
    host, port = http.host_port()
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if http.tls else 'http'}://{host}:{port}"
