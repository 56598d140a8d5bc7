"""The TLS policy (host.tls) against real local TLS servers, with certificates from trustme.

Every "refused" case has a control: a deliberately permissive client connects to the same server,
so the refusal is proven to come from our policy and not from a broken test server. Real sockets:
real clock, an absolute ``fail_after`` per test.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import ipaddress
import json
import ssl
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import trio
import trio_websocket
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from host import tls
from host.http import HttpServerError
from host.testing import open_test_host

DEADLINE = 20  # seconds; generous for a loaded machine, never reached when things work


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})  # real sockets: the virtual clock would fire timeouts spuriously


# -- certificates ----------------------------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    good: trustme.LeafCert  # 127.0.0.1 / localhost, signed by the trusted CA
    wrong_host: trustme.LeafCert  # signed by the trusted CA, but for other.example
    rsa: trustme.LeafCert  # RSA key: needed for a non-ECDHE (RSA key exchange) cipher
    self_signed_pem: bytes  # cert + key, issued by itself, for 127.0.0.1
    self_signed_file: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    self_signed = _self_signed("127.0.0.1")
    self_signed_file = root / "self-signed.pem"
    self_signed_file.write_bytes(self_signed)
    return Pki(
        ca=ca,
        ca_file=ca_file,
        good=ca.issue_cert("127.0.0.1", "localhost"),
        wrong_host=ca.issue_cert("other.example"),
        rsa=ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA),
        self_signed_pem=self_signed,
        self_signed_file=self_signed_file,
    )


def _self_signed(ip: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key_pem


# -- server contexts (deliberately outside our policy where the case needs it) -----------------


def _legacy(context: ssl.SSLContext, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """Allow TLS 1.0/1.1 (OpenSSL 3 needs security level 0 for them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1_1 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def server_ctx(pki: Pki, case: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if case == "good":
        pki.good.configure_cert(context)
    elif case == "tls11":
        pki.good.configure_cert(context)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _legacy(context, ssl.TLSVersion.TLSv1_1)
    elif case == "wrong_host":
        pki.wrong_host.configure_cert(context)
    elif case == "self_signed":
        context.load_cert_chain(str(pki.self_signed_file))
    elif case == "weak_cipher":
        # TLS 1.2 with RSA key exchange and CBC: no forward secrecy, not AEAD.
        pki.rsa.configure_cert(context)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("AES128-SHA256")
    else:
        raise AssertionError(case)
    return context


def permissive_ctx(pki: Pki, case: str) -> ssl.SSLContext:
    """A client that accepts what the case's server offers (the control)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(context)
    if case == "tls11":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _legacy(context, ssl.TLSVersion.TLSv1_3)
    elif case == "wrong_host":
        context.check_hostname = False  # still verifies the chain
    elif case == "self_signed":
        context.load_verify_locations(cadata=pki.self_signed_pem.decode())
    elif case == "weak_cipher":
        context.set_ciphers("AES128-SHA256")
    return context


# -- a local TLS server speaking HTTP or WebSocket ----------------------------------------------


@dataclass
class TlsServer:
    port: int
    #: Server-side outcome of each TLS handshake: "ok" or the SSL error.
    handshakes: list[str] = field(default_factory=list)

    async def handshake(self, index: int) -> str:
        """The outcome of handshake ``index`` (the server may finish after the client gave up)."""
        while len(self.handshakes) <= index:
            await trio.sleep(0.005)
        return self.handshakes[index]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/"


@asynccontextmanager
async def tls_server(context: ssl.SSLContext, kind: Literal["http", "ws", "openai"]) -> AsyncIterator[TlsServer]:
    server = TlsServer(0)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            server.handshakes.append(tls.describe_ssl_error(exc))
            return
        server.handshakes.append("ok")
        try:
            if kind in ("http", "openai"):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
                body = b"hello" if kind == "http" else OPENAI_ANSWER
                head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                await stream.send_all(head.encode() + b"connection: close\r\n\r\n" + body)
                await stream.aclose()
            else:
                async with trio.open_nursery() as nursery:
                    request = await trio_websocket.wrap_server_stream(nursery, stream)
                    ws = await request.accept()
                    await ws.send_message("hello")
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await ws.get_message()  # until the client closes
        except (trio.BrokenResourceError, trio_websocket.ConnectionClosed):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, handle, 0, context, host="127.0.0.1")
        )
        server.port = listeners[0].transport_listener.socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


OPENAI_ANSWER = json.dumps({
    "id": "c1", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "over TLS"}, "finish_reason": "stop"}],
}).encode()


# -- clients -----------------------------------------------------------------------------------


async def httpx_get(url: str, context: ssl.SSLContext) -> str:
    async with httpx.AsyncClient(verify=context, timeout=DEADLINE) as client:
        response = await client.get(url)
        return response.text


async def ws_hello(url: str, context: ssl.SSLContext, connect_timeout: float = DEADLINE) -> str:
    async with trio_websocket.open_websocket_url(url, ssl_context=context, connect_timeout=connect_timeout) as ws:
        message = await ws.get_message()
        assert isinstance(message, str)
        return message


async def ws_hello_fail_fast(server: TlsServer, context: ssl.SSLContext) -> str:
    """The recommended pattern: handshake first (clear error), then hand the stream to trio-websocket."""
    stream = await tls.open_tls_stream("127.0.0.1", server.port, ssl_context=context)
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/")
        message = await ws.get_message()
        await ws.aclose()
    assert isinstance(message, str)
    return message


REFUSED = {
    # case -> what the refusal must say (client side)
    "tls11": ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "protocol version", "unsupported protocol"),
    "self_signed": ("self-signed certificate", "self signed certificate"),
    "wrong_host": ("mismatch", "not valid for"),
    "weak_cipher": ("HANDSHAKE_FAILURE", "handshake failure", "NO_SHARED_CIPHER", "no shared cipher"),
}


def said(text: str, case: str) -> bool:
    return any(needle.lower() in text.lower() for needle in REFUSED[case])


def ssl_reason(exc: BaseException) -> str:
    return tls.describe_ssl_error(exc)


# -- the policy itself ------------------------------------------------------------------------


def test_client_and_server_contexts_comply_with_the_policy(pki: Pki, tmp_path: Path) -> None:
    client = tls.client_context()
    assert tls.policy_violations(client) == []
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pki.good.cert_chain_pems[0].write_to_path(str(cert))
    pki.good.private_key_pem.write_to_path(str(key))
    server = tls.server_context(cert, key)
    assert tls.policy_violations(server, server=True) == []
    names = {c["name"] for c in server.get_ciphers() if c["protocol"] != "TLSv1.3"}
    assert names and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in names)
    # The checker is not vacuous: Python's own defaults are flagged (CBC-SHA384 suites, DHE).
    assert tls.policy_violations(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))


def test_each_call_returns_a_fresh_context() -> None:
    # httpcore sets ALPN on the context it is given: sharing one would leak that between clients.
    assert tls.client_context() is not tls.client_context()


def test_bad_tls_files_are_named(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(tls.TlsPolicyError, match="not found"):
        tls.server_context(tmp_path / "missing.pem", tmp_path / "missing.key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(tls.TlsPolicyError, match="not a usable pair"):
        tls.server_context(garbage, garbage)
    with pytest.raises(tls.TlsPolicyError, match="CA bundle not found"):
        tls.client_context(tmp_path / "nope.pem")
    with pytest.raises(tls.TlsPolicyError, match="no usable PEM certificate"):
        tls.configure(str(garbage))
    assert tls.extra_ca_file() is None  # a refused configure changes nothing


# -- outbound: httpx and trio-websocket with our context ---------------------------------------


@pytest.mark.anyio
async def test_httpx_and_websocket_accept_a_good_server(pki: Pki) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, "good"), "http") as server:
            assert await httpx_get(server.url, tls.client_context(pki.ca_file)) == "hello"
        async with tls_server(server_ctx(pki, "good"), "ws") as server:
            assert await ws_hello(server.ws_url, tls.client_context(pki.ca_file)) == "hello"
            assert await ws_hello_fail_fast(server, tls.client_context(pki.ca_file)) == "hello"
            assert server.handshakes == ["ok", "ok"]


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["tls11", "self_signed", "wrong_host", "weak_cipher"])
async def test_httpx_refuses_bad_servers(pki: Pki, case: str) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, case), "http") as server:
            # Control: the server works for a client that accepts what it offers.
            assert await httpx_get(server.url, permissive_ctx(pki, case)) == "hello"
            with pytest.raises(httpx.ConnectError) as caught:
                await httpx_get(server.url, tls.client_context(pki.ca_file))
            assert await server.handshake(0) == "ok" and await server.handshake(1) != "ok"
            # Either side may be the one that names the problem (a TLS 1.1 server just hangs up).
            reasons = f"client: {ssl_reason(caught.value)} | server: {server.handshakes[1]}"
            assert said(reasons, case), reasons


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["tls11", "self_signed", "wrong_host", "weak_cipher"])
# trio-websocket leaks the client socket on this path (python-trio/trio-websocket#199): its
# ResourceWarning surfaces at garbage collection. Nothing else is ignored.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_websocket_refuses_bad_servers(pki: Pki, case: str) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, case), "ws") as server:
            assert await ws_hello(server.ws_url, permissive_ctx(pki, case)) == "hello"
            # trio-websocket's own open never gets a connection: the handshake fails (the server saw
            # it) and, because of python-trio/trio-websocket#199, it reports its connect timeout.
            with pytest.raises(trio_websocket.HandshakeError):
                await ws_hello(server.ws_url, tls.client_context(pki.ca_file), connect_timeout=2)
            # The server never completed a second handshake (when the client rejects the certificate,
            # the leaked socket leaves the server waiting, so it may record nothing at all).
            assert server.handshakes[0] == "ok" and "ok" not in server.handshakes[1:]
    gc.collect()  # surface the leaked socket's warning here, under this test's filter


@pytest.mark.anyio
@pytest.mark.parametrize("case", ["tls11", "self_signed", "wrong_host", "weak_cipher"])
async def test_open_tls_stream_refuses_bad_servers_at_once_with_the_reason(pki: Pki, case: str) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, case), "ws") as server:
            assert await ws_hello_fail_fast(server, permissive_ctx(pki, case)) == "hello"
            with pytest.raises(tls.TlsHandshakeError) as caught:
                await ws_hello_fail_fast(server, tls.client_context(pki.ca_file))
            assert f"127.0.0.1:{server.port}" in str(caught.value)
            assert await server.handshake(0) == "ok" and await server.handshake(1) != "ok"
            reasons = f"client: {caught.value} | server: {server.handshakes[1]}"
            assert said(reasons, case), reasons


@pytest.mark.anyio
async def test_extra_ca_from_config_and_ssl_cert_file_are_honoured(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, "good"), "http") as server:
            with pytest.raises(httpx.ConnectError):  # the test CA is not in the system store
                await httpx_get(server.url, tls.client_context())
            tls.configure(str(pki.ca_file))  # what [tls] ca_file does at startup
            try:
                assert tls.extra_ca_file() == str(pki.ca_file)
                assert await httpx_get(server.url, tls.client_context()) == "hello"
            finally:
                tls.configure(None)
            monkeypatch.setenv("HOST_TLS_CA_FILE", str(pki.ca_file))
            assert await httpx_get(server.url, tls.client_context()) == "hello"
            monkeypatch.delenv("HOST_TLS_CA_FILE")
            monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # OpenSSL's own variable
            assert await httpx_get(server.url, tls.client_context()) == "hello"


@pytest.mark.anyio
async def test_host_configures_the_extra_ca_from_its_config(pki: Pki) -> None:
    with trio.fail_after(DEADLINE):
        try:
            async with open_test_host(config={"tls": {"ca_file": str(pki.ca_file)}}):
                assert tls.extra_ca_file() == str(pki.ca_file)
        finally:
            tls.configure(None)


# -- inbound: the host's HTTPS server ----------------------------------------------------------


def https_config(pki: Pki, tmp_path: Path) -> dict[str, Any]:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    for blob in pki.good.cert_chain_pems:
        with cert.open("ab") as f:
            f.write(blob.bytes())
    pki.good.private_key_pem.write_to_path(str(key))
    return {"http": {"enabled": True, "addr": "127.0.0.1:0", "tls_cert": str(cert), "tls_key": str(key)}}


def tls11_client(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(context)
    return _legacy(context, ssl.TLSVersion.TLSv1_1)


def weak_cipher_client(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(context)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AES+SHA:AES128-SHA256")  # CBC suites only
    return context


@pytest.mark.anyio
async def test_https_server_serves_the_policy_and_refuses_tls11(pki: Pki, tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with open_test_host(config=https_config(pki, tmp_path)) as th:
            url = th.host.http.url
            assert url.startswith("https://127.0.0.1:")
            good: Callable[[], ssl.SSLContext] = lambda: tls.client_context(pki.ca_file)  # noqa: E731
            async with httpx.AsyncClient(verify=good(), timeout=DEADLINE) as client:
                response = await client.get(url + "/healthz")
                assert response.status_code == 200 and response.json()["status"] == "ok"
            for refused in (tls11_client(pki), weak_cipher_client(pki)):
                with pytest.raises(httpx.ConnectError) as caught:
                    async with httpx.AsyncClient(verify=refused, timeout=DEADLINE) as client:
                        await client.get(url + "/healthz")
                reason = ssl_reason(caught.value)
                assert "protocol" in reason.lower() or "handshake failure" in reason.lower(), reason
            # Raw check of what was negotiated, and that refused clients did not hurt the server.
            stream = await tls.open_tls_stream("127.0.0.1", int(url.rsplit(":", 1)[1]), ssl_context=good())
            assert stream.version() in ("TLSv1.2", "TLSv1.3")
            await stream.aclose()
            async with httpx.AsyncClient(verify=good(), timeout=DEADLINE) as client:
                assert (await client.get(url + "/readyz")).status_code == 200


@pytest.mark.anyio
async def test_https_server_with_an_unusable_certificate_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("garbage")
    config = {"http": {"enabled": True, "addr": "127.0.0.1:0", "tls_cert": str(tmp_path / "cert.pem"),
                       "tls_key": str(tmp_path / "cert.pem")}}
    with trio.fail_after(DEADLINE), pytest.raises(BaseExceptionGroup) as caught:
        async with open_test_host(config=config):
            pass  # pragma: no cover - startup fails
    errors = caught.value.exceptions
    while len(errors) == 1 and isinstance(errors[0], BaseExceptionGroup):
        errors = errors[0].exceptions
    assert len(errors) == 1 and isinstance(errors[0], HttpServerError)
    assert "tls_cert" in str(errors[0]) and "not a usable pair" in str(errors[0])


def test_tls_cert_without_key_is_a_config_error() -> None:
    from host.config import load_config
    from host.errors import ConfigError

    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_config(data={"http": {"tls_cert": "/x.pem"}}, environ={})


def test_no_code_turns_verification_off() -> None:
    """No first-party code disables certificate checks (the emulator's test-only server side aside)."""
    root = Path(__file__).resolve().parent.parent
    forbidden = ("verify=False", "CERT_NONE", "check_hostname = False", "check_hostname=False",
                 "_create_unverified_context", "ssl=False")
    offenders = []
    for path in [*root.glob("host/**/*.py"), *root.glob("plugins/*/src/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(root)}: {needle}" for needle in forbidden if needle in text]
    assert offenders == []


@pytest.mark.anyio
async def test_renewed_certificate_is_served_after_reload_without_restart(pki: Pki, tmp_path: Path) -> None:
    config = https_config(pki, tmp_path)
    cert_file, key_file = Path(config["http"]["tls_cert"]), Path(config["http"]["tls_key"])
    renewed = pki.ca.issue_cert("127.0.0.1", "localhost")

    async def served_serial(port: int) -> int:
        stream = await tls.open_tls_stream("127.0.0.1", port, ssl_context=tls.client_context(pki.ca_file))
        der = stream.getpeercert(binary_form=True)
        await stream.aclose()
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    with trio.fail_after(DEADLINE):
        async with open_test_host(config=config) as th:
            port = int(th.host.http.url.rsplit(":", 1)[1])
            before = await served_serial(port)
            # Renewed in place (what certbot does), then SIGHUP / `python -m host reload`.
            cert_file.write_bytes(b"".join(blob.bytes() for blob in renewed.cert_chain_pems))
            key_file.write_bytes(renewed.private_key_pem.bytes())
            await th.host.reloader.reload_all(reason="test")
            after = await served_serial(port)
            assert after != before
            assert after == x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number
            # A broken renewal is refused: the running certificate stays.
            key_file.write_text("garbage")
            await th.host.reloader.reload_all(reason="test")
            assert await served_serial(port) == after


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "trust_ca"), [("good", False), ("tls11", True), ("wrong_host", True), ("good", True)])
async def test_the_nlp_bridge_connects_under_the_policy(pki: Pki, case: str, trust_ca: bool) -> None:
    """End to end: the NLP bridge plugin's HTTPS client follows the host's policy and [tls] ca_file."""
    bridge = pytest.importorskip("host_nlp_bridge.plugin", reason="the nlp_bridge plugin is not installed")
    with trio.fail_after(DEADLINE):
        async with tls_server(server_ctx(pki, case), "openai") as server:
            config: dict[str, Any] = {"nlp_bridge": {
                "default_backend": "llm", "stream": False, "reply_format": "text",
                "backends": {"llm": {"base_url": f"https://127.0.0.1:{server.port}/v1", "model": "m",
                                     "stream": False, "max_attempts": 1, "cache": "off"}},
            }}
            if trust_ca:
                config["tls"] = {"ca_file": str(pki.ca_file)}
            try:
                async with open_test_host(("nlp_bridge", bridge), config=config) as th:
                    (reply,) = (await th.send("hi")).texts
            finally:
                tls.configure(None)
            handshake = await server.handshake(0)
    if case == "good" and trust_ca:
        assert reply == "over TLS" and handshake == "ok"
    else:  # refused: an untrusted CA (the system store does not know the test CA), TLS 1.1, wrong name
        assert reply != "over TLS" and handshake != "ok"
