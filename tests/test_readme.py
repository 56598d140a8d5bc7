"""The README gives exactly two commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_commands_run_and_test() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    run, test = commands
    assert "python -m host" in run and "pip install" in run
    assert "nox" in test and "pip install" in test


def test_ci_runs_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_every_plugin_has_readme_changelog_and_entry_point() -> None:
    import tomllib

    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        folder = pyproject.parent
        meta = tomllib.loads(pyproject.read_text())["project"]
        assert (folder / "README.md").exists(), folder
        changelog = (folder / "CHANGELOG.md").read_text()
        assert meta["version"] in changelog, f"{folder.name}: CHANGELOG lacks {meta['version']}"
        assert folder.name in meta["entry-points"]["host.plugins"]
        assert meta["name"] == "host-" + folder.name.replace("_", "-")
