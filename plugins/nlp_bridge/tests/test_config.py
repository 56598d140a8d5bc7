"""Unit tests: the configuration section, the NLP_* variables, routing, http_json templates."""

from __future__ import annotations

import msgspec
import pytest
from host_nlp_bridge.backends.http_json import extract, render, variables
from host_nlp_bridge.config import BackendConfig, NlpBridgeSection, resolve
from host_nlp_bridge.errors import ConfigurationError
from host_nlp_bridge.model import ChatMessage, ChatRequest
from host_nlp_bridge.routing import Router


def section(**data: object) -> NlpBridgeSection:
    return msgspec.convert(data, NlpBridgeSection)


def test_nothing_configured_means_echo_only() -> None:
    settings = resolve(section(), {})
    assert settings.echo_only
    assert settings.default_backend == "echo"
    assert list(settings.backends) == ["echo"]


def test_environment_defines_the_default_openai_backend() -> None:
    settings = resolve(section(), {"NLP_BASE_URL": "http://10.0.0.1:8000/v1/", "NLP_API_KEY": "k-123456", "NLP_MODEL": "qwen"})
    backend = settings.backends["default"]
    assert (backend.type, backend.base_url, backend.model) == ("openai", "http://10.0.0.1:8000/v1", "qwen")
    assert backend.api_key is not None and backend.api_key.reveal() == "k-123456"
    assert "k-123456" not in repr(backend)
    assert settings.default_backend == "default" and not settings.echo_only
    assert settings.env_used == ("NLP_BASE_URL", "NLP_API_KEY", "NLP_MODEL")


def test_environment_backend_replaces_a_toml_one_and_default_can_stay_elsewhere() -> None:
    toml = section(
        backends={"default": {"base_url": "http://a/v1"}, "kb": {"type": "http_json", "url": "http://kb/ask"}},
        default_backend="kb",
    )
    settings = resolve(toml, {"NLP_BASE_URL": "http://b/v1"})
    assert settings.backends["default"].base_url == "http://b/v1"
    assert settings.default_backend == "kb"


def test_first_listed_backend_is_the_default() -> None:
    settings = resolve(section(backends={"x": {"base_url": "http://x/v1"}, "y": {"base_url": "http://y/v1"}}), {})
    assert settings.default_backend == "x"


def test_references_to_the_env_backend_need_the_variable() -> None:
    toml = section(fallback=["default"])
    with pytest.raises(ConfigurationError, match=r"fallback\[0\]: no backend named 'default' \(it is defined by NLP_BASE_URL"):
        resolve(toml, {})
    assert resolve(toml, {"NLP_BASE_URL": "http://x/v1"}).fallback == ("default",)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backends": {"m": {"type": "openai"}}}, "base_url: an openai backend needs"),
        ({"backends": {"m": {"type": "http_json", "url": "ftp://x"}}}, "url: an http_json backend needs"),
        ({"backends": {"m": {"type": "http_json", "url": "http://x", "body": {"q": "${txt}"}}}}, r"unknown template variable\(s\) \$\{txt\}"),
        ({"backends": {"m": {"type": "http_json", "url": "http://x", "body": {"q": "${ text }"}}}}, r"unknown template variable"),
        ({"backends": {"m": {"base_url": "http://x", "read_timeout": 0}}}, "read_timeout: must be greater than 0"),
        ({"backends": {"m": {"base_url": "http://x", "max_attempts": 0}}}, "max_attempts: must be at least 1"),
        ({"backends": {"echo": {"base_url": "http://x"}}}, "reserved for the built-in echo backend"),
        ({"backends": {"bad name": {"base_url": "http://x"}}}, "invalid backend name"),
        ({"routes": [{"backend": "echo"}]}, "set `command` or `conversations`"),
        ({"routes": [{"backend": "echo", "command": "translate"}]}, "expected one word starting with '/'"),
        ({"routes": [{"backend": "echo", "command": "/reset"}]}, "'/reset' is the bridge's own command"),
        ({"routes": [{"backend": "echo", "command": "/a"}, {"backend": "echo", "command": "/A"}]}, "routed twice"),
        ({"routes": [{"backend": "gpt", "command": "/a"}]}, r"routes\[0\].backend: no backend named 'gpt'"),
        ({"default_backend": "gpt"}, "default_backend: no backend named 'gpt'"),
        ({"limits": {"max_concurrency": 0}}, "limits.max_concurrency: must be at least 1"),
        ({"memory": {"idle_ttl": -1}}, "memory.idle_ttl: must be greater than 0"),
        ({"answer_timeout": 0}, "answer_timeout: must be greater than 0"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_invalid_configuration_names_the_problem(data: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        section(**data)


def test_routing_precedence_and_fallback_chain() -> None:
    toml = section(
        backends={"a": {"base_url": "http://a/v1"}, "b": {"base_url": "http://b/v1", "system_prompt": "B"}},
        fallback=["b", "echo"],
        routes=[
            {"command": "/b", "backend": "b", "stateless": True},
            {"conversations": ["room"], "backend": "b", "system_prompt": "Room"},
        ],
    )
    router = Router(resolve(toml, {}))
    plain = router.route("x", "  hello ")
    assert (plain.chain, plain.text, plain.stateless, plain.id) == (("a", "b", "echo"), "hello", False, "default")
    command = router.route("room", "/B  ask this")
    assert (command.chain, command.text, command.stateless, command.system_prompt) == (("b", "echo"), "ask this", True, "B")
    room = router.route("room", "/unknown thing")
    assert (room.chain, room.text, room.system_prompt, room.id) == (("b", "echo"), "/unknown thing", "Room", "route1")


def test_memory_disabled_makes_every_route_stateless() -> None:
    router = Router(resolve(section(memory={"enabled": False}), {}))
    assert router.route("x", "hi").stateless


def request() -> ChatRequest:
    history = (ChatMessage("user", "q0"), ChatMessage("assistant", "a0"))
    return ChatRequest(
        messages=(ChatMessage("system", "S"), *history, ChatMessage("user", "q1")),
        text="q1",
        conversation_id="cid",
        user_id="dingtalk:u1",
        user_name="Ann",
        request_id="r1",
        history=history,
    )


def test_http_json_template_fills_values_with_their_types() -> None:
    template = {
        "query": "${text}",
        "ctx": {"history": "${history}", "prompt": "${system}"},
        "label": "from ${user_name} in ${conversation_id}: ${text}",
        "list": ["${request_id}", 3, True],
        "literal": "$5 or ${",
    }
    body = render(template, variables(request()))
    assert body == {
        "query": "q1",
        "ctx": {"history": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}], "prompt": "S"},
        "label": "from Ann in cid: q1",
        "list": ["r1", 3, True],
        "literal": "$5 or ${",
    }
    assert render("${messages}", variables(request()))[-1] == {"role": "user", "content": "q1"}


def test_http_json_answer_path() -> None:
    document = {"data": {"items": [{"text": "a"}, {"text": "b"}]}}
    assert extract(document, "data.items.1.text") == "b"
    assert extract(document, "data.items.-1.text") == "b"
    with pytest.raises(KeyError, match=r"data\.items\.5"):
        extract(document, "data.items.5.text")
    with pytest.raises(KeyError, match=r"data\.nope"):
        extract(document, "data.nope")


def test_backend_defaults_are_sane() -> None:
    backend = BackendConfig(base_url="http://x/v1")
    assert backend.max_attempts == 3 and backend.cache == "auto" and backend.stream
    assert backend.connect_timeout < backend.read_timeout < backend.total_timeout
