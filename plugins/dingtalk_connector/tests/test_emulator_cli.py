"""``python -m host_dingtalk_connector.emulator``: prints its base URL, serves, stops on Ctrl-C.

Runs a real subprocess, so this module uses trio's real clock; every wait has a fail_after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def _env() -> dict[str, str]:
    return {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}


async def test_cli_prints_the_base_url_serves_and_stops_on_ctrl_c() -> None:
    cmd = [sys.executable, "-m", "host_dingtalk_connector.emulator", "--port", "0",
           "--client-id", "dingcliapp", "--client-secret", "cli-secret-123", "--set", "push_policy=newest"]
    with trio.fail_after(60):
        process = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                   env=_env())
        try:
            assert process.stdout is not None
            buffer = b""
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "the emulator exited before printing its URL"
                buffer += chunk
            base_url = buffer.split(b"\n", 1)[0].decode().strip()
            assert base_url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=base_url) as http:
                info = (await http.get("/_emulator")).json()
                assert info["clientId"] == "dingcliapp"
                assert (await http.get("/_emulator/settings")).json()["push_policy"] == "newest"
                ok = await http.post("/v1.0/gateway/connections/open", json={
                    "clientId": "dingcliapp", "clientSecret": "cli-secret-123",
                    "subscriptions": [{"type": "EVENT", "topic": "*"}]})
                assert ok.status_code == 200 and ok.json()["endpoint"].startswith("ws://127.0.0.1:")
                default_secret = await http.post("/v1.0/gateway/connections/open", json={
                    "clientId": "dingcliapp", "clientSecret": "emulator-secret-0123456789",
                    "subscriptions": [{"type": "EVENT", "topic": "*"}]})
                assert default_secret.status_code == 401
                assert (await http.get("/")).status_code == 200
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_cli_rejects_bad_settings_with_a_clear_message() -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "host_dingtalk_connector.emulator", "--set", "push_policy=sideways"],
            capture_stdout=True, capture_stderr=True, check=False, env=_env())
    assert result.returncode == 2
    assert b"push_policy must be one of" in result.stderr
