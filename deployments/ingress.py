"""The HTTP ingress: auth, dialect parsing, fan-out of document chunks, gather, sort, top_n, render."""


import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from rerank_core import sigmoid
from rerank_core.errors import InvalidInput, ModelNotFound, PayloadTooLarge, RerankError
from rerank_core.tokenization import check_text

from . import http
from .auth import KeyStore
from .config import AppArgs, ModelArgs
from .errors import (
    NotReady,
    Overloaded,
    Timeout,
    Unauthorized,
    domain_error_response,
    error_response,
    internal_error_response,
    replica_lost,
    unwrap,
)
from .bundle import ScoreBundler
from .messages import PrepareRequest, ScoredChunk
from .metrics import IngressMetrics, PreprocessMetrics
from .prepare import ChunkPreparer
from .protocol import (
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    RankingRequest,
    RankingResponse,
    RerankJob,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    new_id,
    now,
    rerank_job,
    ranking_job,
    score_job,
)

log = logging.getLogger("ray.serve")

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 500, 503, 504)}
LOST_REPLICA_MESSAGE = "a model replica stopped while scoring this request; retry shortly"

app = FastAPI(
    title="Nemotron rerank service",
    version="0.1.0",
    description="Llama Nemotron rerankers behind the Cohere/Jina/vLLM `/v1/rerank`, NVIDIA NIM `/v1/ranking` "
    "and vLLM `/v1/score` APIs.",
)
app.add_middleware(http.AccessLogMiddleware)
app.add_middleware(http.DynamicCORSMiddleware)
app.add_middleware(http.BodyLimitMiddleware)


