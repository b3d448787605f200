"""The scorer's strict-FIFO batch queue (asyncio only, no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.fifo_batch import FifoBatchQueue


def test_batches_fill_in_arrival_order_under_the_budget():
    seen: list[list[int]] = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.01)
        return [i * 10 for i in items]

    async def main():
        q = FifoBatchQueue(run, max_size=10, wait_s=0.05)
        sizes = [4, 4, 4, 4, 4, 9, 1, 1]
        results = await asyncio.gather(*(q.submit(i, s) for i, s in enumerate(sizes)))
        return results

    results = asyncio.run(main())
    assert results == [i * 10 for i in range(8)]
    flat = [i for b in seen for i in b]
    assert flat == sorted(flat), f"not FIFO: {seen}"
    # 4 + 4 (a third 4 would overflow and starts the next batch); 4 then 9 overflows; 9 + 1 fits
    assert seen == [[0, 1], [2, 3], [4], [5, 6], [7]]


def test_oversized_item_runs_alone_and_errors_reach_every_caller():
    async def run(items):
        if -1 in items:
            raise ValueError("boom")
        return items

    async def main():
        q = FifoBatchQueue(run, max_size=4, wait_s=0.0)
        big = await q.submit(7, 100)  # over the budget: alone, not refused
        with pytest.raises(ValueError):
            await asyncio.gather(q.submit(-1, 1), q.submit(2, 1))
        after = await q.submit(3, 1)  # the queue keeps serving
        return big, after

    assert asyncio.run(main()) == (7, 3)


def test_cancelled_callers_are_skipped():
    ran: list[int] = []

    async def run(items):
        ran.extend(items)
        await asyncio.sleep(0.05)
        return items

    async def main():
        q = FifoBatchQueue(run, max_size=1, wait_s=0.0)
        first = asyncio.create_task(q.submit(1, 1))
        await asyncio.sleep(0.01)
        doomed = asyncio.create_task(q.submit(2, 1))
        await asyncio.sleep(0)
        doomed.cancel()
        third = await q.submit(3, 1)
        return await first, third

    assert asyncio.run(main()) == (1, 3)
    assert 2 not in ran


def test_max_concurrent_batches():
    active = 0
    peak = 0

    async def run(items):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return items

    async def main():
        q = FifoBatchQueue(run, max_size=1, wait_s=0.0, max_concurrent=2)
        await asyncio.gather(*(q.submit(i, 1) for i in range(6)))

    asyncio.run(main())
    assert peak == 2


def test_idle_queue_starts_at_once_busy_queue_waits_for_company():
    starts: list[float] = []

    async def run(items):
        starts.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.05)
        return items

    async def main():
        q = FifoBatchQueue(run, max_size=10, wait_s=0.5)
        t0 = asyncio.get_running_loop().time()
        assert await q.submit(1, 1) == 1  # idle: no 0.5 s wait
        idle_latency = asyncio.get_running_loop().time() - t0
        # while a batch runs, a new arrival waits (up to wait_s) for company: the second one joins it
        first = asyncio.ensure_future(q.submit(2, 1))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(q.submit(3, 1))
        await asyncio.sleep(0.06)  # batch [2] done; [3] now waits for company
        third = asyncio.ensure_future(q.submit(4, 1))
        return idle_latency, await asyncio.gather(first, second, third)

    idle_latency, results = asyncio.run(main())
    assert idle_latency < 0.3, idle_latency
    assert results == [2, 3, 4]
    assert len(starts) == 3  # [1], [2], [3, 4]
