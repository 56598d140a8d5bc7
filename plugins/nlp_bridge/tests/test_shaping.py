"""Peak shaving end to end, with the echo backend made slow (virtual time, no sockets).

Full queue -> immediate busy reply; per-user rate limit; one message at a time per conversation, in
order; the merge policy; the global concurrency limit; the queue timeout.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from conftest import sample
from host_nlp_bridge import bridge_for, plugin
from host_nlp_bridge.config import MessagesConfig

from host import Message
from host.loopback import Delivery
from host.testing import TestHost as RunningHost
from host.testing import open_test_host

PLUGIN = ("nlp_bridge", plugin)
TEXTS = MessagesConfig()


def slow_echo(delay: float = 10.0, chunk_delay: float = 0.0, **section: Any) -> dict[str, Any]:
    return {
        # Waiting happens inside on_message: give it room beyond the 30 s default.
        "host": {"concurrency": 64, "timeouts": {"on_message": 300}},
        "nlp_bridge": {"backends": {"echo": {"type": "echo", "delay": delay, "chunk_delay": chunk_delay}}, **section},
    }


def burst(th: RunningHost, texts: list[str], *, conversation: str | None = None, users: bool = True) -> list[Message]:
    """Offer all ``texts`` at once (same scheduling batch), each created 1 ms after the previous."""
    messages = []
    for i, text in enumerate(texts):
        message = th.loopback.make_message(
            text,
            conversation_id=conversation or f"conv-{i}",
            sender_id=f"user-{i}" if users else "user-0",
        )
        message.created_at_ms = 1_700_000_000_000 + i
        messages.append(message)
    for message in messages:
        assert th.loopback.try_send_message(message)
    return messages


def reply(th: RunningHost, message: Message) -> Delivery:
    [delivery] = th.loopback.replies_to(message.id)
    return delivery


@pytest.mark.anyio
async def test_full_queue_answers_busy_at_once(host_logs: Any) -> None:
    config = slow_echo(limits={"max_concurrency": 1, "queue_size": 2})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            messages = burst(th, [f"q{i}" for i in range(5)])
            await th.host.wait_idle()
            texts = [reply(th, m).text for m in messages]
            assert texts.count(TEXTS.busy) == 2
            answered = [t for t in texts if t.startswith("[echo]")]
            assert len(answered) == 3
            # The busy replies went out before any answer (they did not wait for the slow backend).
            order = [d.text for d in th.loopback.deliveries]
            assert order[:2] == [TEXTS.busy, TEXTS.busy]
            assert sample(th, "nlp_rejected_total", reason="queue_full") == 2
            assert sample(th, "nlp_answers_total", outcome="busy") == 2
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_queue_timeout_answers_busy_instead_of_waiting_forever(host_logs: Any) -> None:
    config = slow_echo(delay=60, limits={"max_concurrency": 1, "queue_timeout": 5})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            first, second = burst(th, ["slow", "behind it"])
            with trio.move_on_after(6):
                await th.host.wait_idle()
            # 5 s in: the second message already has its busy reply, the first is still being answered.
            busy = [d for d in th.loopback.deliveries if d.text == TEXTS.busy]
            assert len(busy) == 1
            await th.host.wait_idle()
            texts = sorted([reply(th, first).text, reply(th, second).text])
            assert texts == sorted([TEXTS.busy, f"[echo] {'slow' if busy[0].in_reply_to == second.id else 'behind it'}"])
            assert sample(th, "nlp_rejected_total", reason="queue_timeout") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_per_user_rate_limit(host_logs: Any) -> None:
    config = slow_echo(delay=0, limits={"user_rate_per_minute": 6, "user_burst": 2})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            assert (await th.send("1", sender_id="ann")).texts == ["[echo] 1"]
            assert (await th.send("2", sender_id="ann")).texts == ["[echo] 2"]
            limited = await th.send("3", sender_id="ann")
            assert limited.texts == [TEXTS.rate_limited.format(seconds=10)]
            # Someone else is not affected.
            assert (await th.send("hi", sender_id="bob")).texts == ["[echo] hi"]
            await trio.sleep(10)
            assert (await th.send("4", sender_id="ann")).texts == ["[echo] 4"]
            assert sample(th, "nlp_rejected_total", reason="rate_limited") == 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_one_conversation_is_answered_in_order_one_at_a_time(host_logs: Any) -> None:
    config = slow_echo(delay=3, chunk_delay=1, limits={"user_burst": 10})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            opened: list[str] = []
            original = th.loopback.open_stream

            async def open_stream(message: Message) -> Any:
                # No other answer in this conversation may still be streaming when one starts.
                same = [d for d in th.loopback.deliveries if d.conversation_id == message.conversation.id]
                assert all(d.state != "streaming" for d in same), "two answers at once in one conversation"
                opened.append(message.text)
                return await original(message)

            th.loopback.open_stream = open_stream  # type: ignore[method-assign]
            texts = [f"message {i}" for i in range(6)]
            mine = burst(th, texts, conversation="room", users=False)
            other = burst(th, ["elsewhere"], conversation="other-room")
            await th.host.wait_idle()
            assert [m for m in opened if m != "elsewhere"] == texts
            for message in mine:
                assert reply(th, message).text == f"[echo] {message.text}"
            assert reply(th, other[0]).state == "finished"
            # The other conversation did not wait for the six: it was answered first.
            assert th.loopback.deliveries[0].conversation_id in ("room", "other-room")
            assert opened.index("elsewhere") <= 1
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_merge_policy_answers_waiting_messages_as_one_turn(host_logs: Any) -> None:
    config = slow_echo(delay=5, limits={"while_busy": "merge", "user_burst": 10})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            [first] = burst(th, ["first question"], conversation="room", users=False)
            await trio.sleep(1)  # the first is being answered now
            later = [th.loopback.make_message(t, conversation_id="room", sender_id="user-0") for t in ("also this", "and that")]
            for i, message in enumerate(later):
                message.created_at_ms = 1_800_000_000_000 + i
                assert th.loopback.try_send_message(message)
            await th.host.wait_idle()
            assert reply(th, first).text == "[echo] first question"
            assert reply(th, later[0]).text == "[echo] also this\nand that"
            assert th.loopback.replies_to(later[1].id) == []  # covered by the combined answer
            assert sample(th, "nlp_answers_total", outcome="merged") == 1
            bridge = bridge_for(th.host)
            assert bridge is not None and bridge.statistics()["waiting"] == 0
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_queue_policy_answers_each_waiting_message(host_logs: Any) -> None:
    config = slow_echo(delay=5, limits={"while_busy": "queue", "user_burst": 10})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            messages = burst(th, ["a", "b", "c"], conversation="room", users=False)
            await th.host.wait_idle()
            assert [reply(th, m).text for m in messages] == ["[echo] a", "[echo] b", "[echo] c"]
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_global_concurrency_limit_holds_under_a_burst(host_logs: Any) -> None:
    config = slow_echo(delay=5, limits={"max_concurrency": 3, "queue_size": 100})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            bridge = bridge_for(th.host)
            assert bridge is not None
            peak_in_flight = peak_waiting = 0
            messages = burst(th, [f"m{i}" for i in range(20)])
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal peak_in_flight, peak_waiting
                    await trio.sleep(1)  # past the arrival instant: three running, the rest queued
                    while True:
                        peak_in_flight = max(peak_in_flight, bridge.admission.in_flight)
                        peak_waiting = max(peak_waiting, int(sample(th, "nlp_queue_depth")))
                        await trio.sleep(0.5)

                nursery.start_soon(watch)
                await th.host.wait_idle()
                nursery.cancel_scope.cancel()
            assert peak_in_flight == 3
            assert peak_waiting == 17
            assert all(reply(th, m).text == f"[echo] {m.text}" for m in messages)
            assert sample(th, "nlp_queue_wait_seconds_count") == 20
            assert sample(th, "nlp_in_flight") == 0
    assert not host_logs.errors()


@pytest.mark.anyio
async def test_a_flooding_conversation_gets_busy_replies_and_others_still_get_in(host_logs: Any) -> None:
    config = slow_echo(delay=5, limits={"max_waiting_per_conversation": 2, "user_burst": 20})
    with trio.fail_after(300):
        async with open_test_host(PLUGIN, config=config) as th:
            flood = burst(th, [f"spam {i}" for i in range(6)], conversation="noisy-group", users=False)
            [calm] = burst(th, ["hello"], conversation="calm-room")
            await th.host.wait_idle()
            texts = [reply(th, m).text for m in flood]
            # Which three get in depends on arrival within the burst; the ones answered keep their order.
            answered = [t for t in texts if t != TEXTS.busy]
            assert len(answered) == 3 and texts.count(TEXTS.busy) == 3
            assert answered == sorted(answered, key=lambda t: int(t.rsplit(" ", 1)[1]))
            assert reply(th, calm).text == "[echo] hello"
            assert sample(th, "nlp_rejected_total", reason="conversation_full") == 3
    assert not host_logs.errors()
