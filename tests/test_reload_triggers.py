"""Reload triggers that involve real time: file watching, the control socket, pip installs.

These run on trio's real clock (file-system events and a second process cannot follow a virtual
clock); every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from host.testing import open_test_host

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio"


VERSIONED = '''
from host import hookimpl
@hookimpl
def on_message(message):
    return "{version}: " + message.text
'''


async def wait_for(predicate, seconds: float = 20) -> None:
    with trio.fail_after(seconds):
        while not predicate():
            await trio.sleep(0.05)


async def test_watch_plugins_dir_loads_changes_and_removals(tmp_path: Path) -> None:
    root = tmp_path / "dropins"
    root.mkdir()
    config = {"host": {"reload": {"plugins_dir": str(root), "debounce_seconds": 0.1}}}
    try:
        async with open_test_host(config=config) as th:
            records = th.host.plugins.records
            (root / "watched.py").write_text(VERSIONED.format(version="v1"))
            await wait_for(lambda: records.get("watched") and records["watched"].state == "loaded")
            assert (await th.send("a")).texts == ["v1: a"]
            (root / "watched.py").write_text(VERSIONED.format(version="v2") + "\n# v2\n")
            with trio.fail_after(20):
                while (await th.send("b")).texts != ["v2: b"]:
                    await trio.sleep(0.1)
            (root / "watched.py").unlink()
            await wait_for(lambda: records["watched"].state == "disabled")
    finally:
        sys.modules.pop("watched", None)
        if str(root) in sys.path:
            sys.path.remove(str(root))


async def test_cli_reload_talks_to_the_running_host(tmp_path: Path) -> None:
    root = tmp_path / "dropins"
    root.mkdir()
    (root / "remote.py").write_text(VERSIONED.format(version="v1"))
    sock = tmp_path / "ctl" / "host.sock"
    config = {"host": {"control_socket": str(sock),
                       "reload": {"plugins_dir": str(root), "watch_plugins_dir": False}}}
    env = {**os.environ, "HOST_CONTROL_SOCKET": str(sock)}
    env.pop("HOST_CONFIG", None)
    try:
        async with open_test_host(config=config) as th:
            assert oct(sock.stat().st_mode & 0o777) == "0o600"
            proc = await trio.run_process(
                [sys.executable, "-m", "host", "reload", "remote"], env=env, capture_stdout=True,
                capture_stderr=True, check=False,
            )
            assert proc.returncode == 0, proc.stderr.decode()
            assert "remote: reloaded" in proc.stdout.decode()
            assert (await th.send("x")).texts == ["v1: x"]
            (root / "remote.py").write_text(VERSIONED.format(version="v2") + "\n# changed\n")
            proc = await trio.run_process(
                [sys.executable, "-m", "host", "reload", "remote", "--json"], env=env,
                capture_stdout=True, check=False,
            )
            assert proc.returncode == 0
            assert '"outcome":"reloaded"' in proc.stdout.decode()
            assert (await th.send("y")).texts == ["v2: y"]
        assert not sock.exists()  # removed on shutdown
        proc = await trio.run_process([sys.executable, "-m", "host", "reload"], env=env,
                                      capture_stderr=True, check=False)
        assert proc.returncode == 1 and "cannot reach the running host" in proc.stderr.decode()
    finally:
        sys.modules.pop("remote", None)
        if str(root) in sys.path:
            sys.path.remove(str(root))


PACKAGE_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "host-pipdemo"
version = "{version}"

[project.entry-points."host.plugins"]
pipdemo = "host_pipdemo"

[tool.hatch.build.targets.wheel]
packages = ["host_pipdemo"]
'''


def build_package(root: Path, version: str, body: str) -> Path:
    src = root / f"src-{version}"
    (src / "host_pipdemo").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(PACKAGE_PYPROJECT.format(version=version)))
    (src / "host_pipdemo" / "__init__.py").write_text(textwrap.dedent(body))
    return src


def pip_install(target: Path, src: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--upgrade", "--target", str(target), str(src)],
        check=True, timeout=180, capture_output=True,
    )


async def test_pip_install_upgrade_broken_upgrade_and_removal(tmp_path: Path) -> None:
    target = tmp_path / "site"
    target.mkdir()
    sys.path.insert(0, str(target))
    config = {"host": {"reload": {"watch_entry_points": True, "entry_point_poll_seconds": 0.1}}}
    try:
        async with open_test_host(config=config) as th:
            records = th.host.plugins.records
            await trio.to_thread.run_sync(pip_install, target, build_package(tmp_path, "1.0", VERSIONED.format(version="v1")))
            await wait_for(lambda: "pipdemo" in records and records["pipdemo"].state == "loaded")
            assert records["pipdemo"].version == "1.0"
            assert (await th.send("a")).texts == ["v1: a"]

            await trio.to_thread.run_sync(pip_install, target, build_package(tmp_path, "2.0", VERSIONED.format(version="v2")))
            await wait_for(lambda: records["pipdemo"].version == "2.0")
            assert (await th.send("b")).texts == ["v2: b"]

            broken = "import this_dependency_is_missing\n"
            await trio.to_thread.run_sync(pip_install, target, build_package(tmp_path, "3.0", broken))
            failed_line = 'host_plugin_reloads_total{outcome="failed",plugin="pipdemo"} 1.0'
            await wait_for(lambda: failed_line in th.host.metrics.render().decode())
            assert records["pipdemo"].version == "2.0" and records["pipdemo"].state == "loaded"
            assert (await th.send("c")).texts == ["v2: c"]  # the previous version keeps serving

            # Uninstall: pip refuses to uninstall outside its environment, so remove the files the
            # way `pip uninstall` does.
            for path in target.iterdir():
                if path.name.startswith(("host_pipdemo", "host-pipdemo")):
                    subprocess.run(["rm", "-rf", str(path)], check=True)
            await wait_for(lambda: records["pipdemo"].state == "disabled")
            assert (await th.send("d")).texts == []
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("host_pipdemo", None)
