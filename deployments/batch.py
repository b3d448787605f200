"""Batch reranking from Ray Data jobs: score millions of (query, document) pairs offline.

Two ways to score a ``ray.data.Dataset`` of pairs, both callable classes for ``Dataset.map_batches``:

* ``RerankBatchScorer``: each Ray Data actor loads the model once (``load_reranker``) and scores its
  batches itself, on a GPU fraction when one is asked for (``num_gpus=0.25``) or on CPU;
* ``ServeBatchScorer``: for clusters that already serve the model with ``serve_config.yaml``: each batch is
  sent to the ``Preprocess-<name>`` and ``Scorer-<name>`` deployments through their handles.

Both take a numpy-format batch with a query column and a document column (and, for the VL model, an
optional image column: bytes, a data URL, base64 or a file path) and return every input column plus
``logit`` (float32), ``probability`` (float32, the sigmoid of the logit) and ``error`` (str, empty when the
row was scored). A bad row (no text and no image, an image that does not decode, a pair too long with
``truncate="NONE"``, a query that is not a string) gets NaN scores and a short message in ``error``; the
job goes on. A failure of the model itself (a missing checkpoint, a failing forward pass) fails the job.

``rerank_dataset(ds, model_source)`` wraps ``map_batches`` with defaults; ``top_k_per_query`` keeps the best
documents of every query. The job entry point reads Parquet or JSONL and writes Parquet::

    python -m deployments.batch --input pairs.jsonl --output out/ --model nvidia/llama-nemotron-rerank-1b-v2 \\
        --top-k 10 --num-actors 2 --num-gpus 0.25 --batch-size 256

It writes the scores as ``out/*.parquet`` and, with ``--top-k``, the best K per query as
``out/top_k/*.parquet``; read the scores with the ``out/*.parquet`` pattern, since a reader given the
directory itself recurses into ``top_k/``. Like any Ray job it joins ``RAY_ADDRESS`` when set and starts a
local Ray otherwise; ``--ray-address local`` always starts a fresh local one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from rerank_core.batching import PackPlan
from rerank_core.errors import CheckpointError, RerankError
from rerank_core.reranker import sigmoid, with_torch_threads

log = logging.getLogger("deployments.batch")

SCORE_COLUMNS = ("logit", "probability", "error")
MAX_ERROR_CHARS = 300
# error kinds (rerank_core.errors / deployments.errors) that blame one row, not the model or the service
ROW_ERROR_KINDS = frozenset({"invalid_input", "too_long", "too_large"})
# transient Serve conditions worth a retry
RETRY_KINDS = frozenset({"overloaded", "not_ready"})


# ------------------------------------------------------------------------------------------ row checks
def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _column(batch: dict[str, np.ndarray], name: str | None, n: int) -> list[Any]:
    """A batch column as a Python list (``None`` for every row when the column is absent or not asked)."""
    if name is None or name not in batch:
        return [None] * n
    col = batch[name]
    return col.tolist() if isinstance(col, np.ndarray) else list(col)


def _image_value(x: Any) -> Any:
    """An image cell -> bytes, a str (data URL, base64 or path) or None; anything else is returned as is."""
    if _missing(x):
        return None
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, np.ndarray) and x.dtype == np.uint8:
        return x.tobytes()
    if isinstance(x, (bytes, str)) and not x.strip():
        return None
    return x


def _short(message: str) -> str:
    """One line, no chunk-local document numbers (they mean nothing to a row), at most MAX_ERROR_CHARS."""
    msg = " ".join(str(message).split())
    msg = re.sub(r"^document \d+: ", "", msg)
    msg = re.sub(r" \(document \d+\)", "", msg)
    msg = re.sub(r"documents\[\d+\]\.", "", msg)
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[: MAX_ERROR_CHARS - 3] + "..."


def _row_error(e: RerankError) -> str:
    """``kind: message``, e.g. ``too_long: Input length 9000 exceeds maximum allowed token size 8192``."""
    return _short(f"{e.kind}: {_short(e.message)}")


def _is_row_error(e: BaseException) -> bool:
    return isinstance(e, RerankError) and not isinstance(e, CheckpointError) and e.kind in ROW_ERROR_KINDS


def parse_rows(
    batch: dict[str, np.ndarray], query_column: str, document_column: str, image_column: str | None
) -> tuple[int, list[Any], list[tuple[str | None, Any]], list[str]]:
    """(rows, queries, documents as (text, image), per-row errors: "" when the row can be scored).

    A document cell may be a string or a ``{"text", "image"}`` mapping; the image column, when given and
    set, wins over an image inside the mapping.
    """
    if query_column not in batch:
        raise KeyError(f"the batch has no query column {query_column!r}; it has {sorted(batch)}")
    n = len(batch[query_column])
    if document_column not in batch and (image_column is None or image_column not in batch):
        raise KeyError(f"the batch has no document column {document_column!r}; it has {sorted(batch)}")
    queries = _column(batch, query_column, n)
    cells = _column(batch, document_column, n)
    images = _column(batch, image_column, n)
    docs: list[tuple[str | None, Any]] = []
    errors: list[str] = []
    for q, cell, img in zip(queries, cells, images):
        text: Any = cell
        image = _image_value(img)
        if isinstance(cell, dict):
            text = cell.get("text")
            if image is None:
                image = _image_value(cell.get("image"))
        if _missing(text):
            text = None
        err = ""
        if not isinstance(q, str):
            err = "invalid_input: query must be a string"
        elif text is not None and not isinstance(text, str):
            err = f"invalid_input: document text must be a string, not {type(text).__name__}"
        elif image is None and (text is None or not text.strip()):
            err = "invalid_input: empty document (no text and no image)"
        docs.append((text, image))
        errors.append(err)
    return n, queries, docs, errors


def group_by_query(queries: Sequence[Any], errors: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of the rows to score, grouped by query text, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, (q, err) in enumerate(zip(queries, errors)):
        if not err:
            groups.setdefault(q, []).append(i)
    return groups


def _output(
    batch: dict[str, np.ndarray], logits: np.ndarray, errors: Sequence[str]
) -> dict[str, np.ndarray]:
    out = {k: v for k, v in batch.items() if k not in SCORE_COLUMNS}
    logits = np.asarray(logits, dtype=np.float32)
    out["logit"] = logits
    out["probability"] = sigmoid(logits)
    err = np.empty(len(errors), dtype=object)
    err[:] = list(errors)
    out["error"] = err
    return out


# ------------------------------------------------------------------------------------------ in-process path
class RerankBatchScorer:
    """``Dataset.map_batches`` UDF that loads the reranker once per actor and scores numpy batches.

    Every pair of a Ray Data batch is packed together: rows are grouped by query (each query is encoded
    once per group), then all token rows of the batch go through one ``plan_rows``/``forward_rows``, so
    pairs of different queries share micro-batches of at most ``max_batch_tokens`` padded tokens.

    ``device="auto"`` takes the GPU that Ray gave the actor when torch can see it, else the CPU. On CPU,
    ``torch_threads`` (by default the CPUs Ray gave the actor) are split into forward passes of
    ``threads_per_pass`` threads that run side by side, each on a thread of its own, like a CPU scorer's
    (``ScorerArgs.cpu_threads_per_pass``): a one-thread pass never waits at a barrier for a core another
    process holds; passes hold at most ``cpu_forward_tokens`` (``max_batch_tokens`` is the GPU budget). A
    batch with a single pass, and the VL model's padded batches, get every thread. ``truncate``,
    ``max_length``, ``max_tokens_per_doc``, ``max_chunks`` and ``max_tiles`` (VL) mean what they mean for
    ``Reranker.encode``. ``model_kwargs`` go to ``load_reranker`` (``revision``, ``query_budget``, ...).
    """

    def __init__(
        self,
        model_source: str,
        device: str | None = "auto",
        dtype: str | None = None,
        max_batch_tokens: int = 16384,
        max_length: int | None = None,
        truncate: str = "END",
        query_column: str = "query",
        document_column: str = "document",
        image_column: str | None = None,
        max_tokens_per_doc: int | None = None,
        max_chunks: int | None = None,
        max_tiles: int | None = None,
        max_batch_tiles: int | None = None,
        torch_threads: int | None = None,
        threads_per_pass: int = 1,
        cpu_forward_tokens: int = 2048,
        model_kwargs: dict[str, Any] | None = None,
    ):
        import functools

        import torch

        from rerank_core import load_reranker
        from rerank_core.reranker import resolve_device
        from rerank_core.tokenization import normalize_truncate

        self.truncate = normalize_truncate(truncate)
        self.max_length = max_length
        self.query_column = query_column
        self.document_column = document_column
        self.image_column = image_column
        self.max_tokens_per_doc = max_tokens_per_doc
        self.max_chunks = max_chunks
        t0 = time.monotonic()
        load = functools.partial(
            load_reranker, model_source, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens,
            **(model_kwargs or {}),
        )
        # one single-thread executor per forward thread, so the shares of a batch run side by side for certain (a
        # shared pool may hand the second share to the thread that just finished the first)
        self._pools: list[concurrent.futures.ThreadPoolExecutor] = []
        self._threads = self._pass_threads = self._parallel = 1
        if resolve_device(device).type == "cpu":
            self._threads = int(torch_threads or _assigned_cpus() or torch.get_num_threads())
            self._pass_threads = max(1, min(int(threads_per_pass), self._threads))
            self._parallel = max(1, self._threads // self._pass_threads)
            # the model is loaded on a forward thread too: libgomp gives every thread that runs parallel work
            # a team of its own, and a spare team on the loading thread makes idle workers spin less and sleep
            # and wake more (benchmarks/README.md, stop 18)
            self._pools = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"forward-{k}")
                           for k in range(self._parallel)]
            self.reranker = self._pools[0].submit(with_torch_threads, self._pass_threads, load).result()
            # CPU passes as a CPU scorer's threads run them (cpu_thread_tokens): at 64-512-token pairs 2048-token
            # passes scored 10% more pairs/s than 4096 (benchmarks/batch.py, stop 22; at 24-72-token pairs, stop 19,
            # they were level), and more passes than threads keep the threads evenly loaded
            self.reranker.max_batch_tokens = min(int(max_batch_tokens), int(cpu_forward_tokens))
        else:
            self.reranker = load()
        self.extra: dict[str, Any] = {}
        if self.reranker.kind == "vl":
            if max_tiles is not None:
                self.extra["max_tiles"] = int(max_tiles)
            if max_batch_tiles is not None:
                self.reranker.max_batch_tiles = int(max_batch_tiles)
        log.info(
            "batch scorer: %s model on %s (%s; CPU: %d pass(es) of %d torch thread(s) side by side) ready in %.1f s",
            self.reranker.kind,
            self.reranker.device,
            str(self.reranker.dtype).replace("torch.", ""),
            self._parallel,
            self._pass_threads,
            time.monotonic() - t0,
        )

    def forward(self, rows: list[np.ndarray], tiles: list[Any], plan) -> np.ndarray:
        """Logits of every token row, in order (``plan`` from ``reranker.plan_rows``): on CPU the plan's
        passes dealt to the forward threads."""
        r = self.reranker
        if not self._pools:
            return r.forward_rows(rows, tiles, plan)
        shares = plan.deal(self._parallel) if plan.passes is not None else []
        if len(shares) < 2:  # one pass, or padded batches (VL): one at a time, on every thread
            return self._pools[0].submit(with_torch_threads, self._threads, r.forward_rows, rows, tiles, plan).result()
        futures = [
            pool.submit(with_torch_threads, self._pass_threads, r.forward_rows, [rows[i] for i in idx])
            for pool, idx in zip(self._pools, shares)
        ]
        return PackPlan.merge(len(rows), shares, [f.result() for f in futures])

    def _encode(self, query: str, docs: list[Any]):
        return self.reranker.encode(
            query,
            docs,
            truncate=self.truncate,
            max_length=self.max_length,
            max_tokens_per_doc=self.max_tokens_per_doc,
            max_chunks=self.max_chunks,
            **self.extra,
        )

    @staticmethod
    def _document(text: str | None, image: Any) -> Any:
        return (text or "") if image is None else {"text": text or "", "image": image}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, queries, docs, errors = parse_rows(batch, self.query_column, self.document_column, self.image_column)
        logits = np.full(n, np.nan, dtype=np.float32)
        units = []  # (EncodedPairs, the batch rows of its documents in order)
        for query, idx in group_by_query(queries, errors).items():
            group_docs = [self._document(*docs[i]) for i in idx]
            try:
                units.append((self._encode(query, group_docs), idx))
                continue
            except RerankError as e:
                if not _is_row_error(e):
                    raise
            for i, d in zip(idx, group_docs):  # isolate the bad row(s): encode one by one
                try:
                    units.append((self._encode(query, [d]), [i]))
                except RerankError as e:
                    if not _is_row_error(e):
                        raise
                    errors[i] = _row_error(e)
        if units:
            rows, tiles, spans = [], [], []
            for enc, _ in units:  # a unit's pairs are contiguous in ``rows``
                start = len(rows)
                offsets = enc.offsets
                for p, n_tok in enumerate(enc.lengths.tolist()):
                    rows.append(enc.ids[offsets[p] : offsets[p] + n_tok])
                    tiles.append(None if enc.tiles is None else enc.pair_tiles(p))
                spans.append((start, len(rows)))
            plan = self.reranker.plan_rows(rows, tiles)
            pair_logits = self.forward(rows, tiles, plan)
            for (enc, idx), (a, b) in zip(units, spans):
                logits[idx] = self.reranker.finalize(enc, pair_logits[a:b])
        return _output(batch, logits, errors)


def _assigned_cpus() -> int | None:
    """The CPUs Ray assigned to this actor (rounded, at least 1), or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - outside a worker there is nothing to read
        return None
    return max(1, int(round(cpus))) if cpus else None


