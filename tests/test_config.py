"""Configuration loading, validation errors, environment overrides and secrets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from host import Secret
from host.config import load_config
from host.errors import ConfigError
from host.logs import logger, setup_logging


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.source == "<defaults>"
    assert config.host.concurrency == 64
    assert config.logging.error_retention_days == 30


def test_invalid_value_names_file_key_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, "[host]\nconcurrency = 'many'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert "[host] concurrency" in message
    assert "Expected `int`, got `str`" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[host]\nconcurency = 3\n", "unknown field `concurency`"),
        ("[host\n", "invalid TOML"),
        ("[logging]\nerror_retention_days = 7\n", "at least 30"),
        ("[logging]\nlevel = 'LOUD'\n", "[logging] level"),
        ("[host]\nconcurrency = 0\n", "[host] concurrency: must be at least 1"),
    ],
)
def test_invalid_configs_are_refused_clearly(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), environ={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_env_overrides_named_and_generic(tmp_path: Path) -> None:
    path = write(tmp_path, "[host]\nconcurrency = 4\n[myplugin]\nlimit = 1\n")
    environ = {
        "HOST_CONCURRENCY": "8",
        "HOST_PLUGINS_DENY": "a, b",
        "HOST__MYPLUGIN__LIMIT": "5",
        "HOST__MYPLUGIN__NAME": "not toml so a string",
        "HOST__HOST__TIMEOUTS__ON_MESSAGE": "90.5",
    }
    config = load_config(path, environ=environ)
    assert config.host.concurrency == 8
    assert config.plugins.deny == ["a", "b"]
    assert config.raw_section("myplugin") == {"limit": 5, "name": "not toml so a string"}
    assert config.host.timeouts == {"on_message": 90.5}


def test_host_config_env_selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[host]\nqueue_size = 7\n")
    assert load_config(environ={"HOST_CONFIG": str(path)}).host.queue_size == 7


class Creds(msgspec.Struct):
    app_key: str = ""
    app_secret: Secret | None = None


def test_secrets_from_literal_env_and_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("from-a-file-123\n")
    for raw, expected in [
        ("'literal-secret-1'", "literal-secret-1"),
        ("{ env = 'MY_SECRET' }", "env-secret-456"),
        (f"{{ file = '{secret_file}' }}", "from-a-file-123"),
    ]:
        os.environ["MY_SECRET"] = "env-secret-456"
        try:
            config = load_config(write(tmp_path, f"[creds]\napp_secret = {raw}\n"), environ={})
            creds = config.validate_section("creds", Creds)
        finally:
            del os.environ["MY_SECRET"]
        assert creds.app_secret.reveal() == expected
        assert expected not in repr(creds) and expected not in str(creds.app_secret)
        assert expected not in json.dumps(config.redacted())


def test_secret_env_var_missing_is_named(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[creds]\napp_secret = { env = 'NOT_SET_ANYWHERE' }\n"), environ={})
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        config.validate_section("creds", Creds)


def test_secret_never_appears_in_log_output(tmp_path: Path) -> None:
    canary = "CANARY-s3cr3t-value-9f8e7d"
    config = load_config(write(tmp_path, f"[creds]\napp_secret = '{canary}'\n"), environ={})
    creds = config.validate_section("creds", Creds)
    out = io.StringIO()
    setup_logging(config.logging.__class__(format="json", dir=str(tmp_path / "logs")), stream=out)
    try:
        logger.info("loaded {}", creds)
        logger.info("config {}", config.redacted())
        try:
            raise RuntimeError(f"auth failed for secret {creds.app_secret.reveal()}")
        except RuntimeError:
            logger.exception("token refresh failed")
        logger.bind(token=canary).warning("bound values are masked too")
    finally:
        logger.remove()
        logger.add(sys.stderr)
    text = out.getvalue()
    error_log = (tmp_path / "logs" / "error.log").read_text()
    assert "token refresh failed" in text and "token refresh failed" in error_log
    assert canary not in text
    assert canary not in error_log
    assert "**********" in text


CHECKING_PLUGIN = '''
import msgspec
from host import hookimpl

class Section(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "http://x"
    timeout: float = 1.0

@hookimpl
def register_config_sections(register):
    register("checked", Section)
'''


def test_cli_config_check(tmp_path: Path) -> None:
    from distfactory import make_plugin_dist

    make_plugin_dist(tmp_path / "site", dist="host-checked", module="host_checked", code=CHECKING_PLUGIN,
                     entry_name="checked")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HOST_PLUGINS_ALLOW": "checked"}
    good = write(tmp_path, "[checked]\ntimeout = 2.5\n")
    proc = subprocess.run([sys.executable, "-m", "host", "--config", str(good), "config", "check"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout and "checked" in proc.stdout
    bad = write(tmp_path, "[checked]\ntimeout = 'slow'\n")
    proc = subprocess.run([sys.executable, "-m", "host", "--config", str(bad), "config", "check"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}: [checked] timeout: Expected `float`, got `str`" in proc.stderr
    assert "Traceback" not in proc.stderr

