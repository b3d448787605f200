"""A strict-FIFO batch queue with a size budget, for the scorer.

Why not ``@serve.batch(batch_size_fn=...)``: when the next item does not fit, Serve 2.60 puts it back at
the *tail* of its queue, so under steady load every full batch sends one waiting chunk to the back of
the line; requests split into several chunks then wait for a whole extra queue cycle. Measured on the
CPU benchmark (32 documents per request, concurrency 16): p99 about twice p50. Here the item that
would overflow a batch simply starts the next one, so chunks are served in arrival order; batches
still fill up to the budget, wait at most ``wait_s`` for company (not when the replica was idle: at low
load the first chunk starts at once and later ones gather while it runs), and run ``max_concurrent`` at a
time.
The scorer can still use Serve's queue (``batch_queue: serve``) for comparison.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable, Callable, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class FifoBatchQueue(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[list[R]]],
        max_size: int,
        wait_s: float,
        max_concurrent: int = 1,
    ):
        self.run_batch = run_batch
        self.max_size = max_size
        self.wait_s = wait_s
        self._items: collections.deque[tuple[T, int, asyncio.Future]] = collections.deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._loop_task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._idle_arrival = False  # the next batch's first item found the replica idle

    def __len__(self) -> int:
        return len(self._items)

    async def submit(self, item: T, size: int) -> R:
        """Queue ``item`` (counting ``size`` of the budget; at least 1) and wait for its result."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        if not self._items and not self._running:
            self._idle_arrival = True
        self._items.append((item, max(1, min(size, self.max_size)), fut))
        self._arrived.set()
        return await fut

    def _take(self) -> list[tuple[T, int, asyncio.Future]]:
        batch, used = [], 0
        while self._items:
            item, size, fut = self._items[0]
            if fut.done():  # the caller gave up (cancelled): drop it
                self._items.popleft()
                continue
            if batch and used + size > self.max_size:
                break
            self._items.popleft()
            batch.append((item, size, fut))
            used += size
        return batch

    def _queued_size(self) -> int:
        return sum(size for _, size, fut in self._items if not fut.done())

    async def _loop(self) -> None:
        while True:
            if not self._items:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            idle, self._idle_arrival = self._idle_arrival, False
            # give a young batch a moment to gather company, unless it is already full; a replica that was
            # idle starts at once (low load: nobody else is coming, and what does come queues meanwhile)
            deadline = time.monotonic() + (0.0 if idle else self.wait_s)
            while self._queued_size() < self.max_size and time.monotonic() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[T, int, asyncio.Future]]) -> None:
        try:
            results = await self.run_batch([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError("batch function returned the wrong number of results")
            for (_, _, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
        finally:
            self._slots.release()

    def stats(self) -> dict[str, Any]:
        return {"queued_items": len(self._items), "queued_size": self._queued_size(), "running": len(self._running)}
