"""Shared fixtures and helpers for the nlp_bridge tests.

Rules for these tests: every test that touches sockets runs on ``SOCKET_CLOCK`` (virtual time that
only jumps once every task has been idle for a while, so real socket I/O never makes a timeout fire
spuriously) and inside an absolute ``trio.fail_after``; servers bind 127.0.0.1 port 0; the NLP_*
variables of the environment running the tests never leak in.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio.testing

pytest_plugins = ["host.testing"]

sys.path.insert(0, str(Path(__file__).parent))

#: A canary API key: it must never appear in any log line.
API_KEY = "sk-canary-5f0c1d2e3a4b"


def socket_backend() -> tuple[str, dict[str, Any]]:
    """trio with a virtual clock that jumps only after 0.1 s of real idleness (for socket tests)."""
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0.1)})


@pytest.fixture(autouse=True)
def _no_nlp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NLP_BASE_URL", "NLP_API_KEY", "NLP_MODEL"):
        monkeypatch.delenv(var, raising=False)


def openai_backend(base_url: str, **overrides: Any) -> dict[str, Any]:
    """An openai backend table for ``base_url`` with test-friendly timeouts (virtual seconds)."""
    return {
        "type": "openai",
        "base_url": base_url,
        "model": "fake-model",
        "api_key": API_KEY,
        "connect_timeout": 5,
        "read_timeout": 10,
        "total_timeout": 60,
        "backoff_initial": 1,
        "backoff_max": 4,
        **overrides,
    }


def bridge_config(backends: dict[str, Any], host: dict[str, Any] | None = None, **section: Any) -> dict[str, Any]:
    """A whole config document for ``open_test_host``."""
    config: dict[str, Any] = {"nlp_bridge": {"backends": backends, **section}}
    config["host"] = {"concurrency": 64, **(host or {})}
    return config


def sample(th: Any, name: str, **labels: str) -> float:
    """The current value of metric ``host_<name>`` with ``labels`` (0.0 when never set)."""
    value = th.host.metrics.registry.get_sample_value(f"host_{name}", labels)
    return 0.0 if value is None else value
