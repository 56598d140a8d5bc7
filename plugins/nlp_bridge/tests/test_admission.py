"""Unit tests: the admission gates (bounded queue, lanes, merge, call slots)."""

from __future__ import annotations

import pytest
import trio
from host_nlp_bridge.admission import Admission


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
    assert tickets[3] is None  # 1 can start + 2 may wait
    assert admission.waiting == 3
    for ticket in tickets[:3]:
        assert ticket is not None
        ticket.release()
        ticket.release()  # idempotent
    assert admission.waiting == 0 and admission.lanes == 0


@pytest.mark.anyio
async def test_lane_order_follows_creation_time_not_arrival() -> None:
    admission, _ = make()
    order: list[str] = []
    late = admission.admit("c", created_at_ms=200, payload="second")
    early = admission.admit("c", created_at_ms=100, payload="first")
    assert late is not None and early is not None

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
    assert first is not None and second is not None
    assert await first.wait_turn(trio.current_time() + 1) == "go"
    assert await second.wait_turn(trio.current_time() + 3) == "timeout"
    second.release()
    third = admission.admit("c", 3)
    assert third is not None
    first.leave_queue()
    first.release()
    assert await third.wait_turn(trio.current_time() + 1) == "go"
    third.release()
    assert len(waits) == 3 and waits[1] == pytest.approx(3)


@pytest.mark.anyio
async def test_merge_absorbs_every_waiting_message() -> None:
    admission, _ = make(merge=True)
    active = admission.admit("c", 1, "a")
    assert active is not None
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
    assert head is not None
    assert [t.payload for t in head.merged] == ["c", "d"]
    assert admission.waiting == 1  # only the head is still counted as queued
    for ticket in waiting:
        assert ticket is not None
        ticket.release()
    assert admission.waiting == 0 and admission.lanes == 0


@pytest.mark.anyio
async def test_call_slots_limit_concurrency_and_time_out() -> None:
    admission, _ = make(max_concurrency=1)
    a = admission.admit("a", 0)
    b = admission.admit("b", 0)
    assert a is not None and b is not None
    assert await a.acquire_slot(trio.current_time() + 1)
    assert admission.in_flight == 1
    assert not await b.acquire_slot(trio.current_time() + 2)
    a.release()
    assert admission.in_flight == 0
    assert await b.acquire_slot(trio.current_time() + 1)
    b.release()
    assert admission.in_flight == 0
