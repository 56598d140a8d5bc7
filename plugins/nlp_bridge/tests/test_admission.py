"""Unit tests: the admission gates (bounded queue, lanes, merge, call slots)."""

from __future__ import annotations

import pytest
import trio
from host_nlp_bridge.admission import Admission, Ticket


def make(queue_size: int = 10, max_concurrency: int = 2, merge: bool = False) -> tuple[Admission, list[float]]:
    waits: list[float] = []
    admission = Admission(
        queue_size=queue_size, max_concurrency=max_concurrency, merge=merge, clock=trio.current_time, on_dequeue=waits.append
    )
    return admission, waits


@pytest.mark.anyio
async def test_queue_bound_counts_only_messages_that_cannot_start() -> None:
    admission, _ = make(queue_size=2, max_concurrency=1)
    tickets = [admission.admit(f"c{i}", 0) for i in range(4)]
    assert tickets[3] == "queue_full"  # 1 can start + 2 may wait
    assert admission.waiting == 3
    for ticket in tickets[:3]:
        assert isinstance(ticket, Ticket)
        ticket.release()
        ticket.release()  # idempotent
    assert admission.waiting == 0 and admission.lanes == 0


@pytest.mark.anyio
async def test_lane_order_follows_creation_time_not_arrival() -> None:
    admission, _ = make()
    order: list[str] = []
    late = admission.admit("c", created_at_ms=200, payload="second")
    early = admission.admit("c", created_at_ms=100, payload="first")
    assert isinstance(late, Ticket) and isinstance(early, Ticket)

    async def run(ticket: object, hold: float) -> None:
        assert await ticket.wait_turn(trio.current_time() + 100) == "go"  # type: ignore[attr-defined]
        order.append(ticket.payload)  # type: ignore[attr-defined]
        await trio.sleep(hold)
        ticket.release()  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, late, 0)
        nursery.start_soon(run, early, 5)
    assert order == ["first", "second"]
    assert admission.lanes == 0


@pytest.mark.anyio
async def test_wait_turn_times_out_and_release_unblocks_the_next() -> None:
    admission, waits = make()
    first = admission.admit("c", 1)
    second = admission.admit("c", 2)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert await first.wait_turn(trio.current_time() + 1) == "go"
    assert await second.wait_turn(trio.current_time() + 3) == "timeout"
    second.release()
    third = admission.admit("c", 3)
    assert isinstance(third, Ticket)
    first.leave_queue()
    first.release()
    assert await third.wait_turn(trio.current_time() + 1) == "go"
    third.release()
    assert len(waits) == 3 and waits[1] == pytest.approx(3)


@pytest.mark.anyio
async def test_merge_absorbs_every_waiting_message() -> None:
    admission, _ = make(merge=True)
    active = admission.admit("c", 1, "a")
    assert isinstance(active, Ticket)
    assert await active.wait_turn(trio.current_time() + 1) == "go"
    waiting = [admission.admit("c", i, p) for i, p in ((2, "b"), (3, "c"), (4, "d"))]
    results: dict[str, str] = {}

    async def wait(ticket: object) -> None:
        results[ticket.payload] = await ticket.wait_turn(trio.current_time() + 100)  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        for ticket in waiting:
            nursery.start_soon(wait, ticket)
        await trio.sleep(1)
        active.release()
    assert results == {"b": "go", "c": "merged", "d": "merged"}
    head = waiting[0]
    assert isinstance(head, Ticket)
    assert [t.payload for t in head.merged] == ["c", "d"]
    assert admission.waiting == 1  # only the head is still counted as queued
    for ticket in waiting:
        assert isinstance(ticket, Ticket)
        ticket.release()
    assert admission.waiting == 0 and admission.lanes == 0


@pytest.mark.anyio
async def test_call_slots_limit_concurrency_and_time_out() -> None:
    admission, _ = make(max_concurrency=1)
    a = admission.admit("a", 0)
    b = admission.admit("b", 0)
    assert isinstance(a, Ticket) and isinstance(b, Ticket)
    assert await a.acquire_slot(trio.current_time() + 1)
    assert admission.in_flight == 1
    assert not await b.acquire_slot(trio.current_time() + 2)
    a.release()
    assert admission.in_flight == 0
    assert await b.acquire_slot(trio.current_time() + 1)
    b.release()
    assert admission.in_flight == 0


@pytest.mark.anyio
async def test_one_conversation_cannot_fill_the_queue_alone() -> None:
    admission = Admission(
        queue_size=100, max_concurrency=4, merge=False, clock=trio.current_time, max_waiting_per_conversation=2
    )
    tickets = [admission.admit("group", i) for i in range(4)]
    # The first starts at once; two may wait behind it; the fourth is refused.
    assert [isinstance(t, Ticket) for t in tickets] == [True, True, True, False]
    assert tickets[3] == "conversation_full"
    assert isinstance(admission.admit("other", 0), Ticket)
    first = tickets[0]
    assert isinstance(first, Ticket)
    assert await first.wait_turn(trio.current_time() + 1) == "go"
    assert admission.admit("group", 9) == "conversation_full"  # one answered, two waiting
