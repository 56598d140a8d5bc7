"""Sessions for lint, type checks, the host's tests, each plugin's tests and integration.

Plain ``nox`` runs the default set. Plugins are discovered from ``plugins/*/pyproject.toml``; each is
tested in its own fresh environment with only the host and itself installed, which proves it declares
its own dependencies.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PLUGINS = sorted(p.parent.name for p in ROOT.glob("plugins/*/pyproject.toml"))

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["lint", "typecheck", "tests", "plugin_tests", "integration"]
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"


def plugin_dist(name: str) -> str:
    return tomllib.loads((ROOT / "plugins" / name / "pyproject.toml").read_text())["project"]["name"]


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff over the host, plugins, tests and benchmarks."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "host", "tests", "plugins", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy, strict on host/."""
    session.install("mypy>=1.10", "-e", ".[test]")
    session.run("mypy", "--strict", "host")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The host's own tests (no plugin installed)."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests", *session.posargs)


@nox.session(python=PYTHON)
@nox.parametrize("plugin", PLUGINS)
def plugin_tests(session: nox.Session, plugin: str) -> None:
    """One plugin's tests, in a fresh environment with only the host and that plugin."""
    session.install(".", f"./plugins/{plugin}[test]")
    session.chdir(f"plugins/{plugin}")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def integration(session: nox.Session) -> None:
    """Install everything; every plugin is listed and loaded; allow and deny lists work."""
    session.install(".[test]", *[f"./plugins/{p}[test]" for p in PLUGINS])
    expected = {plugin_dist(p) for p in PLUGINS}

    def listing(**env: str) -> dict[str, dict[str, object]]:
        out = session.run("python", "-m", "host", "plugins", "--json", silent=True, env=env)
        assert isinstance(out, str)
        return {p["distribution"]: p for p in json.loads(out.strip().splitlines()[-1])}

    every = listing()
    missing = expected - set(every)
    if missing:
        session.error(f"plugins not discovered: {sorted(missing)}")
    failed = {d: p["error"] for d, p in every.items() if p["state"] != "loaded"}
    if failed:
        session.error(f"plugins not loaded: {failed}")
    first = PLUGINS[0]
    denied = listing(HOST_PLUGINS_DENY=first)
    if denied[plugin_dist(first)]["state"] != "disabled":
        session.error("HOST_PLUGINS_DENY did not disable the plugin")
    allowed = listing(HOST_PLUGINS_ALLOW=first)
    others = [d for d, p in allowed.items() if d != plugin_dist(first) and p["state"] != "disabled"]
    if allowed[plugin_dist(first)]["state"] != "loaded" or others:
        session.error("HOST_PLUGINS_ALLOW did not restrict loading to the allowed plugin")
    session.run("python", "-m", "host", "--version")
    session.run("python", "-m", "host", "config", "check")
    # The host's suite again, now with every plugin installed: the tests that need the plugins
    # together (secret hygiene, reload under traffic, deploy checks, frame fuzzing) skip elsewhere.
    # The reload-under-traffic test runs on its own: if it fails it may leave sockets behind whose
    # ResourceWarnings would surface in whichever test runs next.
    session.run("pytest", "tests", "--ignore=tests/test_integration_reload.py", *session.posargs)
    session.run("pytest", "tests/test_integration_reload.py")
    # The DingTalk end-to-end and demo tests again, now answered by the real NLP bridge (in the
    # plugin's own session they use a local echo stand-in).
    session.chdir("plugins/dingtalk_connector")
    session.run("pytest", "tests/test_e2e_replies.py", "tests/test_demo.py", "tests/test_lost_and_stuck_replies.py")
    session.chdir(str(ROOT))
    session.log(f"integration OK: {', '.join(sorted(expected))}")


@nox.session(python=PYTHON, default=False)
def benchmarks(session: nox.Session) -> None:
    """Run every benchmark script (not part of the default set)."""
    session.install(".", *[f"./plugins/{p}[test]" for p in PLUGINS])
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        session.run("python", str(script))
