"""Discovery through real entry points: failures isolated, allow/deny lists, host API ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distfactory import SysPath

from host.cli import main
from host.errors import PluginError
from host.plugins import PluginManager
from host.testing import open_test_host

FIXTURE_PLUGINS = {"good", "broken", "misspelt", "future", "greeter"}


def load(plugin_dir: Path, allow=FIXTURE_PLUGINS, deny=()) -> PluginManager:
    with SysPath(plugin_dir):
        manager = PluginManager(allow=allow, deny=deny)
        manager.load_entry_points()
    return manager


def test_broken_plugins_are_reported_and_skipped(plugin_dir: Path) -> None:
    manager = load(plugin_dir)
    records = manager.records
    assert records["good"].state == "loaded"
    assert records["good"].distribution == "host-good"
    assert records["good"].version == "1.0.0"
    assert records["good"].hooks == ["on_message"]

    broken = records["broken"]
    assert broken.state == "failed"
    assert broken.distribution == "host-broken"
    assert "import failed" in broken.error
    assert "module_that_does_not_exist" in broken.error

    misspelt = records["misspelt"]
    assert misspelt.state == "failed"
    assert "'on_mesage'" in misspelt.error
    assert "did you mean 'on_message'" in misspelt.error
    assert not manager.pm.has_plugin("misspelt")  # nothing half-registered


def test_incompatible_plugin_is_refused_with_working_versions(plugin_dir: Path) -> None:
    future = load(plugin_dir).records["future"]
    assert future.state == "incompatible"
    assert ">=2.0,<3" in future.error
    assert "1.0" in future.error  # says what this host provides


def test_allow_and_deny_lists(plugin_dir: Path) -> None:
    manager = load(plugin_dir, allow={"good", "greeter"}, deny={"greeter"})
    assert manager.records["good"].state == "loaded"
    assert manager.records["greeter"].state == "disabled"
    assert "deny" in manager.records["greeter"].error
    assert manager.records["broken"].state == "disabled"
    assert "allow" in manager.records["broken"].error


def test_add_refuses_duplicate_names() -> None:
    manager = PluginManager()
    manager.add("one", object())
    with pytest.raises(PluginError, match="already registered"):
        manager.add("one", object())


async def _good_plugin_answers(plugin_dir: Path) -> None:
    with SysPath(plugin_dir):
        async with open_test_host(entry_points=True, config={"plugins": {"allow": list(FIXTURE_PLUGINS)}}) as th:
            result = await th.send("hi")
            states = {r.name: r.state for r in th.host.plugins.records.values()}
    assert result.texts == ["good: hi"]
    assert states["broken"] == "failed"


@pytest.mark.anyio
async def test_host_serves_with_broken_plugins_installed(plugin_dir: Path) -> None:
    await _good_plugin_answers(plugin_dir)


def _cli(plugin_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(plugin_dir), "HOST_PLUGINS_ALLOW": ",".join(FIXTURE_PLUGINS)}
    environ.pop("HOST_CONFIG", None)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "host", *args], capture_output=True, text=True, env=environ, timeout=60,
        cwd=plugin_dir,
    )


def test_cli_plugins_json_lists_every_plugin(plugin_dir: Path) -> None:
    proc = _cli(plugin_dir, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    listing = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listing["good"]["state"] == "loaded"
    assert listing["broken"]["state"] == "failed"
    assert listing["future"]["state"] == "incompatible"
    assert listing["greeter"]["hooks"] == ["register_commands"]


def test_cli_plugins_table_and_deny_env(plugin_dir: Path) -> None:
    proc = _cli(plugin_dir, "plugins", env={"HOST_PLUGINS_DENY": "good"})
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("good "))
    assert "disabled" in line


def test_hook_register_commands_plugin_subcommand(plugin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with SysPath(plugin_dir):
        os.environ["HOST_PLUGINS_ALLOW"] = ",".join(FIXTURE_PLUGINS)
        try:
            code = main(["greet", "--name", "DingTalk"])
            out = capsys.readouterr().out
            with pytest.raises(SystemExit):
                main(["--help"])
            help_text = capsys.readouterr().out
        finally:
            del os.environ["HOST_PLUGINS_ALLOW"]
    assert code == 3
    assert "hello DingTalk" in out
    assert "greet" in help_text and "[plugin greeter]" in help_text
