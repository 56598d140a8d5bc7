"""The admin API (host.admin): JWT checks, request signatures, IP allow-list, endpoints, audit, CLI.

Real hypercorn server on 127.0.0.1, real httpx client, real tokens (PyJWT, Ed25519 and HMAC keys).
Real clock (token times are wall-clock), an absolute ``fail_after`` per test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from host import hookimpl
from host.admin import AdminAuth, _NonceCache, _Refused, load_keys, sign_request
from host.config import AdminSection, load_config
from host.errors import ConfigError
from host.loopback import LoopbackConnector
from host.model import AuditEntry
from host.runtime import build_host
from host.testing import CapturedLogs, open_test_host

DEADLINE = 30
HS_SECRET = "hs-canary-secret-" + "k" * 40
REQUEST_SECRET = "rq-canary-secret-" + "s" * 40
ISSUER, AUDIENCE = "host-admin", "host-admin-api"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})  # real sockets and wall-clock token times


# -- keys and tokens ---------------------------------------------------------------------------


@dataclass
class Keys:
    ed_private: ed25519.Ed25519PrivateKey
    ed_private_file: Path
    ed_public_file: Path
    ed_public_pem: bytes
    other_ed: ed25519.Ed25519PrivateKey  # a key the host does not know


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    private = ed25519.Ed25519PrivateKey.generate()
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_file, public_file = tmp_path / "ed.key", tmp_path / "ed.pub"
    private_file.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    public_file.write_bytes(public_pem)
    return Keys(private, private_file, public_file, public_pem, ed25519.Ed25519PrivateKey.generate())


def admin_section(keys: Keys, **overrides: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "enabled": True,
        "keys": {
            "hs": {"algorithm": "HS256", "secret": HS_SECRET},
            "ed": {"algorithm": "EdDSA", "public_key_file": str(keys.ed_public_file)},
        },
        "request_keys": {"rk": REQUEST_SECRET},
    }
    section.update(overrides)
    return section


def http_on() -> dict[str, Any]:
    return {"enabled": True, "addr": "127.0.0.1:0"}


DROP = object()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    for key, value in changes.items():
        if value is DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def hs_token(kid: str | None = "hs", secret: str | bytes = HS_SECRET, **changes: Any) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**changes), secret, algorithm="HS256", headers=headers)


def ed_token(key: ed25519.Ed25519PrivateKey, kid: str = "ed", **changes: Any) -> str:
    return jwt.encode(claims(**changes), key, algorithm="EdDSA", headers={"kid": kid})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWS built by hand (PyJWT refuses to produce these): HS256 with any key, or alg none."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- a host with the admin API ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    @hookimpl
    def on_audit(self, entry: AuditEntry) -> None:
        self.entries.append(entry)

    def admin(self, action: str | None = None) -> list[AuditEntry]:
        return [e for e in self.entries if e.category == "admin" and (action is None or e.action == action)]


@dataclass
class AdminHost:
    th: Any
    client: httpx.AsyncClient
    audit: Recorder


@asynccontextmanager
async def admin_host(config: dict[str, Any], *plugins: tuple[str, Any]) -> AsyncIterator[AdminHost]:
    recorder = Recorder()
    async with open_test_host(("recorder", recorder), *plugins, config=config) as th:
        async with httpx.AsyncClient(base_url=th.host.http.url, timeout=DEADLINE) as client:
            yield AdminHost(th, client, recorder)


def assert_json_error(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["reason"] == reason, body
    assert isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text


# -- tokens ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_valid_tokens_of_every_configured_key_are_accepted(keys: Keys, host_logs: CapturedLogs) -> None:
    with trio.fail_after(DEADLINE):
        async with admin_host({"http": http_on(), "admin": admin_section(keys)}) as ah:
            for token in (hs_token(), ed_token(keys.ed_private)):
                response = await ah.client.get("/admin/plugins", headers=bearer(token))
                assert response.status_code == 200, response.text
                assert "recorder" in {p["name"] for p in response.json()["plugins"]}
            entries = ah.audit.admin("plugins.list")
            assert [e.actor for e in entries] == ["admin:alice", "admin:alice"]
            assert [e.details["kid"] for e in entries] == ["hs", "ed"]
            assert all(e.details["outcome"] == "ok" and e.details["ip"] == "127.0.0.1" for e in entries)
    assert HS_SECRET not in host_logs.text()


@pytest.mark.anyio
async def test_bad_tokens_are_refused_with_the_reason_and_audited(keys: Keys, host_logs: CapturedLogs) -> None:
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": "ed"}
    valid = hs_token()
    head, _payload, signature = valid.split(".")
    tampered_payload = _b64(json.dumps(claims(sub="mallory")).encode())
    cases: list[tuple[str, dict[str, str], str]] = [
        ("no Authorization header", {}, "token_missing"),
        ("another scheme", {"Authorization": f"Basic {valid}"}, "token_missing"),
        ("empty bearer", {"Authorization": "Bearer"}, "token_missing"),
        ("not a JWT", bearer("garbage"), "token_malformed"),
        ("three garbage parts", bearer("a.b.c"), "token_malformed"),
        ("too long", bearer("a" * 9000), "token_malformed"),
        ("alg none", bearer(forged({"alg": "none", "kid": "hs"}, claims(), None)), "token_algorithm"),
        ("no kid", bearer(hs_token(kid=None)), "token_no_kid"),
        ("unknown kid", bearer(hs_token(kid="retired")), "token_unknown_kid"),
        ("HS256 token for the EdDSA key (alg pinned per key)", bearer(hs_token(kid="ed")), "token_algorithm"),
        # Key confusion: the EdDSA public key (public knowledge) used as an HMAC secret.
        ("HS/EdDSA confusion", bearer(forged(header, claims(), keys.ed_public_pem)), "token_algorithm"),
        ("wrong HMAC secret", bearer(hs_token(secret="another-secret-" + "z" * 40)), "token_signature"),
        ("tampered payload", bearer(f"{head}.{tampered_payload}.{signature}"), "token_signature"),
        ("unknown Ed25519 key", bearer(ed_token(keys.other_ed)), "token_signature"),
        ("expired", bearer(hs_token(iat=now - 600, exp=now - 120)), "token_expired"),
        ("iat in the future", bearer(hs_token(iat=now + 120, exp=now + 300)), "token_not_yet_valid"),
        ("nbf in the future", bearer(hs_token(nbf=now + 120)), "token_not_yet_valid"),
        ("no exp", bearer(hs_token(exp=DROP)), "token_missing_claim"),
        ("no iat", bearer(hs_token(iat=DROP)), "token_missing_claim"),
        ("no iss", bearer(hs_token(iss=DROP)), "token_missing_claim"),
        ("no aud", bearer(hs_token(aud=DROP)), "token_missing_claim"),
        ("no sub", bearer(hs_token(sub=DROP)), "token_missing_claim"),
        ("wrong aud", bearer(hs_token(aud="another-service")), "token_audience"),
        ("aud as a list (strict)", bearer(hs_token(aud=[AUDIENCE, "other"])), "token_audience"),
        ("wrong iss", bearer(hs_token(iss="someone-else")), "token_issuer"),
        ("lifetime over the maximum", bearer(hs_token(iat=now, exp=now + 3600)), "token_lifetime"),
        ("empty sub", bearer(hs_token(sub="")), "token_bad_subject"),
        ("iat not a number", bearer(hs_token(iat="yesterday")), "token_bad_claims"),
    ]
    with trio.fail_after(DEADLINE):
        async with admin_host({"http": http_on(), "admin": admin_section(keys)}) as ah:
            for name, headers, reason in cases:
                response = await ah.client.get("/admin/plugins", headers=headers)
                assert response.status_code == 401, (name, response.text)
                assert response.json()["reason"] == reason, (name, response.json())
                assert response.headers["www-authenticate"].startswith("Bearer")
                token = headers.get("Authorization", "").partition(" ")[2]
                assert not token or token not in response.text
            denied = ah.audit.admin("denied")
            assert [e.details["reason"] for e in denied] == [reason for _, _, reason in cases]
            assert all(e.details["ip"] == "127.0.0.1" and e.details["path"] == "/admin/plugins" for e in denied)
            assert ah.audit.admin("plugins.list") == []  # nothing got through
            # Within the leeway (30 s) an expired token is still accepted: clocks differ a little.
            response = await ah.client.get("/admin/plugins", headers=bearer(hs_token(iat=now - 200, exp=now - 5)))
            assert response.status_code == 200
    everything = host_logs.text() + repr([e.details for e in denied])
    assert HS_SECRET not in everything and valid not in everything
    assert sum("admin request refused" in m for m in host_logs.messages("WARNING")) == len(cases)


# -- request signatures --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_signed_requests_are_verified(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []
    real_compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real_compare(a, b)

    config = {"http": http_on(), "admin": admin_section(keys, require_signed_requests=True)}
    token = bearer(hs_token())

    def signed(method: str, path: str, body: bytes = b"", **kw: Any) -> dict[str, str]:
        return {**token, **sign_request(REQUEST_SECRET, "rk", method, path, body, **kw)}

    with trio.fail_after(DEADLINE):
        async with admin_host(config) as ah:
            c = ah.client
            assert_json_error(await c.get("/admin/plugins", headers=token), 401, "signature_missing")
            monkeypatch.setattr(hmac, "compare_digest", spy)
            headers = signed("GET", "/admin/plugins")
            assert (await c.get("/admin/plugins", headers=headers)).status_code == 200
            # The request signature went through the constant-time comparison (so did the token's).
            assert any(b == headers["X-Host-Signature"] for _, b in compared)
            monkeypatch.setattr(hmac, "compare_digest", real_compare)
            assert_json_error(await c.get("/admin/plugins", headers=headers), 401, "replayed_nonce")
            old = int(time.time()) - 1000
            assert_json_error(await c.get("/admin/plugins", headers=signed("GET", "/admin/plugins", timestamp=old)),
                              401, "signature_expired")
            # Body, path, query and method are all covered.
            tampered = signed("POST", "/admin/reload", b'{"a": 1}')
            assert_json_error(await c.post("/admin/reload", headers=tampered, content=b'{"a": 2}'), 401,
                              "signature_invalid")
            assert_json_error(await c.get("/admin/plugins", headers=signed("GET", "/admin/config")), 401,
                              "signature_invalid")
            assert_json_error(await c.get("/admin/plugins?x=2", headers=signed("GET", "/admin/plugins?x=1")), 401,
                              "signature_invalid")
            assert_json_error(await c.post("/admin/reload", headers=signed("GET", "/admin/reload")), 401,
                              "signature_invalid")
            good_query = signed("GET", "/admin/plugins?verbose=1")
            assert (await c.get("/admin/plugins?verbose=1", headers=good_query)).status_code == 200
            wrong_key = {**token, **sign_request("x" * 40, "rk", "GET", "/admin/plugins")}
            assert_json_error(await c.get("/admin/plugins", headers=wrong_key), 401, "signature_invalid")
            unknown = {**token, **sign_request(REQUEST_SECRET, "nope", "GET", "/admin/plugins")}
            assert_json_error(await c.get("/admin/plugins", headers=unknown), 401, "signature_unknown_key")
            partial = {**token, "X-Host-Key-Id": "rk", "X-Host-Nonce": "n" * 20}
            assert_json_error(await c.get("/admin/plugins", headers=partial), 400, "signature_incomplete")
            bad_nonce = signed("GET", "/admin/plugins", nonce="short")
            assert_json_error(await c.get("/admin/plugins", headers=bad_nonce), 400, "signature_bad_nonce")
            upper = signed("GET", "/admin/plugins")
            upper["X-Host-Signature"] = upper["X-Host-Signature"].upper()
            assert_json_error(await c.get("/admin/plugins", headers=upper), 400, "signature_malformed")
            bad_ts = {**signed("GET", "/admin/plugins"), "X-Host-Timestamp": "soon"}
            assert_json_error(await c.get("/admin/plugins", headers=bad_ts), 400, "signature_bad_timestamp")
            # A valid signature does not replace the token.
            no_token = sign_request(REQUEST_SECRET, "rk", "GET", "/admin/plugins")
            assert_json_error(await c.get("/admin/plugins", headers=no_token), 401, "token_missing")
            audited = [e for e in ah.audit.admin("plugins.list") if e.details["outcome"] == "ok"]
            assert [e.details["signed_with"] for e in audited] == ["rk", "rk"]


def test_nonce_cache_is_bounded_and_forgets_expired_nonces() -> None:
    cache = _NonceCache(size=3, ttl=10)
    for i in range(3):
        cache.add("k", f"nonce-{i}", now=100)
    with pytest.raises(_Refused) as full:
        cache.add("k", "nonce-3", now=101)
    assert full.value.status == 429 and full.value.reason == "nonce_cache_full"
    with pytest.raises(_Refused) as replay:
        cache.add("k", "nonce-0", now=105)
    assert replay.value.reason == "replayed_nonce"
    cache.add("other-key", "x" * 16, now=111)  # the first three expired at 110: room again
    cache.add("k", "nonce-0", now=111)  # outside the window a nonce is new again (its timestamp is refused)
    assert len(cache) == 2
    successor = _NonceCache(size=3, ttl=10)
    successor.inherit(cache)  # a configuration reload keeps the memory
    with pytest.raises(_Refused):
        successor.add("k", "nonce-0", now=112)


# -- IP allow-list -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_ip_allow_list(keys: Keys) -> None:
    config = {"http": http_on(), "admin": admin_section(keys, allow_ips=["10.0.0.0/8", "2001:db8::/32"])}
    with trio.fail_after(DEADLINE):
        async with admin_host(config) as ah:
            response = await ah.client.get("/admin/plugins", headers=bearer(hs_token()))
            assert_json_error(response, 403, "ip_not_allowed")
            assert "127.0.0.1" in response.json()["error"]
            assert ah.audit.admin("denied")[0].details["reason"] == "ip_not_allowed"
    section = AdminSection(allow_ips=["10.0.0.0/8"], keys={})
    auth = AdminAuth(section, load_keys(section))
    auth.check_address("10.1.2.3")
    auth.check_address("::ffff:10.1.2.3")  # IPv4-mapped IPv6 is the IPv4 address
    for bad in ("11.0.0.1", "::1", "", "testclient", "10.0.0.1%eth0"):
        with pytest.raises(_Refused):
            auth.check_address(bad)


# -- endpoints ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_config_view_is_redacted(keys: Keys) -> None:
    with trio.fail_after(DEADLINE):
        async with admin_host({"http": http_on(), "admin": admin_section(keys)}) as ah:
            response = await ah.client.get("/admin/config", headers=bearer(hs_token()))
            assert response.status_code == 200
            sections = response.json()["sections"]
            assert sections["admin"]["keys"]["hs"]["secret"] == "**********"
            assert sections["admin"]["request_keys"]["rk"] == "**********"
            assert HS_SECRET not in response.text and REQUEST_SECRET not in response.text
            assert ah.audit.admin("config.view")[0].details["outcome"] == "ok"


@pytest.mark.anyio
async def test_unknown_endpoints_methods_and_bodies_get_json_errors(keys: Keys) -> None:
    config = {"http": http_on(), "admin": admin_section(keys, max_body_bytes=16)}
    token = bearer(hs_token())
    with trio.fail_after(DEADLINE):
        async with admin_host(config) as ah:
            c = ah.client
            # Without credentials nothing is revealed, not even whether a path exists.
            assert_json_error(await c.get("/admin/secret-stuff"), 401, "token_missing")
            assert_json_error(await c.get("/admin/secret-stuff", headers=token), 404, "not_found")
            response = await c.get("/admin/reload", headers=token)
            assert_json_error(response, 405, "method")
            assert response.headers["allow"] == "POST"
            assert_json_error(await c.post("/admin/reload", headers=token, content=b"x" * 17), 413, "body_too_large")
            assert_json_error(await c.post("/admin/plugins/no-such-plugin/reload", headers=token), 404,
                              "no_such_plugin")
            assert_json_error(await c.post("/admin/plugins/bad%20name/reload", headers=token), 400, "bad_plugin_name")
            response = await c.post("/admin/reload", headers=token)
            assert response.status_code == 200 and response.json() == {"ok": True, "results": []}


PLUGIN = '''
from host import hookimpl
VERSION = "{version}"

@hookimpl
def on_message(message):
    return VERSION
'''


@pytest.mark.anyio
async def test_reload_a_plugin_through_the_admin_api(keys: Keys, tmp_path: Path) -> None:
    dropins = tmp_path / "dropins"
    dropins.mkdir()
    (dropins / "greeter.py").write_text(PLUGIN.format(version="v1"))
    config = {"http": http_on(), "admin": admin_section(keys),
              "host": {"reload": {"plugins_dir": str(dropins), "watch_plugins_dir": False}}}
    try:
        with trio.fail_after(DEADLINE):
            async with admin_host(config) as ah:
                assert (await ah.th.send("hi")).texts == ["v1"]
                (dropins / "greeter.py").write_text(PLUGIN.format(version="v2"))
                os.utime(dropins / "greeter.py", (1_800_000_000, 1_800_000_000))  # a distinct mtime for the pyc
                response = await ah.client.post("/admin/plugins/greeter/reload",
                                                headers=bearer(ed_token(keys.ed_private, sub="bob")))
                assert response.status_code == 200, response.text
                assert response.json()["ok"] and response.json()["results"][0]["outcome"] == "reloaded"
                assert (await ah.th.send("hi")).texts == ["v2"]
                action = ah.audit.admin("plugins.reload")[0]
                assert action.actor == "admin:bob" and action.target == "greeter"
                reload = [e for e in ah.audit.entries if e.category == "plugin" and e.action == "reload_reloaded"]
                assert reload[0].details["reason"] == "admin:bob"
    finally:
        sys.path[:] = [p for p in sys.path if p != str(dropins)]
        sys.modules.pop("greeter", None)


@pytest.mark.anyio
async def test_audit_verify_without_the_audit_plugin_is_a_clear_404(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(DEADLINE):
        async with admin_host({"http": http_on(), "admin": admin_section(keys)}) as ah:
            token = bearer(hs_token())
            try:
                import host_audit  # noqa: F401
            except ImportError:
                expected = "audit_not_installed"
            else:
                expected = "audit_not_loaded"  # installed, but this host did not load it
            assert_json_error(await ah.client.post("/admin/audit/verify", headers=token), 404, expected)
            monkeypatch.setitem(sys.modules, "host_audit.verify", None)  # as if not installed
            response = await ah.client.post("/admin/audit/verify", headers=token)
            assert_json_error(response, 404, "audit_not_installed")
            assert "host-audit" in response.json()["error"]
            assert [e.details["status"] for e in ah.audit.admin("audit.verify")] == [404, 404]


@pytest.mark.anyio
async def test_audit_verify_runs_the_audit_plugins_verifier(keys: Keys, tmp_path: Path) -> None:
    audit_plugin = pytest.importorskip("host_audit.plugin", reason="the audit plugin (host-audit) is not installed")
    config = {"http": http_on(), "admin": admin_section(keys), "audit": {"dir": str(tmp_path / "audit")}}
    with trio.fail_after(DEADLINE):
        async with open_test_host(("audit", audit_plugin), config=config) as th:
            async with httpx.AsyncClient(base_url=th.host.http.url, timeout=DEADLINE) as client:
                await client.get("/admin/plugins", headers=bearer(hs_token()))  # something to audit
                response = await client.post("/admin/audit/verify", headers=bearer(hs_token()))
                assert response.status_code == 200, response.text
                report = response.json()
                assert report["ok"] is True and report["problem"] is None
                assert report["records"] >= 2
                # Tamper with a record: the same endpoint now names the problem.
                segment = sorted((tmp_path / "audit").glob("segment-*.jsonl"))[0]
                data = segment.read_bytes()
                segment.write_bytes(data.replace(b'"plugins.list"', b'"plugins.lisT"', 1))
                report = (await client.post("/admin/audit/verify", headers=bearer(hs_token()))).json()
                assert report["ok"] is False and report["problem"]["seq"] is not None


@pytest.mark.anyio
async def test_denied_attempts_are_audited_at_a_bounded_rate(keys: Keys) -> None:
    config = {"http": http_on(), "admin": admin_section(keys, audit_denied_per_minute=2)}
    with trio.fail_after(DEADLINE):
        async with admin_host(config) as ah:
            for _ in range(5):
                await ah.client.get("/admin/plugins")
            assert len(ah.audit.admin("denied")) == 2
            ah.th.host.admin._denied_window -= 61  # a minute later
            await ah.client.get("/admin/plugins")
            summary = ah.audit.admin("denied_suppressed")
            assert summary and summary[0].details["count"] == 3
            assert len(ah.audit.admin("denied")) == 3


def test_admin_config_is_validated() -> None:
    cases = [
        ({"enabled": True}, "needs at least one token key"),
        ({"keys": {"k": {"algorithm": "HS256", "secret": "short"}}}, "at least 32 bytes"),
        ({"keys": {"k": {"algorithm": "HS512", "secret": "x" * 40}}}, "at least 64 bytes"),
        ({"keys": {"k": {"algorithm": "none", "secret": "x" * 40}}}, "Invalid enum value 'none'"),
        ({"keys": {"k": {"algorithm": "EdDSA", "secret": "x" * 40}}}, "needs `public_key_file`"),
        ({"keys": {"bad kid!": {"algorithm": "HS256", "secret": "x" * 40}}}, "key id"),
        ({"allow_ips": ["localhost"]}, "not an IP network"),
        ({"max_token_lifetime": 100000}, "max_token_lifetime"),
        ({"token_ttl": 2000}, "token_ttl"),
        ({"require_signed_requests": True}, "request_keys"),
        ({"request_keys": {"r": "short"}}, "at least 32 bytes"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError) as caught:
            load_config(data={"admin": section}, environ={})
        assert message.lower() in str(caught.value).lower(), (section, str(caught.value))
        assert "x" * 40 not in str(caught.value)


def test_unreadable_or_wrong_key_files_are_named(tmp_path: Path, keys: Keys) -> None:
    missing = load_config(data={"admin": {"enabled": True, "keys": {
        "ed": {"algorithm": "EdDSA", "public_key_file": str(tmp_path / "nope.pub")}}}}, environ={})
    with pytest.raises(ConfigError, match=r"keys.ed: cannot read .*nope.pub"):
        build_host(missing, entry_points=False)
    wrong_type = load_config(data={"admin": {"enabled": True, "keys": {
        "ed": {"algorithm": "ES256", "public_key_file": str(keys.ed_public_file)}}}}, environ={})
    with pytest.raises(ConfigError, match="not a valid ES256 key"):
        build_host(wrong_type, entry_points=False)


# -- live key rotation (configuration reload) ----------------------------------------------------


@asynccontextmanager
async def file_host(path: Path, recorder: Recorder) -> AsyncIterator[Any]:
    host = build_host(load_config(path, environ={}), plugins=[("recorder", recorder)], entry_points=False)
    host.add_connector(LoopbackConnector())
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        try:
            yield host
        finally:
            host.request_shutdown()


def write_toml(path: Path, admin_keys: str, extra: str = "") -> None:
    path.write_text(f"""
