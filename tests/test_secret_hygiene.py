"""Secret hygiene: a full scenario with canary secrets, then every output is scanned for them.

The canaries are the DingTalk AppSecret, the NLP API key, the admin JWT key and request-signing key
(and the audit signing key's material). The scenario: the host with every installed first-party
plugin (the DingTalk connector against its emulator, the NLP bridge against a local fake OpenAI
server that fails now and then and echoes the API key in its error bodies, as careless servers do,
the audit plugin in a temporary directory) connects, answers messages, survives backend errors, a
plugin whose ``on_message`` crashes with a secret in its exception text, a plugin whose
``on_startup`` fails the same way, a hot reload through the admin API and refused admin attempts.

Scanned: every log line (the JSON sink and the error log file), stdout and stderr (file-descriptor
level), every file of the audit log, ``/metrics``, ``/admin/config``, ``/admin/plugins``, and the
``repr`` of the configuration, its sections, the connectors and the admin state.

``test_full_scenario_*`` needs the three plugins (the nox ``integration`` session installs them);
``test_core_scenario_*`` runs with the host alone.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from host import Secret, hookimpl
from host.admin import sign_request
from host.config import LoggingSection, load_config
from host.logs import logger, setup_logging
from host.loopback import LoopbackConnector
from host.model import Message
from host.runtime import Host, build_host

DEADLINE = 60
DINGTALK_SECRET = "CANARY-dingtalk-appsecret-7f3a9c1e"
NLP_KEY = "CANARY-nlp-apikey-51b2e8d04c"
ADMIN_KEY = "CANARY-admin-jwt-key-" + "9d4e1b7a" * 5
REQUEST_KEY = "CANARY-admin-request-key-" + "3c8f2a6e" * 5
CANARIES = {"dingtalk": DINGTALK_SECRET, "nlp": NLP_KEY, "admin": ADMIN_KEY, "request": REQUEST_KEY}
PLUGINS = {"audit": "host_audit", "dingtalk_connector": "host_dingtalk_connector", "nlp_bridge": "host_nlp_bridge"}


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})  # real sockets everywhere


def installed(name: str) -> bool:
    return importlib.util.find_spec(PLUGINS[name]) is not None


# -- test plugins --------------------------------------------------------------------------------


class CrasherSection(msgspec.Struct):
    api_key: Secret
    app_secret: Secret


class Crasher:
    """A plugin with a careless bug: its exception text carries its own configured secret."""

    def __init__(self) -> None:
        self.host: Any = None

    @hookimpl
    def register_config_sections(self, register: Any) -> None:
        register("crasher", CrasherSection)

    @hookimpl
    def on_startup(self, host: Any) -> None:
        self.host = host

    @hookimpl
    def on_message(self, message: Message) -> None:
        if message.text.strip() == "crash":
            api_key = self.host.config.section("crasher").api_key.reveal()  # a local holding a secret
            raise RuntimeError(f"could not call the backend with key {api_key}")


class BrokenStart:
    """A plugin that fails at startup, naming a (configured) secret in the error."""

    @hookimpl
    def on_startup(self, host: Any) -> None:
        secret = host.config.section("crasher").app_secret.reveal()
        raise ConnectionError(f"login refused for app secret {secret}")


class Answerer:
    """Stands in for the NLP bridge in the core scenario."""

    @hookimpl
    def on_message(self, message: Message) -> str | None:
        return None if message.text.strip() == "crash" else f"answer: {message.text}"


# -- a fake OpenAI-compatible server -------------------------------------------------------------


@dataclass
class FakeOpenAI:
    url: str = ""
    script: deque[str] = field(default_factory=deque)
    calls: int = 0

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.calls += 1
        auth = request.headers.get("authorization", "")
        step = self.script.popleft() if self.script else "ok"
        if step == "500":  # echoes the whole Authorization header back
            return JSONResponse({"error": {"message": f"upstream failure for {auth}"}}, status_code=500)
        if step == "401":
            key = auth.removeprefix("Bearer ")
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}"}}, status_code=401)
        question = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        return JSONResponse({
            "id": "c1", "object": "chat.completion", "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer: {question}"},
                         "finish_reason": "stop"}],
        })

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})


@asynccontextmanager
async def open_fake_openai() -> AsyncIterator[FakeOpenAI]:
    import hypercorn.config
    import hypercorn.trio

    fake = FakeOpenAI()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.chat, methods=["POST"]),
                            Route("/v1/models", fake.models)])
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))  # type: ignore[arg-type]
        fake.url = binds[0]
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


# -- capturing everything ------------------------------------------------------------------------


@dataclass
class Capture:
    log: io.StringIO
    log_dir: Path
    texts: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        self.texts[name] = self.texts.get(name, "") + text

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.strip()]


@pytest.fixture
def capture(tmp_path: Path) -> Iterator[Capture]:
    out = io.StringIO()
    log_dir = tmp_path / "logs"
    setup_logging(LoggingSection(format="json", dir=str(log_dir), level="DEBUG"), stream=out)
    try:
        yield Capture(out, log_dir)
    finally:
        logger.remove()
        logger.add(sys.stderr)


def scan(capture: Capture, capfd: pytest.CaptureFixture[str], extra_canaries: dict[str, str]) -> None:
    """Every output, every canary: nothing may match."""
    out, err = capfd.readouterr()
    capture.add("stdout", out)
    capture.add("stderr", err)
    capture.add("log (json sink)", capture.log.getvalue())
    for path in sorted(capture.log_dir.rglob("*")):
        if path.is_file():
            capture.add(f"error log {path.name}", path.read_text(errors="replace"))
    canaries = {**CANARIES, **extra_canaries}
    leaks = [
        f"{canary_name} canary in {where}"
        for where, text in capture.texts.items()
        for canary_name, canary in canaries.items()
        if canary in text
    ]
    assert leaks == []
    # Not vacuous: secret-bearing errors were logged, with the secret masked.
    assert "could not call the backend with key **********" in capture.texts["log (json sink)"]
    assert "login refused for app secret **********" in capture.texts["log (json sink)"]


async def admin_get(client: httpx.AsyncClient, path: str, signed: bool = True) -> httpx.Response:
    return await client.get(path, headers=admin_headers("GET", path, signed=signed))


def admin_headers(method: str, path: str, *, signed: bool = True) -> dict[str, str]:
    now = int(time.time())
    token = jwt.encode({"iss": "host-admin", "aud": "host-admin-api", "sub": "ops", "iat": now, "exp": now + 120},
                       ADMIN_KEY, algorithm="HS256", headers={"kid": "ops"})
    headers = {"Authorization": f"Bearer {token}"}
    if signed:
        headers.update(sign_request(REQUEST_KEY, "rk", method, path))
    return headers


def admin_config() -> dict[str, Any]:
    return {
        "enabled": True,
        "keys": {"ops": {"algorithm": "HS256", "secret": {"env": "CANARY_ADMIN_KEY"}}},
        "request_keys": {"rk": REQUEST_KEY},
        "require_signed_requests": True,
    }


def snapshot_reprs(capture: Capture, host: Host) -> None:
    config = host.config
    capture.add("repr(config)", repr(config))
    capture.add("config.redacted()", json.dumps(config.redacted(), default=str))
    for name in sorted({*config.redacted(), *config.data}):
        if config.has_section(name):
            capture.add(f"repr([{name}])", repr(config.section(name)))
            capture.add(f"str([{name}])", str(config.section(name)))
    for name, connector in host.connectors.items():
        capture.add(f"repr(connector {name})", repr(connector))
        capture.add(f"vars(connector {name})", repr(getattr(connector, "__dict__", {})))
    capture.add("repr(admin)", repr(host.admin.auth))
    capture.add("plugins.listing()", json.dumps(host.plugins.listing(), default=str))


async def scrape_http(capture: Capture, client: httpx.AsyncClient) -> None:
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    capture.add("/metrics", metrics.text)
    for path in ("/admin/config", "/admin/plugins"):
        response = await admin_get(client, path)
        assert response.status_code == 200, response.text
        capture.add(path, response.text)
    # Refused attempts (their audit records and log lines are scanned too).
    bad = await client.get("/admin/config", headers={"Authorization": "Bearer " + jwt.encode(
        {"sub": "x"}, "wrong-" + ADMIN_KEY, algorithm="HS256", headers={"kid": "ops"})})
    assert bad.status_code == 401
    capture.add("refused admin answer", bad.text)
    unsigned = await admin_get(client, "/admin/config", signed=False)
    assert unsigned.status_code == 401
    capture.add("refused admin answer", unsigned.text)


def base_config(tmp_path: Path, allow: list[str]) -> dict[str, Any]:
    return {
        "logging": {"format": "json", "dir": str(tmp_path / "logs"), "level": "DEBUG"},
        "host": {"control_socket": "", "shutdown_timeout": 10, "reload": {"watch_entry_points": False}},
        "http": {"enabled": True, "addr": "127.0.0.1:0"},
        "plugins": {"allow": allow},
        "admin": admin_config(),
        # The test plugins' own secrets (the same canaries: a plugin may hold the NLP key too).
        "crasher": {"api_key": {"env": "CANARY_NLP_KEY"}, "app_secret": DINGTALK_SECRET},
    }


# -- the scenarios -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_core_scenario_leaks_no_canary(
    tmp_path: Path, capture: Capture, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANARY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("CANARY_NLP_KEY", NLP_KEY)
    config = base_config(tmp_path, ["crasher", "broken_start", "answerer"])
    host = build_host(load_config(data=config, environ={}), entry_points=False,
                      plugins=[("crasher", Crasher()), ("broken_start", BrokenStart()), ("answerer", Answerer())])
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            sent = [loopback.make_message(text) for text in ("hello", "crash", "again")]
            for message in sent:
                await loopback.send_message(message)
            await host.wait_idle()
            answers = [[d.text for d in loopback.replies_to(m.id)] for m in sent]
            assert answers == [["answer: hello"], [host.config.host.apology], ["answer: again"]]
            async with httpx.AsyncClient(base_url=host.http.url, timeout=DEADLINE) as client:
                await scrape_http(capture, client)
            snapshot_reprs(capture, host)
            host.request_shutdown()
    assert host.plugins.records["broken_start"].state == "failed"
    errors = [r for r in capture.log_records() if r["level"] == "ERROR"]
    assert any("could not call the backend" in r.get("exception", "") + r["message"] for r in errors)
    assert (tmp_path / "logs" / "error.log").read_text().strip()  # the error log was written
    scan(capture, capfd, {})


@pytest.mark.anyio
async def test_full_scenario_with_every_plugin_leaks_no_canary(
    tmp_path: Path, capture: Capture, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, module in PLUGINS.items():
        pytest.importorskip(module, reason=f"the {name} plugin is not installed (nox -s integration installs it)")
    from host_dingtalk_connector.emulator import open_emulator

    monkeypatch.setenv("CANARY_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv("CANARY_NLP_KEY", NLP_KEY)
    audit_dir = tmp_path / "audit"
    with trio.fail_after(DEADLINE):
        async with open_emulator(client_secret=DINGTALK_SECRET) as emu, open_fake_openai() as llm:
            config = base_config(tmp_path, [*PLUGINS, "crasher", "broken_start"])
            config["dingtalk"] = {
                "client_id": emu.settings.client_id,
                "client_secret": DINGTALK_SECRET,
                "openapi_endpoint": emu.base_url,
                "stream": {"ping_interval": 3600.0, "idle_timeout": 7200.0, "app_idle_timeout": 0.0},
            }
            config["nlp_bridge"] = {
                "default_backend": "llm",
                "stream": False,
                "reply_format": "text",
                "backends": {"llm": {
                    "type": "openai", "base_url": llm.url + "/v1", "model": "m", "stream": False,
                    "api_key": {"env": "CANARY_NLP_KEY"}, "max_attempts": 2, "backoff_initial": 0.01,
                    "backoff_max": 0.02, "breaker_failures": 100, "cache": "off",
                }},
            }
            config["audit"] = {"dir": str(audit_dir), "messages": {"enabled": True, "include_content": True}}
            host = build_host(load_config(data=config, environ={}), entry_points=True,
                              plugins=[("crasher", Crasher()), ("broken_start", BrokenStart())])
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                assert {r.name for r in host.plugins.loaded()} == {*PLUGINS, "crasher"}
                conversation: str | None = None
                answered = 0

                async def say(text: str, *script: str) -> list[dict[str, Any]]:
                    nonlocal conversation, answered
                    llm.script.extend(script)
                    sent = await emu.send_user_message(text, sender_staff_id="staff-1", conversation_id=conversation)
                    conversation = sent["conversationId"]
                    answered += 1
                    return await emu.wait_for_bot_message(conversation, count=answered)

                replies = await say("hello")
                assert replies[-1]["text"].endswith("answer: hello")
                await say("second", "500", "500")  # both attempts fail: an apology
                await say("third", "401")  # not retried: an apology
                # The crasher raises; the user still gets an answer (or the bridge's apology: after
                # the 401 the bridge may hold the backend off for a while).
                await say("crash")
                async with httpx.AsyncClient(base_url=host.http.url, timeout=DEADLINE) as client:
                    path = "/admin/plugins/nlp_bridge/reload"
                    reload = await client.post(path, headers=admin_headers("POST", path))
                    assert reload.status_code == 200 and reload.json()["ok"], reload.text
                    capture.add("admin reload answer", reload.text)
                    replies = await say("after reload")
                    assert replies[-1]["text"].endswith("answer: after reload")
                    verify = await client.post("/admin/audit/verify", headers=admin_headers("POST", "/admin/audit/verify"))
                    assert verify.status_code == 200 and verify.json()["ok"], verify.text
                    await scrape_http(capture, client)
                snapshot_reprs(capture, host)
                derived = {f"dingtalk token {i}": t for i, t in enumerate(emu.state.tokens)}
                derived |= {f"dingtalk ticket {i}": t for i, t in enumerate(emu.state.tickets)}
                host.request_shutdown()
    assert llm.calls >= 5
    # The audit log: every file (the signing key's own file aside, whose material is a canary).
    key_file = audit_dir / "signing.key"
    key_material = "".join(line for line in key_file.read_text().splitlines() if not line.startswith("-----"))
    for path in sorted(audit_dir.rglob("*")):
        if path.is_file() and path != key_file:
            capture.add(f"audit {path.name}", path.read_text(errors="replace"))
    assert "admin" in capture.texts["audit segment-00000000.jsonl"]  # admin actions were audited there
    # Tokens and tickets the emulator issued are secrets too: not in anything the host wrote.
    host_lines = "\n".join(json.dumps(r) for r in capture.log_records() if ".emulator" not in r.get("module", ""))
    leaked = [name for name, value in derived.items() if value and value in host_lines]
    assert leaked == []
    assert derived  # the scenario really authenticated against the emulator
    scan(capture, capfd, {"audit signing key": key_material})
