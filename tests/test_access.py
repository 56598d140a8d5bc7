"""Access control (host.access): allow/deny lists, conversations, roles, admin-only commands, live reload."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from host import hookimpl, testing
from host.access import AccessPolicy
from host.config import AccessSection, load_config
from host.errors import ConfigError
from host.loopback import LoopbackConnector
from host.model import AuditEntry, Conversation, Message, Sender, TextPart
from host.runtime import build_host
from host.testing import CapturedLogs, SendResult, open_test_host


class Bot:
    """Answers everything, and records what reached it (plugin middleware included)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.middleware_seen: list[str] = []

    @hookimpl
    def register_middleware(self, host: Any, register: Any) -> None:
        async def middleware(message: Message, call_next: Any) -> None:
            self.middleware_seen.append(message.text)
            await call_next(message)

        register(middleware)

    @hookimpl
    def on_message(self, message: Message) -> str:
        self.seen.append(message.text)
        return f"ok: {message.text}"


async def send(
    th: testing.TestHost,
    text: str,
    *,
    user: str | None = "alice",
    group: str | None = None,
    departments: list[str] | None = None,
) -> SendResult:
    message = th.loopback.make_message(text, group=group is not None, conversation_id=group or "dm-1")
    message.sender.identity = user
    message.sender.departments = list(departments or [])
    return await th.send_message(message)


@asynccontextmanager
async def access_host(access: dict[str, Any]) -> AsyncIterator[tuple[testing.TestHost, Bot]]:
    bot = Bot()
    async with open_test_host(("bot", bot), config={"access": access}) as th:
        yield th, bot


def handled(th: testing.TestHost, outcome: str) -> float:
    return th.host.m_handled.labels("loopback", outcome)._value.get()


def denied(th: testing.TestHost, reason: str) -> float:
    return th.host.access._denied.labels(reason)._value.get()


@pytest.mark.anyio
async def test_everyone_is_allowed_by_default() -> None:
    async with access_host({}) as (th, bot):
        assert (await send(th, "hi", user=None)).texts == ["ok: hi"]
        assert (await send(th, "yo", group="g1")).texts == ["ok: yo"]
        assert bot.seen == ["hi", "yo"]
        assert [p for p, _ in th.host.middleware] == ["", "bot"]  # access control is outermost


@pytest.mark.anyio
async def test_deny_lists_win_and_refusals_are_polite_or_silent(host_logs: CapturedLogs) -> None:
    access = {"deny_users": ["mallory"], "deny_departments": ["contractors"], "allow_users": ["mallory", "alice"]}
    async with access_host(access) as (th, bot):
        assert (await send(th, "hi", user="mallory")).texts == ["Sorry, you are not allowed to use this bot here."]
        assert (await send(th, "hi", user="alice", departments=["contractors"])).texts == [
            "Sorry, you are not allowed to use this bot here."
        ]
        # In a group the default is silence: a bot should not lecture a whole group.
        assert (await send(th, "hi", user="mallory", group="g1")).texts == []
        assert (await send(th, "hi", user="alice")).texts == ["ok: hi"]
        assert bot.seen == ["hi"] and bot.middleware_seen == ["hi"]  # refused ones reached no plugin at all
        assert denied(th, "user_denied") == 2 and denied(th, "department_denied") == 1
        assert handled(th, "denied") == 3
    lines = [m for m in host_logs.messages("INFO") if m.startswith("access denied")]
    assert lines[0] == "access denied (user_denied): sender mallory in single conversation dm-1: the sender is in deny_users"
    assert "department_denied" in lines[1] and "sender alice" in lines[1]
    assert "group conversation g1" in lines[2]


@pytest.mark.anyio
async def test_allow_lists_by_identity_and_department() -> None:
    access = {"allow_users": ["alice"], "allow_departments": ["eng"], "refusal": "Nope."}
    async with access_host(access) as (th, bot):
        assert (await send(th, "1", user="alice")).texts == ["ok: 1"]
        assert (await send(th, "2", user="bob", departments=["eng", "ops"])).texts == ["ok: 2"]
        assert (await send(th, "3", user="bob", departments=["sales"])).texts == ["Nope."]
        assert (await send(th, "4", user=None)).texts == ["Nope."]  # unresolved identity matches no list
        assert bot.seen == ["1", "2"]
        assert denied(th, "user_not_allowed") == 2


@pytest.mark.anyio
async def test_conversations_direct_and_groups() -> None:
    access = {"allow_groups": ["g-ok", "g-bad"], "deny_groups": ["g-bad"], "group_refusal": "Not in this group."}
    async with access_host(access) as (th, bot):
        assert (await send(th, "a", group="g-ok")).texts == ["ok: a"]
        assert (await send(th, "b", group="g-bad")).texts == ["Not in this group."]
        assert (await send(th, "c", group="g-other")).texts == ["Not in this group."]
        assert (await send(th, "d")).texts == ["ok: d"]  # 1:1 allowed unless configured otherwise
        assert denied(th, "group_denied") == 1 and denied(th, "group_not_allowed") == 1
        assert bot.seen == ["a", "d"]
    async with access_host({"allow_direct_chats": False, "refusal": ""}) as (th, _bot):
        assert (await send(th, "e")).texts == []  # empty refusal: silent
        assert (await send(th, "f", group="g1")).texts == ["ok: f"]
        assert denied(th, "direct_chats_disabled") == 1
    async with access_host({"allow_group_chats": False}) as (th, _bot):
        assert (await send(th, "g", group="g1")).texts == []
        assert denied(th, "group_chats_disabled") == 1


