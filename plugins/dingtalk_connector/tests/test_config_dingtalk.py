"""The [dingtalk] section: apps, environment fallbacks, validation, and secrets kept out of reprs."""

from __future__ import annotations

from typing import Any

import pytest
from host_dingtalk_connector.config import DingTalkSection, resolve_apps
from host_dingtalk_connector.errors import DingTalkConfigError

from host.config import load_config
from host.errors import ConfigError

SECRET = "s3cr3t-value-never-printed"


def section(data: dict[str, Any]) -> DingTalkSection:
    config = load_config(data={"dingtalk": data}, environ={})
    result = config.validate_section("dingtalk", DingTalkSection)
    assert isinstance(result, DingTalkSection)
    return result


def test_no_credentials_means_no_apps() -> None:
    assert resolve_apps(section({}), environ={}) == []


def test_single_app_from_config() -> None:
    (app,) = resolve_apps(section({"client_id": "dingabc", "client_secret": SECRET}), environ={})
    assert (app.name, app.client_id, app.robot_code) == ("default", "dingabc", "dingabc")
    assert app.openapi_endpoint == "https://api.dingtalk.com"
    assert app.client_secret.reveal() == SECRET
    assert SECRET not in repr(app) and SECRET not in repr(section({"client_secret": SECRET}))


def test_single_app_from_environment() -> None:
    env = {
        "DINGTALK_CLIENT_ID": "dingenv",
        "DINGTALK_CLIENT_SECRET": SECRET,
        "DINGTALK_OPENAPI_ENDPOINT": "http://127.0.0.1:9999/",
    }
    (app,) = resolve_apps(section({}), environ=env)
    assert app.client_id == "dingenv" and app.client_secret.reveal() == SECRET
    assert app.openapi_endpoint == "http://127.0.0.1:9999"


def test_config_wins_over_environment() -> None:
    env = {"DINGTALK_CLIENT_ID": "dingenv", "DINGTALK_OPENAPI_ENDPOINT": "http://env:1"}
    (app,) = resolve_apps(
        section({"client_id": "dingcfg", "client_secret": SECRET, "openapi_endpoint": "http://cfg:2"}), environ=env
    )
    assert app.client_id == "dingcfg" and app.openapi_endpoint == "http://cfg:2"


def test_secret_whitespace_is_stripped() -> None:
    (app,) = resolve_apps(section({"client_id": "a", "client_secret": f"  {SECRET}\n"}), environ={})
    assert app.client_secret.reveal() == SECRET


def test_several_apps() -> None:
    apps = resolve_apps(
        section(
            {
                "openapi_endpoint": "http://127.0.0.1:1",
                "apps": {
                    "sales": {"client_id": "dinga", "client_secret": SECRET, "robot_code": "robota"},
                    "support": {"client_id": "dingb", "client_secret": SECRET, "openapi_endpoint": "http://127.0.0.1:2"},
                },
            }
        ),
        environ={"DINGTALK_CLIENT_ID": "ignored-for-named-apps"},
    )
    assert [(a.name, a.client_id, a.robot_code, a.openapi_endpoint) for a in apps] == [
        ("sales", "dinga", "robota", "http://127.0.0.1:1"),
        ("support", "dingb", "dingb", "http://127.0.0.1:2"),
    ]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"client_id": "a"}, "client_secret: missing"),
        ({"client_secret": SECRET}, "client_id: missing"),
        ({"client_id": "a", "client_secret": SECRET, "openapi_endpoint": "ftp://x"}, "openapi_endpoint"),
        ({"client_id": "a", "client_secret": SECRET, "apps": {"b": {"client_id": "b", "client_secret": SECRET}}}, "not both"),
        ({"apps": {"x": {"client_id": "a", "client_secret": SECRET}, "y": {"client_id": "a", "client_secret": SECRET}}}, "twice"),
        ({"apps": {"bad name": {"client_id": "a", "client_secret": SECRET}}}, "app name"),
        ({"client_id": "a", "client_secret": SECRET, "stream": {"dedup_ttl": 60}}, "dedup_ttl"),
        ({"client_id": "a", "client_secret": SECRET, "stream": {"ping_interval": 0}}, "ping_interval"),
        ({"client_id": "a", "client_secret": SECRET, "stream": {"max_frame_bytes": 100, "transport_max_bytes": 50}}, "transport_max_bytes"),
    ],
)
def test_invalid_configurations(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(DingTalkConfigError) as info:
        resolve_apps(section(data), environ={})
    assert problem in str(info.value)
    assert SECRET not in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_unknown_keys_are_refused_by_the_host() -> None:
    config = load_config(data={"dingtalk": {"client_idd": "x"}}, environ={})
    with pytest.raises(ConfigError, match="client_idd"):
        config.validate_section("dingtalk", DingTalkSection)
