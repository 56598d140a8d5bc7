"""The plugin in a running host: auditing a plugin's own action end to end, configuration,
message metadata, metrics, strict fsync, idle checkpoints, and failing safely."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from _logtools import FakeClock, all_records, entries_of, generate_log
from host_audit import plugin
from host_audit.messages import IdHasher, load_or_create_salt
from host_audit.segments import list_segments
from host_audit.verify import verify_log

from host import Secret, hookimpl
from host.model import Message
from host.runtime import Host
from host.testing import CapturedLogs, open_test_host


class GrantingPlugin:
    """A plugin that audits its own sensitive operation through the one host call."""

    @hookimpl
    async def on_message(self, host: Host, message: Message) -> str:
        await host.audit(
            "permission",
            "grant",
            actor=f"user:{message.sender.name}",
            target="role:admin",
            details={"role": "admin", "api_token": "tok-very-secret", "password": Secret("hunter2-secret")},
        )
        return "granted"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """Real time: the log does its disk work in worker threads (``trio.to_thread``), and a virtual
    clock that jumps whenever every task waits would fire the hooks' timeouts while a thread works."""
    return ("trio", {})


def _config(directory: Path, **audit: Any) -> dict[str, Any]:
    return {"audit": {"dir": str(directory), **audit}}


@pytest.mark.anyio
async def test_a_plugin_audits_its_own_action_end_to_end(tmp_path: Path, host_logs: CapturedLogs) -> None:
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), ("granter", GrantingPlugin()), config=_config(tmp_path)) as th:
            result = await th.send("make me admin", sender_name="alice")
            assert result.texts == ["granted"]
            request_id = result.message.request_id
    assert not host_logs.errors(), host_logs.text()

    report = verify_log(tmp_path)
    assert report.ok, report.summary()
    assert report.clean_end  # the final checkpoint was written at shutdown
    entries = entries_of(tmp_path)
    loads = {e["target"] for e in entries if (e["category"], e["action"]) == ("plugin", "load")}
    assert {"audit", "granter"} <= loads  # the host's own plugin-lifecycle entries
    (grant,) = [e for e in entries if e["category"] == "permission"]
    assert grant["action"] == "grant" and grant["actor"] == "user:alice" and grant["target"] == "role:admin"
    assert grant["details"] == {"role": "admin", "api_token": "**********", "password": "**********"}
    assert grant["request_id"] == request_id
    assert entries[-1]["category"] == "audit" and entries[-1]["action"] == "close"
    raw = b"".join(p.read_bytes() for p in list_segments(tmp_path))
    assert b"tok-very-secret" not in raw and b"hunter2-secret" not in raw


class LifecycleAuditor:
    """Audits from its own on_startup (awaited) and on_shutdown (queued with audit_soon)."""

    @hookimpl
    async def on_startup(self, host: Host) -> None:
        await host.audit("admin", "startup-check", actor="lifecycle")

    @hookimpl
    def on_shutdown(self, host: Host) -> None:
        host.audit_soon("admin", "shutdown-check", actor="lifecycle")


@pytest.mark.anyio
@pytest.mark.parametrize("audit_first", [True, False])
async def test_other_plugins_can_audit_while_starting_and_stopping(
    tmp_path: Path, host_logs: CapturedLogs, audit_first: bool
) -> None:
    # Whatever the registration order, the log opens first and closes last.
    plugins = [("audit", plugin), ("lifecycle", LifecycleAuditor())]
    if not audit_first:
        plugins.reverse()
    with trio.fail_after(30):
        async with open_test_host(*plugins, config=_config(tmp_path)):
            pass
    assert not host_logs.errors(), host_logs.text()
    actions = [e["action"] for e in entries_of(tmp_path) if e["actor"] == "lifecycle"]
    assert actions == ["startup-check", "shutdown-check"]
    assert verify_log(tmp_path).clean_end


@pytest.mark.anyio
async def test_host_audit_dir_environment_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_AUDIT_DIR", str(tmp_path / "from-env"))
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=_config(tmp_path / "from-config")):
            pass
    assert list_segments(tmp_path / "from-env")
    assert not (tmp_path / "from-config").exists()


@pytest.mark.anyio
async def test_restart_continues_the_same_log(tmp_path: Path) -> None:
    with trio.fail_after(30):
        for _ in range(2):
            async with open_test_host(("audit", plugin), config=_config(tmp_path)) as th:
                await th.host.audit("admin", "restart", actor="user:ops")
    report = verify_log(tmp_path)
    assert report.ok and report.segments == 2 and report.findings == []
    assert len([e for e in entries_of(tmp_path) if e["action"] == "restart"]) == 2