# ------------------------------------------------------------------------------------------ Serve path
def _image_for_wire(image: Any) -> str | None:
    """Images cross deployment handles as strings: bytes -> base64; str (data URL, base64) unchanged."""
    if image is None:
        return None
    if isinstance(image, bytes):
        return base64.b64encode(image).decode("ascii")
    return image if isinstance(image, str) else None


class _HandleLoop:
    """An asyncio event loop on a daemon thread, for deployment handle calls from synchronous code.

    Handle calls made from inside this loop work in both of Serve's modes: by default Serve routes on a loop
    of its own, but with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` it routes on the caller's loop and refuses a
    synchronous ``.remote()`` made where no loop runs.
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serve-handle-loop", daemon=True)
        self.thread.start()

    def submit(self, coro):
        """Schedule ``coro`` on the loop: a ``concurrent.futures.Future``; cancelling it cancels ``coro``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class ServeBatchScorer:
    """``Dataset.map_batches`` UDF that scores through a running rerank service's deployment handles.

    Per batch, rows are grouped by query and cut into chunks of at most ``docs_per_request`` documents; each
    chunk is a ``PrepareRequest`` whose response is passed un-awaited to ``Scorer-<model_name>.score``, so the
    tokens go from the preprocess replica to the scorer without coming back here; at most ``max_in_flight``
    chunks per actor are in flight. When a chunk fails with a client error (bad input), its rows are sent
    again one by one so only the bad row gets the error. Overload (the service's bounded queues) is retried
    with backoff; any other failure (a timeout after ``timeout_s``, a dead replica) fails the batch.
    """

    def __init__(
        self,
        app_name: str = "rerank",
        model_name: str = "text",
        truncate: str = "END",
        max_length: int | None = None,
        max_tokens_per_doc: int | None = None,
        max_chunks: int | None = None,
        query_column: str = "query",
        document_column: str = "document",
        image_column: str | None = None,
        docs_per_request: int = 32,
        max_in_flight: int = 32,
        timeout_s: float = 300.0,
        retries: int = 8,
    ):
        from ray import serve

        from rerank_core.tokenization import normalize_truncate

        self._loop = _HandleLoop()
        self.preprocess = serve.get_deployment_handle(f"Preprocess-{model_name}", app_name=app_name)
        self.scorer = serve.get_deployment_handle(f"Scorer-{model_name}", app_name=app_name)
        self.truncate = normalize_truncate(truncate)
        self.max_length = max_length
        self.max_tokens_per_doc = max_tokens_per_doc
        self.max_chunks = max_chunks
        self.query_column = query_column
        self.document_column = document_column
        self.image_column = image_column
        self.docs_per_request = max(1, int(docs_per_request))
        self.max_in_flight = max(1, int(max_in_flight))
        self.timeout_s = timeout_s
        self.retries = retries

    def _request(self, query: str, docs: list[tuple[str | None, Any]]):
        from .messages import PrepareRequest

        req = PrepareRequest(
            query=query,
            documents=[(text or "", _image_for_wire(image)) for text, image in docs],
            truncate=self.truncate,
            max_length=self.max_length,
            max_tokens_per_doc=self.max_tokens_per_doc,
            max_chunks=self.max_chunks,
            request_id="batch",
        )
        return self._loop.submit(self._call(req))

    async def _call(self, req):
        pre = self.preprocess.prepare.remote(req)
        scored = self.scorer.score.remote(pre)
        try:
            return await scored
        except asyncio.CancelledError:  # timed out here: stop the work behind it
            scored.cancel()
            pre.cancel()
            raise

    def _send_all(self, chunks: list[tuple[str, list[int]]], docs) -> list[Any]:
        """Score every chunk, at most ``max_in_flight`` at a time: a ScoredChunk or the (unwrapped)
        exception, per chunk. Chunks refused for overload are sent again after a backoff."""
        from .errors import unwrap

        results: list[Any] = [None] * len(chunks)
        pending = list(range(len(chunks)))
        for attempt in range(self.retries + 1):
            retry: list[int] = []
            window: deque = deque()

            def collect() -> None:
                k, resp = window.popleft()
                try:
                    try:
                        results[k] = resp.result(timeout=self.timeout_s)
                    except concurrent.futures.TimeoutError:
                        resp.cancel()
                        raise TimeoutError(f"a chunk was not scored within {self.timeout_s:g} s") from None
                except Exception as e:  # noqa: BLE001 - classified here
                    inner = _serve_error(e, unwrap)
                    if getattr(inner, "kind", None) in RETRY_KINDS and attempt < self.retries:
                        retry.append(k)
                    else:
                        results[k] = inner

            for k in pending:
                if len(window) >= self.max_in_flight:
                    collect()
                query, idx = chunks[k]
                window.append((k, self._request(query, [docs[i] for i in idx])))
            while window:
                collect()
            if not retry:
                break
            pending = sorted(retry)
            time.sleep(min(10.0, 0.5 * 2**attempt))
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, queries, docs, errors = parse_rows(batch, self.query_column, self.document_column, self.image_column)
        logits = np.full(n, np.nan, dtype=np.float32)
        chunks: list[tuple[str, list[int]]] = []
        for query, idx in group_by_query(queries, errors).items():
            for s in range(0, len(idx), self.docs_per_request):
                chunks.append((query, idx[s : s + self.docs_per_request]))
        singles: list[tuple[str, list[int]]] = []
        for (query, idx), res in zip(chunks, self._send_all(chunks, docs)):
            if isinstance(res, BaseException):
                if not _is_row_error(res):
                    raise res
                if len(idx) == 1:
                    errors[idx[0]] = _row_error(res)
                else:
                    singles.extend((query, [i]) for i in idx)
                continue
            logits[idx] = res.logits
        for (_, idx), res in zip(singles, self._send_all(singles, docs)):
            if isinstance(res, BaseException):
                if not _is_row_error(res):
                    raise res
                errors[idx[0]] = _row_error(res)
            else:
                logits[idx] = res.logits
        return _output(batch, logits, errors)


