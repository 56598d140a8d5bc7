"""Secret rotation without restart, as docs/security.md describes it.

A ``{ file = ... }`` secret is read again when its plugin is reloaded (``python -m host reload NAME``),
so a rotated key file is picked up by a plugin reload; the old value is never printed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from host.testing import CapturedLogs, open_test_host

PLUGIN = '''
import hashlib
import msgspec
from host import Secret, hookimpl

class KeySection(msgspec.Struct):
    api_key: Secret

_host = []

@hookimpl
def register_config_sections(register):
    register("keyed", KeySection)

@hookimpl
def on_startup(host):
    _host[:] = [host]

@hookimpl
def on_message(message):
    key = _host[0].config.section("keyed").api_key.reveal()
    return hashlib.sha256(key.encode()).hexdigest()[:12]   # proves which key is in use, not the key
'''


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.mark.anyio
async def test_a_rotated_key_file_is_used_after_a_plugin_reload(tmp_path: Path, host_logs: CapturedLogs) -> None:
    dropins, key_file = tmp_path / "dropins", tmp_path / "api.key"
    dropins.mkdir()
    (dropins / "keyed.py").write_text(textwrap.dedent(PLUGIN))
    old_key, new_key = "old-key-" + "a" * 24, "new-key-" + "b" * 24
    key_file.write_text(old_key)
    os.chmod(key_file, 0o600)
    config = {"host": {"reload": {"plugins_dir": str(dropins), "watch_plugins_dir": False}},
              "keyed": {"api_key": {"file": str(key_file)}}}
    try:
        with trio.fail_after(10):
            async with open_test_host(config=config) as th:
                assert (await th.send("which key?")).texts == [digest(old_key)]
                key_file.write_text(new_key)
                result = await th.host.reloader.reload_plugin("keyed", reason="rotation")
                assert result.outcome == "reloaded", result
                assert (await th.send("which key?")).texts == [digest(new_key)]
    finally:
        sys.path[:] = [p for p in sys.path if p != str(dropins)]
        sys.modules.pop("keyed", None)
    assert old_key not in host_logs.text() and new_key not in host_logs.text()
