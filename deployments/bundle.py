"""Small scorer calls that reach the ingress in the same event-loop turn travel as one handle call.

Every handle call costs CPU on both replicas whatever it carries (Serve's router, gRPC, the replica's request
bookkeeping): about 0.8 ms of the scorer's CPU per call at one-document requests on the 2-core benchmark
machine, where the pair itself took 4 ms. A ``ScoreBundler`` queues small encoded chunks and flushes them on
the loop's next turn: one chunk goes as ``score``, several as one ``score_many``. A lone request is never
delayed (the flush is the next turn of the loop, not a timer). Each chunk keeps its own future: an error, a
cancelled caller or a lost replica touches only the chunks it concerns (a lost replica fails the bundle's
chunks, and each caller retries its own, as before).

Kept apart from the deployment modules so it is importable by name on the replicas (a Serve deployment class
is shipped by value).
"""

from __future__ import annotations

import asyncio
from typing import Any

from rerank_core.tokenization import EncodedPairs

# Only chunks this small are bundled: a call's ~0.8 ms is then at least 5% of the chunk's forward work (at
# 2 documents of 64-512 tokens, ~620-token chunks, bundles up to 4096 tokens measured 3-5% slower, within the
# noise: an answer waits for the slowest chunk of its bundle). A bundle holds at most this many chunks and
# tokens, so it fits one CPU batch and bundles still spread over replicas.
BUNDLE_CHUNK_TOKENS = 256
BUNDLE_MAX_CHUNKS = 16
BUNDLE_MAX_TOKENS = 1024


class ScoreBundler:
    def __init__(self, scorer: Any):
        self.scorer = scorer
        self._pending: list[tuple[EncodedPairs, str, asyncio.Future]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # handle calls made, and chunks they carried (for stats and tests)
        self.chunks = 0

    def bundles(self, enc: EncodedPairs) -> bool:
        return enc.total_tokens <= BUNDLE_CHUNK_TOKENS

    def submit(self, enc: EncodedPairs, key: str = "") -> asyncio.Future:
        """A future for ``enc``'s ScoredChunk; cancelling it drops this chunk's answer, not the others'. Chunks
        with the same non-empty ``key`` (a request id) never share a call, so a request's chunks still spread
        over the scorer replicas."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((enc, key, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        groups: list[list[tuple[EncodedPairs, str, asyncio.Future]]] = []
        for item in pending:
            enc, key, fut = item
            if fut.done():  # the caller gave up before the flush
                continue
            # the first open bundle with room and without this request's chunks, else a new one
            group = next((g for g in groups if len(g) < BUNDLE_MAX_CHUNKS
                          and sum(e.total_tokens for e, _, _ in g) + enc.total_tokens <= BUNDLE_MAX_TOKENS
                          and not (key and any(k == key for _, k, _ in g))), None)
            if group is None:
                group = []
                groups.append(group)
            group.append(item)
        for group in groups:
            self._send(group)

    def _send(self, group: list[tuple[EncodedPairs, str, asyncio.Future]]) -> None:
        self.calls += 1
        self.chunks += len(group)
        if len(group) == 1:
            resp = self.scorer.score.remote(group[0][0])
        else:
            resp = self.scorer.score_many.remote([enc for enc, _, _ in group])
        task = asyncio.get_running_loop().create_task(self._deliver(resp, [fut for _, _, fut in group]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _deliver(resp: Any, futures: list[asyncio.Future]) -> None:
        try:
            result = await resp
        except BaseException as e:  # noqa: BLE001 - the call failed as a whole: every chunk in it hears why
            for fut in futures:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        results = [result] if len(futures) == 1 else result
        if len(results) != len(futures):  # never expected; no caller may wait forever on it
            results = [RuntimeError(f"the scorer answered {len(results)} chunks of {len(futures)}")] * len(futures)
        for fut, res in zip(futures, results):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)