[logging]
dir = ""
[host]
control_socket = ""
[host.reload]
watch_entry_points = false
[http]
addr = "127.0.0.1:0"
[admin]
enabled = true
{extra}
{admin_keys}
""")


@pytest.mark.anyio
async def test_keys_rotate_by_kid_on_configuration_reload(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    old_secret, new_secret = "old-key-" + "o" * 40, "new-key-" + "n" * 40
    write_toml(path, f'[admin.keys.k2026a]\nalgorithm = "HS256"\nsecret = "{old_secret}"')
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with file_host(path, recorder) as host:
            async with httpx.AsyncClient(base_url=host.http.url, timeout=DEADLINE) as client:
                old = bearer(hs_token(kid="k2026a", secret=old_secret))
                assert (await client.get("/admin/plugins", headers=old)).status_code == 200
                # Rotation step 1: add the new key next to the old one; both work.
                write_toml(path, f'[admin.keys.k2026a]\nalgorithm = "HS256"\nsecret = "{old_secret}"\n'
                                 f'[admin.keys.k2026b]\nalgorithm = "HS256"\nsecret = "{new_secret}"')
                await host.reloader.reload_config(reason="test")
                new = bearer(hs_token(kid="k2026b", secret=new_secret))
                assert (await client.get("/admin/plugins", headers=old)).status_code == 200
                assert (await client.get("/admin/plugins", headers=new)).status_code == 200
                # Step 2: retire the old key; its tokens stop working at once.
                write_toml(path, f'[admin.keys.k2026b]\nalgorithm = "HS256"\nsecret = "{new_secret}"')
                await host.reloader.reload_config(reason="test")
                assert_json_error(await client.get("/admin/plugins", headers=old), 401, "token_unknown_kid")
                assert (await client.get("/admin/plugins", headers=new)).status_code == 200
                # A broken key configuration is refused; the running keys stay.
                write_toml(path, '[admin.keys.k2026c]\nalgorithm = "EdDSA"\npublic_key_file = "/nonexistent.pub"')
                assert await host.reloader.reload_config(reason="test") == []
                assert (await client.get("/admin/plugins", headers=new)).status_code == 200
    changes = [e for e in recorder.entries if e.category == "config" and e.action == "change"]
    assert len(changes) == 2 and all("admin" in e.details["sections"] for e in changes)
    text = repr([e.details for e in recorder.entries])
    assert old_secret not in text and new_secret not in text
    assert any(e.action == "reload_refused" for e in recorder.entries)


# -- the CLI -------------------------------------------------------------------------------------


def run_cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOST_PLUGINS_DENY": "audit,dingtalk_connector,nlp_bridge", "HOST_LOG_DIR": ""}
    return subprocess.run(
        [sys.executable, "-m", "host", "--config", str(config), *args],
        capture_output=True, text=True, timeout=DEADLINE, env=env, cwd=str(ROOT),
    )


def test_cli_mints_tokens_the_api_accepts(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "host.toml"
    write_toml(path, f'[admin.keys.ed]\nalgorithm = "EdDSA"\npublic_key_file = "{keys.ed_public_file}"\n'
                     f'[admin.keys.hs]\nalgorithm = "HS256"\nsecret = "{HS_SECRET}"')
    config = load_config(path, environ={})
    auth = AdminAuth(config.admin, load_keys(config.admin))
    minted = run_cli("admin", "token", "--kid", "ed", "--sub", "carol", "--private-key", str(keys.ed_private_file),
                     config=path)
    assert minted.returncode == 0, minted.stderr
    from host.admin import _RequestFacts

    facts = _RequestFacts("127.0.0.1", "GET", "/admin/plugins")
    subject, kid, _ = auth.check_token(f"Bearer {minted.stdout.strip()}", time.time(), facts)
    assert (subject, kid) == ("carol", "ed")
    claims_ = jwt.decode(minted.stdout.strip(), options={"verify_signature": False})
    assert claims_["exp"] - claims_["iat"] == 300  # [admin] token_ttl
    hs = run_cli("admin", "token", "--kid", "hs", "--sub", "dave", "--ttl", "60", config=path)
    assert auth.check_token(f"Bearer {hs.stdout.strip()}", time.time(), facts)[0] == "dave"
    refused = run_cli("admin", "token", "--kid", "ed", "--sub", "x", config=path)  # no private key
    assert refused.returncode == 2 and "private_key_file" in refused.stderr
    assert "Traceback" not in refused.stderr
    too_long = run_cli("admin", "token", "--kid", "hs", "--sub", "x", "--ttl", "100000", config=path)
    assert too_long.returncode == 2 and "lifetime" in too_long.stderr


def test_cli_keygen_writes_a_usable_pair(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    write_toml(path, '[admin.keys.x]\nalgorithm = "HS256"\nsecret = "' + "x" * 40 + '"')
    made = run_cli("admin", "keygen", "--kid", "ops1", "--dir", str(tmp_path / "k"), config=path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "k" / "ops1.key").stat().st_mode & 0o777 == 0o600
    assert '[admin.keys."ops1"]' in made.stdout and 'algorithm = "EdDSA"' in made.stdout
    again = run_cli("admin", "keygen", "--kid", "ops1", "--dir", str(tmp_path / "k"), config=path)
    assert again.returncode == 1 and "not overwriting" in again.stderr


@pytest.mark.anyio
async def test_cli_call_talks_to_the_running_host(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "host.toml"
    write_toml(path, f'[admin.keys.ed]\nalgorithm = "EdDSA"\npublic_key_file = "{keys.ed_public_file}"\n'
                     f'private_key_file = "{keys.ed_private_file}"\n'
                     f'[admin.request_keys]\nrk = "{REQUEST_SECRET}"', extra="require_signed_requests = true")
    recorder = Recorder()
    with trio.fail_after(DEADLINE):
        async with file_host(path, recorder) as host:
            url = host.http.url
            called = await trio.to_thread.run_sync(
                lambda: run_cli("admin", "call", "GET", "/admin/plugins", "--url", url, "--sub", "erin", config=path)
            )
            assert called.returncode == 0, called.stderr
            assert "recorder" in {p["name"] for p in json.loads(called.stdout)["plugins"]}
            missing = await trio.to_thread.run_sync(
                lambda: run_cli("admin", "call", "GET", "/admin/nothing", "--url", url, config=path)
            )
            assert missing.returncode == 1 and json.loads(missing.stdout)["reason"] == "not_found"
    ok = [e for e in recorder.entries if e.category == "admin" and e.action == "plugins.list"]
    assert ok[0].actor == "admin:erin" and ok[0].details["signed_with"] == "rk"


def test_cli_run_reports_a_bind_failure_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "host.toml"
        path.write_text(f'[http]\naddr = "127.0.0.1:{port}"\n[host]\ncontrol_socket = ""\n[logging]\ndir = ""\n')
        result = run_cli("run", config=path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: HTTP server cannot listen on '127.0.0.1:{port}' ([http] addr or HOST_HTTP_ADDR): "
                      "Address already in use"]
