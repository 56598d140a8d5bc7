"""The robot OpenAPI client: msgKey/msgParam mapping, retries, permanent errors, the call budget.

Every call goes to the emulator's real OpenAPIs (which validate msgKey/msgParam like DingTalk) over
127.0.0.1. Real clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.errors import OpenApiError
from host_dingtalk_connector.openapi import (
    GROUP_SEND,
    ApiBudgetSettings,
    classify,
    default_oapi_endpoint,
    robot_message,
)
from host_dingtalk_connector.retry import RetrySettings
from outkit import calls, open_outbound

from host.model import CardButton, Reply

LIMIT = 30
GROUP_API = f"POST {GROUP_SEND}"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def buttons(n: int) -> list[CardButton]:
    return [CardButton(f"b{i}", f"https://example.com/{i}") for i in range(1, n + 1)]


def test_robot_message_mapping() -> None:
    assert robot_message(Reply.text_("hi")) == ("sampleText", {"content": "hi"})
    assert robot_message(Reply.markdown("# Build 42\nok")) == (
        "sampleMarkdown",
        {"title": "Build 42", "text": "# Build 42\nok"},
    )
    assert robot_message(Reply.card("T", "body")) == (
        "sampleMarkdown",
        {"title": "T", "text": "body"},
    )
    key, param = robot_message(Reply.card("T", "body", buttons(1)))
    assert (
        key == "sampleActionCard"
        and param["singleTitle"] == "b1"
        and param["singleURL"].endswith("/1")
    )
    key, param = robot_message(Reply.card("T", "body", buttons(3)))
    assert (
        key == "sampleActionCard3"
        and param["actionTitle3"] == "b3"
        and param["actionURL1"].endswith("/1")
    )
    key, param = robot_message(Reply.card("T", "body", buttons(7)))
    assert key == "sampleActionCard5" and "actionTitle6" not in param
    assert (
        "[b6](https://example.com/6)" in param["text"]
        and "[b7](https://example.com/7)" in param["text"]
    )


def test_error_classification_and_oapi_endpoint() -> None:
    assert classify(400, "InvalidAuthentication") == "auth"
    assert classify(403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi") == "qps"
    assert classify(None, None) == "transient"
    assert classify(503, None) == "transient"
    assert classify(400, "system.busy") == "transient"
    assert classify(400, "invalidParameter.userIds.empty") == "permanent"
    assert classify(403, "Forbidden.AccessDenied.AccessTokenPermissionDenied") == "permanent"
    assert default_oapi_endpoint("https://api.dingtalk.com") == "https://oapi.dingtalk.com"
    assert default_oapi_endpoint("http://127.0.0.1:8780/") == "http://127.0.0.1:8780"


@pytest.mark.anyio
async def test_every_reply_kind_is_accepted_in_groups_and_1to1_chats() -> None:
    replies = [
        Reply.text_("plain"),
        Reply.markdown("**bold**", title="Title"),
        Reply.card("One", "one button", buttons(1)),
        Reply.card("Three", "three buttons", buttons(3)),
        Reply.card("Seven", "seven buttons", buttons(7)),
    ]
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            client = outbound.clients["default"]
            group = emu.state.default_group.id
            chat = emu.state.single_chat(emu.state.users["user0001"]).id
            for reply in replies:
                key, param = robot_message(reply)
                assert await client.send_to_group(group, key, param, what="test")
                assert await client.send_to_user("user0001", key, param, what="test")
            in_group = emu.bot_messages(group)
            in_chat = emu.bot_messages(chat)
            expected = [
                "sampleText",
                "sampleMarkdown",
                "sampleActionCard",
                "sampleActionCard3",
                "sampleActionCard5",
            ]
            assert [m["msgtype"] for m in in_group] == expected
            assert [m["msgtype"] for m in in_chat] == expected
            assert {m["via"] for m in in_group} == {"groupMessages"} and {
                m["via"] for m in in_chat
            } == {"oToMessages"}
            body = in_group[1]["body"]
            assert body["robotCode"] == emu.settings.effective_robot_code
            assert json.loads(body["msgParam"]) == {"title": "Title", "text": "**bold**"}


@pytest.mark.anyio
async def test_permanent_errors_are_raised_at_once_with_dingtalk_request_id() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            client = outbound.clients["default"]
            with pytest.raises(OpenApiError) as caught:
                await client.send_to_group(
                    "cidNOSUCHGROUP",
                    "sampleText",
                    {"content": "x"},
                    what="message to cidNOSUCHGROUP",
                )
            error = caught.value
            assert (
                error.status == 400
                and error.code == "invalid.openConversationId"
                and not error.transient
            )
            assert error.request_id and f"DingTalk request id {error.request_id}" in str(error)
            assert "message to cidNOSUCHGROUP" in str(error)
            assert len(calls(emu, GROUP_API)) == 1  # not retried
            with pytest.raises(OpenApiError) as caught:
                await client.send_to_user(
                    "nobody-here", "sampleText", {"content": "x"}, what="test"
                )
            assert caught.value.code == "invalidStaffId"


@pytest.mark.anyio
async def test_qps_rejections_are_retried_and_slow_the_budget_down() -> None:
    with trio.fail_after(LIMIT):
        async with open_emulator() as emu, open_outbound(emu) as outbound:
            client = outbound.clients["default"]
            bucket = client.budget(GROUP_API)
            emu.faults.qps_errors(2, api=GROUP_API)
            await client.send_to_group(
                emu.state.default_group.id, "sampleText", {"content": "hi"}, what="test"
            )
            assert [c["code"] for c in calls(emu, GROUP_API)] == [
                "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                "",
            ]
            assert bucket.rejections == 2
            assert bucket.rate == pytest.approx(12.0 / 4)


@pytest.mark.anyio
async def test_a_burst_of_sends_stays_within_dingtalks_qps_limit() -> None:
    """30 sends at once with no retries allowed: the budget alone keeps DingTalk from refusing any."""
    budget = ApiBudgetSettings(calls_per_second=12.0, burst=4.0)
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, budget=budget, retry=RetrySettings(attempts=1)) as outbound,
        ):
            client = outbound.clients["default"]
            group = emu.state.default_group.id

            async def send(i: int) -> None:
                await client.send_to_group(group, "sampleText", {"content": f"m{i}"}, what="test")

            async with trio.open_nursery() as nursery:
                for i in range(30):
                    nursery.start_soon(send, i)
            codes = [c["code"] for c in calls(emu, GROUP_API)]
            assert codes == [""] * 30
            assert len(emu.bot_messages(group)) == 30
