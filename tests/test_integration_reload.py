"""Hot reload of the real first-party plugins while DingTalk traffic flows (nox integration session).

The whole stack runs for real on 127.0.0.1: the DingTalk emulator, the Stream connector, the NLP
bridge's echo backend and the audit log in a temporary directory. Each plugin is reloaded in the middle
of a stream of user messages; every message must get exactly one reply, and the audit log must record
the reloads and still verify.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

pytest.importorskip("host_dingtalk_connector", reason="needs the DingTalk connector plugin installed")
pytest.importorskip("host_nlp_bridge", reason="needs the NLP bridge plugin installed")
pytest.importorskip("host_audit", reason="needs the audit plugin installed")

from host_audit.verify import verify_log
from host_dingtalk_connector.emulator import open_emulator

from host.config import load_config
from host.runtime import build_host

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "trio"  # real sockets and the audit log's worker thread: real clock, bounded waits


async def test_reloading_every_plugin_under_traffic_loses_no_message(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_emulator(bot_redelivery_delay=3.0) as emu:
            data = {
                "logging": {"dir": ""},
                "http": {"enabled": False},
                "host": {"control_socket": "", "reload": {"watch_entry_points": False}},
                "dingtalk": {
                    "client_id": emu.settings.client_id,
                    "client_secret": emu.settings.client_secret,
                    "openapi_endpoint": emu.base_url,
                },
                "audit": {"dir": str(tmp_path / "audit")},
            }
            host = build_host(load_config(data=data, environ={}), entry_points=True)
            loaded = {r.name for r in host.plugins.loaded()}
            assert {"dingtalk_connector", "nlp_bridge", "audit"} <= loaded
            conversations: list[str] = []
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await emu.wait_for_connection()

                async def users() -> None:
                    for i in range(40):
                        sent = await emu.send_user_message(f"question {i}", sender_staff_id=f"user{i}")
                        conversations.append(sent["conversationId"])
                        await trio.sleep(0.05)

                async with trio.open_nursery() as traffic:
                    traffic.start_soon(users)
                    await trio.sleep(0.3)
                    for plugin in ("dingtalk_connector", "nlp_bridge", "audit"):
                        result = await host.reloader.reload_plugin(plugin, reason="test")
                        assert result.outcome == "reloaded", result
                        await trio.sleep(0.3)
                for conversation in conversations:
                    await emu.wait_for_bot_message(conversation, count=1)
                await trio.sleep(1)  # let any late duplicate show itself
                counts = {c: len(emu.bot_messages(c)) for c in conversations}
                assert len(conversations) == 40
                assert set(counts.values()) == {1}, counts
                host.request_shutdown()
    report = verify_log(tmp_path / "audit")
    assert report.problem is None, report.problem
    text = "".join(p.read_text() for p in sorted((tmp_path / "audit").glob("*.jsonl")))
    for plugin in ("dingtalk_connector", "nlp_bridge", "audit"):
        assert '"reload_reloaded"' in text and f'"{plugin}"' in text