def _clip(value: Any, limit: int = 200) -> str:
    """repr of a client-supplied value for an error message, at most ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    param = None
    if errors:
        loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
    return error_response(400, "invalid_request_error", "invalid request: " + "; ".join(parts) + more, param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(404, "not_found_error", f"route {request.url.path} not found")
    if exc.status_code == 405:
        return error_response(
            405, "invalid_request_error", f"method {request.method} not allowed here", headers=exc.headers
        )
    if exc.status_code == 413:
        return error_response(413, "request_too_large", str(exc.detail))
    return error_response(exc.status_code, "invalid_request_error", str(exc.detail), headers=exc.headers)


@app.exception_handler(RerankError)
async def _domain_error(request: Request, exc: RerankError) -> JSONResponse:
    return domain_error_response(exc, _request_id(request))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = _request_id(request)
    log.error("unexpected error for request %s: %s", rid, type(exc).__name__, exc_info=exc)
    return internal_error_response(rid)


class Outcome:
    """Per-document logits of one request, and what the service reports about them."""

    def __init__(self, n: int):
        self.logits = np.zeros(n, dtype=np.float32)
        self.tokens = 0
        self.warnings: list[str] = []


async def _await(resp: Any) -> Any:
    return await resp


# Text chunks of at most this many characters (query included) are tokenized on the event loop: a 1-document
# chunk of ~80 tokens took 0.1 ms of CPU inline and 0.24 ms through asyncio.to_thread (the hop costs more than
# the work); this many characters take about 0.5 ms. Bigger chunks go to a worker thread (the tokenizer releases
# the GIL), so the loop keeps serving meanwhile.
INLINE_TOKENIZE_CHARS = 2048


def _chunk_chars(prep: PrepareRequest) -> int:
    return len(prep.query) + sum(len(text or "") for text, _ in prep.documents)


def _score_call(handles: dict, enc: Any, key: str) -> Any:
    """The scorer call for an encoded chunk: small ones through the model's bundler (``deployments.bundle``; ``key``,
    the request id, keeps a request's chunks in different calls), others as a call of their own. Either way an
    awaitable with ``cancel()``."""
    bundler: ScoreBundler | None = handles.get("bundler")
    if bundler is not None and bundler.bundles(enc):
        return bundler.submit(enc, key)
    return handles["scorer"].score.remote(enc)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict, models: dict[str, dict[str, Any]], tokenize_here: tuple[str, ...] = (),
                 bundle_here: tuple[str, ...] = ()):
        self.args = AppArgs.model_validate(args)
        # model id -> {"preprocess": handle, "scorer": handle, for the models in tokenize_here (ids whose
        # text-only chunks this replica tokenizes itself, see ModelArgs.tokenize_in_ingress): "preparer", and for
        # those in bundle_here (ModelArgs.bundle_scorer_calls): "bundler"}
        self.handles = {mid: dict(h) for mid, h in models.items()}
        for mid in bundle_here:
            self.handles[mid]["bundler"] = ScoreBundler(self.handles[mid]["scorer"])
        for m in self.args.models:
            if m.id in tokenize_here:
                t0 = time.monotonic()
                self.handles[m.id]["preparer"] = ChunkPreparer(m, self.args.limits)
                self.handles[m.id]["preparer_metrics"] = PreprocessMetrics(m.id)
                log.info("ingress tokenizes text-only chunks of %s itself (tokenizer loaded in %.1f s)", m.id,
                         time.monotonic() - t0)
        self.keys = KeyStore(self.args.auth)
        self.created = now()
        self._ready_until = 0.0
        self._info: dict[str, dict] = {}
        http.configure(
            self.args.limits.max_body_bytes,
            self.args.http.cors_allow_origins,
            self.args.log_requests,
            IngressMetrics(),
        )

    # -------------------------------------------------------------------------------------------- helpers
    def _auth(self, request: Request) -> None:
        if not self.keys.check(request.headers.get("authorization")):
            raise Unauthorized("missing or invalid API key: send `Authorization: Bearer <key>`")

    def _model(self, requested: str | None) -> ModelArgs:
        m = self.args.model_for(requested)
        if m is None:
            served = ", ".join(i for mm in self.args.models for i in mm.all_ids)
            raise ModelNotFound(
                f"model {_clip(requested)} is not served here; served models: {served}", param="model"
            )
        return m

    def _check_limits(self, job: RerankJob) -> None:
        lim = self.args.limits
        n = len(job.documents)
        if n == 0:
            raise InvalidInput("documents must not be empty", param="documents")
        if n > lim.max_documents:
            raise InvalidInput(f"too many documents: {n}, the limit is {lim.max_documents}", param="documents")
        for q in job.pair_queries or [job.query]:
            if len(q) > lim.max_query_chars:
                raise InvalidInput(
                    f"query is {len(q)} characters, over the limit of {lim.max_query_chars}", param="query"
                )
            check_text(q, "query", "query")
        images = 0
        for i, d in enumerate(job.documents):
            if d.text is not None and len(d.text) > lim.max_document_chars:
                raise InvalidInput(
                    f"document {i} is {len(d.text)} characters, over the limit of {lim.max_document_chars}",
                    param="documents",
                )
            if d.text is not None:
                check_text(d.text, f"document {i}", "documents")
            images += d.image is not None
        if images > lim.max_images_per_request:
            raise PayloadTooLarge(
                f"too many images: {images}, the limit is {lim.max_images_per_request} per request", param="documents"
            )

    def _chunks(self, job: RerankJob) -> list[tuple[int, str, list[tuple[str | None, str | None]]]]:
        """(first document index, query, documents) groups of at most docs_per_chunk documents."""
        size = self.args.limits.docs_per_chunk
        queries = job.pair_queries or [job.query] * len(job.documents)
        out = []
        start = 0
        while start < len(job.documents):
            end = start + 1
            while end < len(job.documents) and end - start < size and queries[end] == queries[start]:
                end += 1
            docs = [(d.text, d.image) for d in job.documents[start:end]]
            out.append((start, queries[start], docs))
            start = end
        return out

    async def _score(self, request: Request, job: RerankJob) -> tuple[ModelArgs, Outcome]:
        self._auth(request)
        m = self._model(job.model)
        self._check_limits(job)
        request.state.model = m.id
        request.state.documents = len(job.documents)
        rid = _request_id(request)
        handles = self.handles[m.id]
        chunks = self._chunks(job)
        slots = asyncio.Semaphore(self.args.limits.max_chunks_in_flight)
        tasks = [
            asyncio.ensure_future(
                self._score_chunk(
                    handles,
                    PrepareRequest(
                        query=query,
                        documents=docs,
                        truncate=job.truncate,
                        max_length=job.max_length,
                        max_tokens_per_doc=job.max_tokens_per_doc,
                        max_chunks=job.max_chunks_per_doc,
                        request_id=rid,
                    ),
                    slots,
                )
            )
            for _, query, docs in chunks
        ]
        try:
            scored: list[ScoredChunk] = await asyncio.wait_for(
                asyncio.gather(*tasks), timeout=self.args.limits.request_timeout_s
            )
        except asyncio.TimeoutError:
            raise Timeout(
                f"scoring did not finish within {self.args.limits.request_timeout_s:g} s (request id {rid})"
            ) from None
        except BaseException as e:  # noqa: BLE001 - translate Serve/Ray wrappers into domain errors
            raise self._translate(e) from None
        finally:
            for t in tasks:  # a failed or timed-out request stops the work behind its other chunks
                t.cancel()
        out = Outcome(len(job.documents))
        for (start, _, docs), sc in zip(chunks, scored, strict=True):
            out.logits[start : start + len(docs)] = sc.logits
            out.tokens += sc.tokens
            out.warnings.extend(msg if i is None else f"document {i + start} {msg}" for i, msg in sc.notes)
        # one query truncation note is enough
        seen: set[str] = set()
        out.warnings = [w for w in out.warnings if not (w in seen or seen.add(w))]
        request.state.tokens = out.tokens
        # where the time went (slowest chunk): waiting in the scorer's batch queue, and its forward pass
        request.state.queue_ms = round(max(sc.queue_ms for sc in scored), 2)
        request.state.forward_ms = round(max(sc.forward_ms for sc in scored), 2)
        request.state.preprocess_ms = round(max(sc.preprocess_ms for sc in scored), 2)
        request.state.score_ms = round(max(sc.score_ms for sc in scored), 2)
        return m, out

    @staticmethod
    async def _call_chunk(handles: dict, prep: PrepareRequest) -> ScoredChunk:
        """Tokenize one chunk, then score it on a scorer replica.

        Text-only chunks of a model this replica tokenizes itself (``handles["preparer"]``) are tokenized on a
        worker thread here (the tokenizer releases the GIL, so the event loop keeps serving), which saves a
        handle call per chunk. Other chunks go to a preprocess replica. A text chunk (a few kB of token ids)
        comes back here and goes on by value: cheaper than letting Serve resolve an un-awaited response into
        the scorer call (7 against 28 ms per hop for small payloads in the Serve notes' measurements on a
        2-core machine). A chunk with images (megabytes of tiles) is chained instead, so the tiles go from
        preprocess to scorer without a detour through this replica. Cancelling this task cancels whichever
        call is in flight.
        """
        t0 = time.monotonic()
        chained = any(image is not None for _, image in prep.documents)
        preparer: ChunkPreparer | None = None if chained else handles.get("preparer")
        if preparer is not None:
            if _chunk_chars(prep) <= INLINE_TOKENIZE_CHARS:
                enc = preparer.prepare(prep)  # ~0.1 ms: cheaper here than the thread hop (0.24 ms CPU in all)
            else:
                enc = await asyncio.to_thread(preparer.prepare, prep)
            handles["preparer_metrics"].record((time.monotonic() - t0) * 1000, 0)
            scored = _score_call(handles, enc, prep.request_id)
        else:
            pre = handles["preprocess"].prepare.remote(prep)
            if chained:
                scored = handles["scorer"].score.remote(pre)
            else:
                try:
                    enc = await pre
                except asyncio.CancelledError:
                    pre.cancel()
                    raise
                scored = _score_call(handles, enc, prep.request_id)
        t1 = time.monotonic()
        try:
            sc: ScoredChunk = await scored
        except asyncio.CancelledError:
            scored.cancel()
            raise
        t2 = time.monotonic()
        sc.preprocess_ms = 0.0 if chained else (t1 - t0) * 1000  # chained: inside score_ms
        sc.score_ms = (t2 - t1) * 1000
        return sc

    async def _score_chunk(
        self, handles: dict, prep: PrepareRequest, slots: asyncio.Semaphore | None = None
    ) -> ScoredChunk:
        """``_call_chunk`` once one of the request's ``slots`` is free (limits.max_chunks_in_flight), tried once
        more with fresh handle calls when a replica died under it (scoring is idempotent; Serve routes the retry
        to a live replica). A second loss is a 503 with Retry-After."""
        async with slots or contextlib.nullcontext():
            for attempt in (1, 2):
                try:
                    return await self._call_chunk(handles, prep)
                except Exception as e:  # only a lost replica is retried; anything else propagates as it is
                    if not replica_lost(e):
                        raise
                    self._ready_until = 0.0  # a cached "ready" must not outlive a replica known to be gone
                    if attempt == 2:
                        log.warning("request %s: a replica went away again (%s); answering 503",
                                    prep.request_id, type(e).__name__)
                        raise NotReady(LOST_REPLICA_MESSAGE, retry_after_s=2) from None
                    log.warning("request %s: a replica went away while scoring (%s); retrying the chunk once",
                                prep.request_id, type(e).__name__)
        raise AssertionError("unreachable")

    @staticmethod
    def _translate(e: BaseException) -> BaseException:
        inner = unwrap(e)
        if isinstance(inner, RerankError):
            return inner
        if isinstance(e, BackPressureError) or isinstance(inner, BackPressureError):
            return Overloaded("the service is at capacity; retry shortly", retry_after_s=1)
        if isinstance(e, DeploymentUnavailableError) or isinstance(inner, DeploymentUnavailableError):
            return NotReady("the model is not available yet; retry shortly", retry_after_s=5)
        if isinstance(e, asyncio.CancelledError):
            return e
        if replica_lost(e):
            return NotReady(LOST_REPLICA_MESSAGE, retry_after_s=2)
        log.error("scoring failed: %s", type(inner).__name__, exc_info=inner)
        return RerankError("internal error")

    # ----------------------------------------------------------------------------------------------- rerank
    async def _rerank(self, request: Request, body: RerankRequest, route: str, version: str) -> dict:
        job = rerank_job(body, route)
        m, out = await self._score(request, job)
        scores = out.logits if job.raw_scores else sigmoid(out.logits)
        order = np.argsort(-out.logits, kind="stable")
        if job.top_n:
            order = order[: job.top_n]
        results = []
        for i in order.tolist():
            item: dict[str, Any] = {"index": i, "relevance_score": float(scores[i])}
            if job.return_documents:
                item["document"] = job.documents[i].echo
            results.append(item)
        return {
            "id": new_id("rerank"),
            "model": m.id,
            "results": results,
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
            "meta": {
                "api_version": {"version": version},
                "billed_units": {"search_units": 1},
                "tokens": {"input_tokens": out.tokens},
                "warnings": out.warnings,
            },
        }

    @app.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS)
    async def rerank_v1(self, request: Request, body: RerankRequest) -> dict:
        """Cohere v1 / Jina / vLLM rerank."""
        return await self._rerank(request, body, "/v1/rerank", "1")

    @app.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS)
    async def rerank_v2(self, request: Request, body: RerankRequest) -> dict:
        """Cohere v2 rerank (`cohere.ClientV2`)."""
        return await self._rerank(request, body, "/v2/rerank", "2")

    @app.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS)
    async def rerank_plain(self, request: Request, body: RerankRequest) -> dict:
        """vLLM / TEI / Infinity style rerank."""
        return await self._rerank(request, body, "/rerank", "2")

    # ---------------------------------------------------------------------------------------------- ranking
    @app.post("/v1/ranking", response_model=RankingResponse, response_model_exclude_none=True, responses=ERRORS)
    async def ranking(self, request: Request, body: RankingRequest) -> dict:
        """NVIDIA NIM ranking: raw logits, sorted."""
        job = ranking_job(body, "/v1/ranking")
        _, out = await self._score(request, job)
        order = np.argsort(-out.logits, kind="stable")
        if job.top_n:
            order = order[: job.top_n]
        return {
            "rankings": [{"index": i, "logit": float(out.logits[i])} for i in order.tolist()],
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
        }

    # ------------------------------------------------------------------------------------------------ score
    async def _score_route(self, request: Request, body: ScoreRequest, route: str) -> dict:
        job = score_job(body, route)
        m, out = await self._score(request, job)
        scores = out.logits if job.raw_scores else sigmoid(out.logits)
        return {
            "id": new_id("score"),
            "object": "list",
            "created": now(),
            "model": m.id,
            "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores.tolist())],
            "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
        }

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
    async def score_v1(self, request: Request, body: ScoreRequest) -> dict:
        """vLLM score: input order, sigmoid by default (`use_activation: false` for raw logits)."""
        return await self._score_route(request, body, "/v1/score")

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS)
    async def score_plain(self, request: Request, body: ScoreRequest) -> dict:
        """vLLM score (unversioned path)."""
        return await self._score_route(request, body, "/score")

    # ----------------------------------------------------------------------------------------------- models
    def _cards(self) -> list[dict]:
        cards = []
        for m in self.args.models:
            for i in m.all_ids:
                card = {"id": i, "object": "model", "created": self.created, "owned_by": "nvidia", "root": m.id}
                info = self._info.get(m.id)
                if m.max_tokens or info:
                    card["max_model_len"] = m.max_tokens or info["max_length"]
                cards.append(card)
        return cards

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
    async def models(self) -> dict:
        """Served models and aliases (open: no key needed)."""
        return {"object": "list", "data": self._cards()}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, response_model_exclude_none=True, responses=ERRORS)
    async def model(self, model_id: str) -> dict:
        for card in self._cards():
            if card["id"] == model_id:
                return card
        raise ModelNotFound(f"model {_clip(model_id)} is not served here", param="model")

    # ----------------------------------------------------------------------------------------------- health
    async def _check_ready(self) -> dict[str, bool]:
        async def one(m: ModelArgs) -> bool:
            h = self.handles[m.id]
            try:
                ok = await asyncio.wait_for(_await(h["scorer"].ready.remote()), 2.0)
                info = await asyncio.wait_for(_await(h["preprocess"].info.remote()), 2.0)
                self._info[m.id] = info
                return bool(ok)
            except Exception:  # noqa: BLE001 - anything short of an answer means "not ready"
                return False

        results = await asyncio.gather(*(one(m) for m in self.args.models))
        return {m.id: r for m, r in zip(self.args.models, results)}

    @app.get("/health", response_model=HealthResponse, response_model_exclude_none=True)
    async def health(self) -> dict:
        """Liveness of the HTTP layer."""
        return {"status": "ok"}

    @app.get("/v1/health/live", response_model=HealthResponse, response_model_exclude_none=True)
    async def live(self) -> dict:
        return {"status": "live"}

    @app.get("/v1/health/ready", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def ready(self) -> Response:
        """200 once every model can score; 503 with Retry-After before."""
        if time.monotonic() < self._ready_until:
            return JSONResponse({"status": "ready"})
        status = await self._check_ready()
        if all(status.values()):
            self._ready_until = time.monotonic() + 5.0
            return JSONResponse({"status": "ready", "models": status})
        not_ready = [k for k, v in status.items() if not v]
        return domain_error_response(NotReady(f"models not ready yet: {', '.join(not_ready)}", 5), "")
