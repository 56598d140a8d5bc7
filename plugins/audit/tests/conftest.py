"""Shared fixtures: a generated 10,000-record log (built once), fresh copies of it, fake clocks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _logtools import FakeClock, generate_log

pytest_plugins = ["host.testing"]


@pytest.fixture(autouse=True)
def _no_audit_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # HOST_AUDIT_DIR wins over configuration: never let the developer's environment leak in.
    monkeypatch.delenv("HOST_AUDIT_DIR", raising=False)


@pytest.fixture(scope="session")
def pristine_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid log of 10,000 entries (plus headers and checkpoints) over several segments and two
    runs, with an off-host copy of its checkpoints in ``<root>/offhost/checkpoints.jsonl``.
    Never modify it: use ``log_copy``."""
    root = tmp_path_factory.mktemp("pristine")
    generate_log(root / "audit", entries=10_000)
    (root / "offhost").mkdir()
    shutil.copy(root / "audit" / "checkpoints.jsonl", root / "offhost" / "checkpoints.jsonl")
    return root


@pytest.fixture
def log_copy(pristine_log: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the pristine log directory (``<tmp>/audit``) to tamper with."""
    shutil.copytree(pristine_log, tmp_path / "copy")
    yield tmp_path / "copy" / "audit"


@pytest.fixture
def offhost(log_copy: Path) -> Path:
    """The off-host copy of the checkpoints (taken before any tampering)."""
    return log_copy.parent / "offhost" / "checkpoints.jsonl"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