@pytest.mark.anyio
async def test_admin_only_commands_need_the_admin_role() -> None:
    access = {
        "admin_commands": ["/reload", "/config"],
        "roles": {"admin": {"users": ["root-user"], "departments": ["sre"]}, "viewer": {"users": ["alice"]}},
    }
    async with access_host(access) as (th, _bot):
        refusal = "Sorry, that command is for administrators only."
        assert (await send(th, "/reload all", user="alice")).texts == [refusal]
        assert (await send(th, "  /RELOAD", user="alice", group="g1")).texts == [refusal]  # case, whitespace
        assert (await send(th, "/reload", user=None)).texts == [refusal]
        assert (await send(th, "/reload", user="root-user")).texts == ["ok: /reload"]
        assert (await send(th, "/config", user="bob", departments=["sre"])).texts == ["ok: /config"]
        assert (await send(th, "please /reload", user="alice")).texts == ["ok: please /reload"]  # a prefix only
        assert denied(th, "admin_command") == 3
        policy = th.host.access.policy
        alice = Sender(platform_ids={}, identity="alice")
        assert policy.roles_of(alice) == {"viewer"}
        assert policy.has_role(Sender(platform_ids={}, identity="x", departments=["sre"]), "admin")
        assert not policy.has_role(alice, "nonexistent")


def test_empty_admin_command_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty prefix"):
        load_config(data={"access": {"admin_commands": ["  "]}}, environ={})


def test_decision_order_and_details() -> None:
    policy = AccessPolicy(AccessSection(deny_users=["a"], allow_group_chats=False, admin_commands=["/x"]))

    def message(user: str | None, kind: str = "single", text: str = "hi") -> Message:
        return Message(id="1", platform="t", connector="c", conversation=Conversation(id="c1", type=kind),  # type: ignore[arg-type]
                       sender=Sender(platform_ids={}, identity=user), parts=[TextPart(text=text)])

    # The conversation is checked before the sender: a denied user in a closed group is "group".
    assert policy.check(message("a", "group")).reason == "group_chats_disabled"
    assert policy.check(message("a")).reason == "user_denied"
    assert policy.check(message("b", text="/x")).reason == "admin_command"
    assert policy.check(message("b")).allowed


# -- live reload ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    @hookimpl
    def on_audit(self, entry: AuditEntry) -> None:
        self.entries.append(entry)


def write(path: Path, access: str) -> None:
    path.write_text(f"""
[logging]
dir = ""
[host]
control_socket = ""
[host.reload]
watch_entry_points = false
[http]
enabled = false
[access]
{access}
""")


@pytest.mark.anyio
async def test_access_changes_apply_live_and_are_audited(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    write(path, 'deny_users = ["mallory"]')
    bot, recorder = Bot(), Recorder()
    host = build_host(load_config(path, environ={}), plugins=[("bot", bot), ("recorder", recorder)],
                      entry_points=False)
    loopback = LoopbackConnector()
    host.add_connector(loopback)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            th = testing.TestHost(host, loopback)
            assert (await send(th, "1", user="mallory")).texts != ["ok: 1"]
            assert (await send(th, "2", user="eve")).texts == ["ok: 2"]
            write(path, 'deny_users = ["eve"]\nadmin_commands = ["/reload"]\n[access.roles.admin]\nusers = ["mallory"]')
            await host.reloader.reload_config(reason="test")
            assert (await send(th, "3", user="mallory")).texts == ["ok: 3"]
            assert (await send(th, "4", user="eve")).texts != ["ok: 4"]
            assert (await send(th, "/reload", user="mallory")).texts == ["ok: /reload"]
            # An invalid [access] is refused: the running policy stays.
            write(path, 'deny_users = "not a list"')
            await host.reloader.reload_config(reason="test")
            assert (await send(th, "5", user="eve")).texts != ["ok: 5"]
            host.request_shutdown()
    change = next(e for e in recorder.entries if e.category == "config" and e.action == "change")
    assert change.details["sections"] == ["access"]
    assert change.details["diff"]["access"]["new"]["deny_users"] == ["eve"]
    policy = next(e for e in recorder.entries if e.category == "access" and e.action == "policy_change")
    assert policy.details["changes"] == {
        "deny_users": {"added": ["eve"], "removed": ["mallory"]},
        "admin_commands": {"added": ["/reload"], "removed": []},
        "roles.admin.users": {"added": ["mallory"], "removed": []},
    }
    refused = [e for e in recorder.entries if e.action == "reload_refused"]
    assert refused and "deny_users" in refused[0].details["error"]