def _serve_error(e: BaseException, unwrap) -> BaseException:
    """The domain error behind a Serve/Ray wrapper; overload and unavailability become retryable kinds."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from .errors import NotReady, Overloaded

    inner = unwrap(e)
    if isinstance(inner, RerankError):
        return inner
    if isinstance(e, BackPressureError) or isinstance(inner, BackPressureError):
        return Overloaded("the service is at capacity")
    if isinstance(e, DeploymentUnavailableError) or isinstance(inner, DeploymentUnavailableError):
        return NotReady("the deployment is not available")
    return inner if isinstance(inner, Exception) else e


# ------------------------------------------------------------------------------------------ dataset helpers
def _pool(num_actors: int | tuple[int, int]):
    import ray.data

    if isinstance(num_actors, int):
        return ray.data.ActorPoolStrategy(size=num_actors)
    lo, hi = num_actors
    return ray.data.ActorPoolStrategy(min_size=int(lo), max_size=int(hi))


def rerank_dataset(
    ds,
    model_source: str | None = None,
    *,
    num_actors: int | tuple[int, int] = (1, 2),
    num_gpus: float = 0.0,
    num_cpus: float | None = None,
    batch_size: int = 256,
    serve_app: str | None = None,
    serve_model: str = "text",
    **scorer_kwargs: Any,
):
    """Score every row of ``ds`` (query and document columns): the input columns plus ``logit``,
    ``probability`` and ``error``.

    With ``model_source``, an actor pool of ``num_actors`` (a size, or ``(min, max)`` to autoscale) loads the
    model: ``num_gpus`` per actor (a fraction shares a GPU; 0 = CPU), ``num_cpus`` per actor (Ray Data's
    default of 1 when None). With ``serve_app`` instead, the actors call that running Serve application's
    ``Preprocess-<serve_model>``/``Scorer-<serve_model>`` deployments and need no model of their own.
    ``scorer_kwargs`` go to ``RerankBatchScorer`` or ``ServeBatchScorer`` (``truncate``, ``max_length``,
    ``query_column``, ``document_column``, ``image_column``, ...). Nothing runs until the dataset is consumed.
    """
    if (model_source is None) == (serve_app is None):
        raise ValueError("give exactly one of model_source (score in the actors) or serve_app (call Serve)")
    opts: dict[str, Any] = {"compute": _pool(num_actors), "batch_size": int(batch_size), "batch_format": "numpy"}
    if serve_app is not None:
        fn = ServeBatchScorer
        ctor = {"app_name": serve_app, "model_name": serve_model, **scorer_kwargs}
        opts["num_cpus"] = 0.25 if num_cpus is None else num_cpus
    else:
        fn = RerankBatchScorer
        ctor = {"model_source": model_source, **scorer_kwargs}
        if num_gpus:
            opts["num_gpus"] = float(num_gpus)
        if num_cpus is not None:
            opts["num_cpus"] = num_cpus
    return ds.map_batches(fn, fn_constructor_kwargs=ctor, **opts)


class _TopK:
    """Best ``k`` rows per query of a pandas frame: logit descending, ties by ``order`` ascending.

    Sorted with ``np.lexsort`` on plain arrays (stable, deterministic whatever order the rows arrived in),
    not with ``DataFrame.sort_values``, which trips over Arrow-backed string columns in some pandas versions.
    """

    def __init__(self, k: int, key: str, order: list[str], rank_column: str | None):
        self.k, self.key, self.order, self.rank_column = int(k), key, order, rank_column

    def __call__(self, df):
        logit = df["logit"].to_numpy(dtype=np.float64, na_value=np.nan)
        keep = ~np.isnan(logit)
        if "error" in df.columns:
            keep &= np.array([not e for e in df["error"].tolist()], dtype=bool)
        df, logit = df[keep], logit[keep]
        codes: dict[Any, int] = {}
        group = np.array([codes.setdefault(v, len(codes)) for v in df[self.key].tolist()], dtype=np.int64)
        ties = [df[c].to_numpy() for c in reversed(self.order)]
        idx = np.lexsort((*ties, -logit, group))  # last key first: query, then logit desc, then order
        g = group[idx]
        starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1] if len(g) else np.zeros(0, dtype=np.int64)
        rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)])) + 1
        sel = rank <= self.k
        out = df.iloc[idx[sel]].reset_index(drop=True)
        if self.rank_column:
            out[self.rank_column] = rank[sel].astype(np.int64)
        return out


def top_k_per_query(
    data,
    k: int,
    *,
    query_key: str | None = None,
    order_key: str | Sequence[str] | None = None,
    rank_column: str = "rank",
    num_partitions: int | None = 16,
):
    """The ``k`` best scored rows of every query, with ``rank`` 1..k: a pandas DataFrame in, one out; a Ray
    Dataset in, a Dataset out (sorted by query, then rank, within each output block).

    ``query_key``: the column that identifies a query (default ``query_id`` when present, else ``query``).
    Rows are ordered by ``logit`` descending; equal logits keep their original order, given by
    ``order_key`` (default ``position`` when present; for a DataFrame without it, the frame's row order).
    Rows without a score (an ``error``, a NaN logit) are left out.

    A Dataset is first cut to its per-block top ``k`` (exact: a query's best ``k`` are among the best ``k``
    of every block), then grouped by query (a hash shuffle into ``num_partitions`` partitions; None: Ray
    Data's default of 200, which costs a task each) and cut again, so the shuffle moves little.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - ray[data] brings pandas
        raise ImportError("top_k_per_query needs pandas (pip install 'ray[data]')") from e
    columns = list(data.columns) if isinstance(data, pd.DataFrame) else list(data.columns())
    key = query_key or ("query_id" if "query_id" in columns else "query")
    if key not in columns or "logit" not in columns:
        raise KeyError(f"need a {key!r} column and a 'logit' column; have {columns}")
    if order_key is None:
        order = ["position"] if "position" in columns else []
    else:
        order = [order_key] if isinstance(order_key, str) else list(order_key)
    if isinstance(data, pd.DataFrame):
        df = data
        if not order:
            df = data.assign(_order=np.arange(len(data)))
            out = _TopK(k, key, ["_order"], rank_column)(df)
            return out.drop(columns="_order")
        return _TopK(k, key, order, rank_column)(df)
    if not order:
        raise ValueError(
            "a Dataset has no row order to break ties with: give order_key (e.g. a position column)"
        )
    partial_top, final_top = _TopK(k, key, order, None), _TopK(k, key, order, rank_column)

    def block_top_k(df):
        return partial_top(df)

    def query_top_k(df):
        return final_top(df)

    pre = data.map_batches(block_top_k, batch_format="pandas", batch_size=None)
    return pre.groupby(key, num_partitions=num_partitions).map_groups(query_top_k, batch_format="pandas")


# ------------------------------------------------------------------------------------------ job input
INPUT_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")  # JSONL only; pyarrow picks the codec from the suffix
# what the reader hands the scorer: every id is a string, images are strings (base64 for binary input)
PAIR_COLUMNS = ("query_id", "query", "doc_id", "position", "document", "image")


def _kind(path: str) -> str | None:
    """``parquet``, ``jsonl`` or None, from the file name."""
    name = path.lower()
    compressed = name.endswith(COMPRESSED)
    if compressed:
        name = os.path.splitext(name)[0]
    kind = INPUT_EXTENSIONS.get(os.path.splitext(name)[1])
    return None if compressed and kind != "jsonl" else kind


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it): ``s3://``, ``gs://``, ``hdfs://``... URIs or local paths."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _same_place(original: str, inner: str) -> str:
    """A path inside the filesystem of ``original`` spelled so ``_filesystem`` finds it again."""
    if "://" in original:
        return f"{original.split('://', 1)[0]}://{inner}"
    return inner


def input_files(path: str) -> list[str]:
    """A Parquet or JSONL file, or a directory of them (recursively, sorted; names starting with ``.`` or
    ``_`` are skipped). Local paths, or URIs of any filesystem pyarrow knows (``s3://bucket/prefix``)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        found = []
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            rel = f.path[len(root) :].strip("/")
            if f.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
                continue
            if _kind(f.path):
                found.append(f.path)
        if not found:
            raise FileNotFoundError(f"{path}: no .parquet or .jsonl files in this directory")
        return [_same_place(path, f) for f in sorted(found)]
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not _kind(root):
        raise ValueError(f"{path}: unknown input format; use .parquet or .jsonl")
    return [_same_place(path, root)]


def count_records(path: str) -> int:
    """Rows of a Parquet file (from its footer), lines of a JSONL file: what row numbers run over."""
    fs, inner = _filesystem(path)
    if _kind(path) == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(inner) as f:
            return pq.ParquetFile(f).metadata.num_rows
    lines, last = 0, b"\n"
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _records(path: str) -> Iterator[tuple[int, dict]]:
    """(row number in the file, record) of a Parquet or JSONL file, streamed."""
    import io

    fs, inner = _filesystem(path)
    if _kind(path) == "parquet":
        import pyarrow.parquet as pq

        row = 0
        with fs.open_input_file(inner) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for rec in rb.to_pylist():
                    yield row, rec
                    row += 1
        return
    with fs.open_input_stream(inner) as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no + 1}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{line_no + 1}: each line must be a JSON object")
            yield line_no, rec


def _id(x: Any) -> str | None:
    return None if _missing(x) else str(x)


def _split_document(d: Any, where: str) -> tuple[str | None, str | None]:
    """A candidate -> (text, image as str): strings, {"text", "image"} objects or null."""
    if _missing(d):
        return None, None
    if isinstance(d, str):
        return d, None
    if isinstance(d, dict):
        text, image = d.get("text"), _image_value(d.get("image"))
        if not _missing(text) and not isinstance(text, str):
            raise ValueError(f"{where}: a document's 'text' must be a string")
        if isinstance(image, bytes):
            image = base64.b64encode(image).decode("ascii")
        elif image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: a document's 'image' must be bytes or a string (data URL, base64, path)")
        return (None if _missing(text) else text), image
    raise ValueError(f"{where}: a document must be a string or an object with 'text' and/or 'image'")


def explode_records(records: Iterable[tuple[int, dict]], first_row: int, where: str) -> Iterator[dict]:
    """Records of either input shape -> pair rows with ``PAIR_COLUMNS``.

    * one row per pair: ``query``, ``document`` (a string or a {text, image} object) [, ``image``], optional
      ``query_id`` (default: the query text) and ``doc_id`` (default: the row number); ``position`` is the
      row number in the input (files in sorted order, counted from 0);
    * one row per query: ``query``, ``documents`` (strings or {text, image} objects), optional ``query_id``
      (default: the row number) and ``doc_ids`` (default: the candidate's position); ``position`` is the
      candidate's index in ``documents``.
    """
    for row, rec in records:
        at = f"{where}:{row + 1}"
        number = first_row + row
        query = rec.get("query")
        if not isinstance(query, str):
            query = None  # reported per pair by the scorer: "query must be a string"
        if "documents" in rec:
            docs = rec["documents"]
            if _missing(docs):
                docs = []
            if isinstance(docs, np.ndarray):
                docs = docs.tolist()
            if not isinstance(docs, (list, tuple)):
                raise ValueError(f"{at}: 'documents' must be a list")
            ids = rec.get("doc_ids")
            ids = None if _missing(ids) else list(ids)
            if ids is not None and len(ids) != len(docs):
                raise ValueError(f"{at}: 'doc_ids' has {len(ids)} entries for {len(docs)} documents")
            qid = _id(rec.get("query_id"))
            qid = str(number) if qid is None else qid
            for pos, d in enumerate(docs):
                text, image = _split_document(d, f"{at} documents[{pos}]")
                did = None if ids is None else _id(ids[pos])
                yield {
                    "query_id": qid,
                    "query": query,
                    "doc_id": str(pos) if did is None else did,
                    "position": pos,
                    "document": text,
                    "image": image,
                }
        elif "document" in rec or "image" in rec:
            text, image = _split_document(rec.get("document"), at)
            if rec.get("image") is not None:
                _, image = _split_document({"image": rec["image"]}, at)
            qid = _id(rec.get("query_id"))
            did = _id(rec.get("doc_id"))
            yield {
                "query_id": query if qid is None else qid,
                "query": query,
                "doc_id": str(number) if did is None else did,
                "position": number,
                "document": text,
                "image": image,
            }
        else:
            raise ValueError(f"{at}: a row needs 'document' (one pair per row) or 'documents' (candidates)")


def _pair_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("query", pa.string()),
            ("doc_id", pa.string()),
            ("position", pa.int64()),
            ("document", pa.string()),
            ("image", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def _read_files(batch: dict[str, np.ndarray], rows_per_block: int = 2048):
    """map_batches generator: the files named in the batch -> pair rows, ``rows_per_block`` at a time."""
    for path, first in zip(batch["path"].tolist(), batch["first_row"].tolist()):
        buf: list[dict] = []
        for pair in explode_records(_records(path), int(first), path):
            buf.append(pair)
            if len(buf) >= rows_per_block:
                yield _pair_table(buf)
                buf = []
        if buf:
            yield _pair_table(buf)


def read_pairs(path: str):
    """A Dataset of pair rows (``PAIR_COLUMNS``) from a Parquet/JSONL file or a directory of them.

    Files are read in parallel (one task each, streamed); row numbers are counted across files in sorted
    path order, so ``position`` of one-pair-per-row input is the pair's global input row. On a cluster of
    several nodes, give a path every node can read (shared storage, or a URI such as ``s3://...``).
    """
    import ray.data

    files = input_files(path)
    items, first = [], 0
    for f in files:
        items.append({"path": f, "first_row": first})
        first += count_records(f)
    src = ray.data.from_items(items, override_num_blocks=len(items))
    return src.map_batches(_read_files, batch_size=1, batch_format="numpy")


# ------------------------------------------------------------------------------------------ job entry point
def _count_errors(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    err = batch["error"]
    bad = sum(1 for e in err.tolist() if e)
    return {"rows": np.array([len(err)], dtype=np.int64), "errors": np.array([bad], dtype=np.int64)}


def _prepare_output(out: str, overwrite: bool) -> None:
    """A local output directory must be empty (``--overwrite``: its Parquet output is removed first)."""
    if "://" in out:  # remote storage: Ray Data writes new files next to whatever is there
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its Parquet output")
        for root in (out, os.path.join(out, "top_k")):
            if os.path.isdir(root):
                for f in os.listdir(root):
                    if f.endswith(".parquet"):
                        os.remove(os.path.join(root, f))
        shutil.rmtree(os.path.join(out, "top_k"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)


def init_ray(address: str | None) -> None:
    """``None``: what any Ray job does (join ``RAY_ADDRESS`` if set, else start a local instance);
    ``"local"``: always a fresh local instance; anything else: that cluster (``auto``, ``ray://...``)."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        ray.init()
    else:
        ray.init(address=address)


def run_job(args: argparse.Namespace) -> dict:
    import ray
    import ray.data

    _prepare_output(args.output, args.overwrite)
    init_ray(args.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not args.no_progress
    ctx.enable_operator_progress_bars = not args.no_progress
    serve_mode = args.serve_app is not None
    if not serve_mode and args.num_gpus and ray.cluster_resources().get("GPU", 0) <= 0:
        log.warning(
            "--num-gpus %g was given but the Ray cluster has no GPU now: the actors wait until GPU nodes join "
            "(an autoscaling cluster); on a machine without GPUs, leave --num-gpus out", args.num_gpus
        )
    t0 = time.monotonic()
    pairs = read_pairs(args.input)
    kwargs: dict[str, Any] = {
        "truncate": args.truncate,
        "max_length": args.max_length,
        "image_column": "image",
    }
    if serve_mode:
        scored = rerank_dataset(
            pairs,
            serve_app=args.serve_app,
            serve_model=args.serve_model,
            num_actors=args.num_actors,
            batch_size=args.batch_size,
            **kwargs,
        )
    else:
        kwargs.update(device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens)
        if args.torch_threads:
            kwargs["torch_threads"] = args.torch_threads
        scored = rerank_dataset(
            pairs,
            args.model,
            num_actors=args.num_actors,
            num_gpus=args.num_gpus,
            num_cpus=args.num_cpus,
            batch_size=args.batch_size,
            **kwargs,
        )
    scored.drop_columns(["image"]).write_parquet(args.output)
    scoring_s = time.monotonic() - t0
    written = ray.data.read_parquet(args.output, file_extensions=["parquet"])
    counts = written.select_columns(["error"]).map_batches(_count_errors, batch_format="numpy", batch_size=None)
    parts = counts.take_all()  # one small row per block
    rows = sum(int(p["rows"]) for p in parts)
    errors = sum(int(p["errors"]) for p in parts)
    summary = {
        "input": args.input,
        "output": args.output,
        "rows": rows,
        "errors": errors,
        "seconds": round(scoring_s, 3),
        "pairs_per_s": round(rows / scoring_s, 1) if scoring_s > 0 else None,
    }
    if args.top_k:
        cols = ["query_id", "rank", "doc_id", "position", "logit", "probability"]
        best = top_k_per_query(
            written.select_columns(["query_id", "doc_id", "position", "logit", "probability", "error"]), args.top_k
        ).select_columns(cols)
        top_dir = args.output.rstrip("/") + "/top_k"
        best.write_parquet(top_dir)
        summary["top_k"] = args.top_k
        summary["top_k_output"] = top_dir
    summary["total_seconds"] = round(time.monotonic() - t0, 3)
    log.info(
        "scored %d pairs (%d errors) in %.1f s: %.1f pairs/s; output in %s",
        rows, errors, scoring_s, summary["pairs_per_s"] or 0.0, args.output,
    )
    return summary


def _num_actors(text: str) -> int | tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN,MAX`` / ``MIN-MAX`` (autoscaling)."""
    parts = re.split(r"[,\-:]", text.strip())
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(values) == 1 and values[0] >= 1:
        return values[0]
    if len(values) == 2 and 1 <= values[0] <= values[1]:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m deployments.batch",
        description="Rerank (query, document) pairs from Parquet/JSONL with Ray Data; write scores as Parquet.",
    )
    ap.add_argument("--input", required=True, help="a .parquet or .jsonl file, or a directory of them")
    ap.add_argument("--output", required=True, help="output directory for the scored Parquet files")
    ap.add_argument("--model", help="checkpoint directory or hub id (not needed with --serve-app)")
    ap.add_argument("--top-k", type=int, default=0, help="also write OUTPUT/top_k/ with the best K per query")
    ap.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--num-actors", type=_num_actors, default=(1, 2), help="N, or MIN,MAX (default 1,2)")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor, fractions allowed (default 0)")
    ap.add_argument("--num-cpus", type=float, default=None, help="CPUs per actor (default: Ray Data's 1)")
    ap.add_argument("--batch-size", type=int, default=256, help="rows per Ray Data batch (default 256)")
    ap.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    ap.add_argument("--max-length", type=int, default=None, help="pair length limit (default: the model's)")
    ap.add_argument("--truncate", default="END", choices=["END", "NONE", "CHUNK"], type=str.upper)
    ap.add_argument("--torch-threads", type=int, default=None, help="CPU threads per actor (CPU scoring)")
    ap.add_argument("--serve-app", default=None, help="score through this running Serve application instead")
    ap.add_argument("--serve-model", default="text", help="the model's deployment name there (default text)")
    ap.add_argument(
        "--ray-address",
        default=None,
        help="Ray to use: default like any Ray job (RAY_ADDRESS if set, else a new local instance); "
        "'local' always starts a new local instance; or a cluster address",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace Parquet files already in OUTPUT")
    ap.add_argument("--no-progress", action="store_true", help="turn Ray Data's progress bars off")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.serve_app is None and not args.model:
        build_parser().error("--model is required (or --serve-app to score through a running service)")
    if args.top_k < 0:
        build_parser().error("--top-k must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_job(args)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