@pytest.mark.anyio
async def test_message_metadata_is_recorded_with_hashed_ids_and_no_content(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=_config(tmp_path, messages={"enabled": True})) as th:
            result = await th.send("my salary is 12345", sender_name="bob")
    message = result.message
    (record,) = [e for e in entries_of(tmp_path) if e["category"] == "message"]
    hasher = IdHasher(load_or_create_salt(tmp_path / "message-ids.salt"))
    assert record["action"] == "received"
    assert record["target"] == hasher(message.conversation.id)
    details = record["details"]
    assert details["message_id"] == hasher(message.id)
    assert details["sender_ids"] == {k: hasher(v) for k, v in message.sender.platform_ids.items()}
    assert details["parts"] == ["text"] and details["chars"] == len("my salary is 12345")
    assert "text" not in details
    raw = b"".join(p.read_bytes() for p in list_segments(tmp_path))
    assert b"12345" not in raw.replace(b'"chars":18', b"")
    assert message.id.encode() not in raw and message.conversation.id.encode() not in raw
    assert (tmp_path / "message-ids.salt").stat().st_mode & 0o777 == 0o600


@pytest.mark.anyio
async def test_message_content_only_when_configured(tmp_path: Path) -> None:
    config = _config(tmp_path, messages={"enabled": True, "include_content": True})
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=config) as th:
            await th.send("hello there")
    (record,) = [e for e in entries_of(tmp_path) if e["category"] == "message"]
    assert record["details"]["text"] == "hello there"


@pytest.mark.anyio
async def test_metrics_and_strict_fsync(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=_config(tmp_path, fsync="strict")) as th:
            for i in range(5):
                await th.host.audit("admin", "poke", details={"i": i})
            text = th.host.metrics.render().decode()
    assert 'host_audit_records_total{type="entry"}' in text
    assert "host_audit_open 1.0" in text
    fsyncs = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("host_audit_fsyncs_total")))
    assert fsyncs >= 5  # one per record in strict mode
    assert verify_log(tmp_path).ok


@pytest.mark.anyio
async def test_idle_log_gets_a_time_checkpoint_from_the_ticker(tmp_path: Path) -> None:
    config = _config(tmp_path, checkpoint_every_seconds=0.2)
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=config) as th:
            await th.host.audit("admin", "poke")
            # The ticker thread runs on real time: wait (off the virtual clock) until it checkpointed.
            deadline = time.monotonic() + 20
            idle_checkpoint = None
            while idle_checkpoint is None and time.monotonic() < deadline:
                await trio.to_thread.run_sync(time.sleep, 0.05)
                records = all_records(tmp_path)
                idle_checkpoint = next((r for r in records if r.get("reason") == "time"), None)
            assert idle_checkpoint is not None, "no time checkpoint while idle"
            poke = next(r for r in records if r.get("action") == "poke")
            assert idle_checkpoint["seq"] > poke["seq"] and idle_checkpoint["size"] == poke["seq"] + 1


@pytest.mark.anyio
async def test_retention_runs_at_startup(tmp_path: Path) -> None:
    # A log written in 2023 (FakeClock): with 30 days of retention, every closed segment is old.
    generate_log(tmp_path, entries=100, segment_max_records=40)
    old = [p.name for p in list_segments(tmp_path)]
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=_config(tmp_path, retention_days=30)):
            pass
    assert not set(old) & {p.name for p in list_segments(tmp_path)}
    report = verify_log(tmp_path)
    assert report.ok, report.summary()
    assert report.expired is not None


@pytest.mark.anyio
async def test_unusable_key_fails_the_plugin_not_the_host(tmp_path: Path, host_logs: CapturedLogs) -> None:
    generate_log(tmp_path, entries=1)
    (tmp_path / "signing.key").chmod(0o640)
    with trio.fail_after(30):
        async with open_test_host(("audit", plugin), config=_config(tmp_path)) as th:
            assert th.host.plugins.records["audit"].state == "failed"
            assert "chmod 600" in (th.host.plugins.records["audit"].error or "")
            result = await th.send("still serving?")
            assert result.message.request_id
    assert any("chmod 600" in m for m in host_logs.messages("ERROR"))


@pytest.mark.anyio
async def test_log_locked_by_another_writer_is_a_clear_error(tmp_path: Path, host_logs: CapturedLogs) -> None:
    from host_audit.log import AuditLog
    from host_audit.settings import LogSettings

    holder = AuditLog.open(LogSettings.for_directory(tmp_path), clock=FakeClock())
    try:
        with trio.fail_after(30):
            async with open_test_host(("audit", plugin), config=_config(tmp_path)) as th:
                assert th.host.plugins.records["audit"].state == "failed"
    finally:
        holder.close()
    assert any("in use by another process" in m for m in host_logs.messages("ERROR"))
