"""Wire schemas of every dialect, and their translation into one internal ``RerankJob``.

Dialects: Cohere/Jina/vLLM rerank (``/v1/rerank``, ``/v2/rerank``, ``/rerank``), NVIDIA NIM ranking
(``/v1/ranking``), vLLM score (``/v1/score``, ``/score``), OpenAI model listing. Unknown request fields
are ignored and ``null`` is accepted wherever a field is optional, because real clients send both.
Tests and benchmarks parse responses with these same classes.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from rerank_core.errors import InvalidInput


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Open(BaseModel):
    """A document object: unknown keys are kept so they can be echoed back."""

    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------- requests
class ImageURL(_Lenient):
    url: str


class ContentPart(_Lenient):
    """vLLM-style content part: ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {...}}``."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    image: str | None = None


class DocumentObject(_Open):
    text: str | None = None
    image: str | None = None
    content: list[ContentPart] | str | None = None


Document = Union[str, DocumentObject]


class QueryObject(_Lenient):
    text: str | None = None
    image: str | None = None


_EXAMPLE_QUERY = "how much protein should a female eat?"
_EXAMPLE_DOCS = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
    "Definition of summit for English Language Learners: the highest point of a mountain.",
]


class RerankRequest(_Lenient):
    """Cohere v1/v2, Jina, vLLM and TEI/Infinity rerank request."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"query": _EXAMPLE_QUERY, "documents": _EXAMPLE_DOCS, "top_n": 2}]},
    )

    model: str | None = Field(None, description="Model id or alias; default model when omitted.")
    query: str | QueryObject = Field(..., description="The query text.")
    documents: list[Document] = Field(
        ...,
        description="Strings, {text}, {image}, {text, image} or {content: [...]}.",
        json_schema_extra={"minItems": 1},
    )
    top_n: int | None = Field(
        None, description="Return only the best N results (null or 0: all).", json_schema_extra={"minimum": 0}
    )
    return_documents: bool | None = Field(None, description="Echo each document in its result (default false).")
    max_tokens_per_doc: int | None = Field(
        None, description="Cut each document to this many tokens.", json_schema_extra={"minimum": 1}
    )
    max_chunks_per_doc: int | None = Field(None, description="Score long documents in up to N chunks (max).")
    truncate: str | None = Field(None, description="END (default), NONE (400 when too long) or CHUNK.")
    raw_scores: bool | None = Field(None, description="relevance_score is the raw logit instead of sigmoid.")


class RankingRequest(_Lenient):
    """NVIDIA NIM ``/v1/ranking``."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"query": {"text": _EXAMPLE_QUERY}, "passages": [{"text": d} for d in _EXAMPLE_DOCS]}]
        },
    )

    model: str | None = None
    query: QueryObject | str
    passages: list[DocumentObject | str] = Field(..., json_schema_extra={"minItems": 1})
    truncate: str | None = Field(None, description="END (default) or NONE.")
    top_k: int | None = Field(
        None, description="Return only the best K (LiteLLM sends this).", json_schema_extra={"minimum": 0}
    )
    top_n: int | None = Field(None, json_schema_extra={"minimum": 0})


class ScoreRequest(_Lenient):
    """vLLM ``/score``: one query against many documents, or pairwise lists."""

    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"text_1": _EXAMPLE_QUERY, "text_2": _EXAMPLE_DOCS}]}
    )

    model: str | None = None
    queries: str | list[str] | None = None
    text_1: str | list[str] | None = None
    data_1: str | list[str] | None = None
    documents: str | list[Document] | None = None
    items: str | list[Document] | None = None
    text_2: str | list[Document] | None = None
    data_2: str | list[Document] | None = None
    truncate_prompt_tokens: int | None = Field(
        None, description="Cut each pair to this many tokens.", json_schema_extra={"minimum": 2}
    )
    use_activation: bool | None = Field(None, description="false: raw logits (default true: sigmoid).")
    activation: bool | None = None
    raw_scores: bool | None = None


# --------------------------------------------------------------------------------------------- responses
class RerankDocument(_Open):
    text: str | None = None


class RerankResultItem(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int = 1


class MetaTokens(BaseModel):
    input_tokens: int


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: MetaTokens
    warnings: list[str] = Field(default_factory=list)


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResultItem]
    usage: Usage
    meta: Meta


class Ranking(BaseModel):
    index: int
    logit: float


class RankingResponse(BaseModel):
    rankings: list[Ranking]
    usage: Usage | None = None


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nvidia"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    object: Literal["error"] = "error"
    message: str
    type: str
    code: int
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
    models: dict[str, bool] | None = None


# ------------------------------------------------------------------------------------------ internal job
@dataclass
class Doc:
    """One document after dialect parsing: text, image (data URL or base64), and what to echo back."""

    text: str | None
    image: str | None
    echo: dict[str, Any]


@dataclass
class RerankJob:
    """The dialect-free request the ingress schedules."""

    route: str
    model: str | None
    query: str
    documents: list[Doc]
    top_n: int | None = None
    return_documents: bool = False
    truncate: str = "END"
    max_tokens_per_doc: int | None = None
    max_chunks_per_doc: int | None = None
    max_length: int | None = None
    raw_scores: bool = False
    # set when the request scores several queries pairwise (vLLM score with two lists)
    pair_queries: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _query_text(q: str | QueryObject | None, param: str = "query") -> str:
    if q is None:
        raise InvalidInput("query is required", param=param)
    if isinstance(q, str):
        return q
    if q.image:
        raise InvalidInput("image queries are not supported: the query must be text", param=param)
    if q.text is None:
        raise InvalidInput("query.text is required", param=param)
    return q.text


def _image_ref(part: ContentPart) -> str | None:
    if part.image_url is not None:
        return part.image_url if isinstance(part.image_url, str) else part.image_url.url
    return part.image


# extra keys of a document object are echoed back; JSON nested deeper than this cannot be (pydantic stops at
# about 255 levels when it renders the response), so such a document is refused up front
MAX_DOCUMENT_NESTING = 64


def _nested_deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def to_doc(d: Document, i: int, param: str = "documents") -> Doc:
    """Any accepted document shape -> ``Doc``."""
    if isinstance(d, str):
        return Doc(text=d, image=None, echo={"text": d})
    if d.model_extra and _nested_deeper_than(d.model_extra, MAX_DOCUMENT_NESTING):
        raise InvalidInput(
            f"document {i} has fields nested more than {MAX_DOCUMENT_NESTING} levels deep", param=param
        )
    echo = d.model_dump(exclude_none=True)
    text, image = d.text, d.image
    if d.content is not None:
        parts = [ContentPart(type="text", text=d.content)] if isinstance(d.content, str) else d.content
        texts, images = [], []
        for p in parts:
            if p.type == "text":
                texts.append(p.text or "")
            elif p.type in ("image_url", "image"):
                ref = _image_ref(p)
                if not ref:
                    raise InvalidInput(f"document {i}: image part without a URL", param=param)
                images.append(ref)
            else:
                raise InvalidInput(f"document {i}: unsupported content part type {p.type!r}", param=param)
        text = "".join(texts) if texts else text
        image = images[0] if images else image
        if len(images) > 1 or (images and d.image):
            raise InvalidInput(f"document {i}: only one image per document is supported", param=param)
    if image is not None and not isinstance(image, str):
        raise InvalidInput(f"document {i}: image must be a data URL or base64 string", param=param)
    if text is None and not image:
        raise InvalidInput(f"document {i} has neither text nor image", param=param)
    if image == "":
        image = None
    return Doc(text=text, image=image, echo=echo)


def _nonneg(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if value < 0:
        raise InvalidInput(f"{name} must be >= 0", param=name)
    return value or None


def rerank_job(req: RerankRequest, route: str) -> RerankJob:
    if req.max_tokens_per_doc is not None and req.max_tokens_per_doc < 1:
        raise InvalidInput("max_tokens_per_doc must be >= 1", param="max_tokens_per_doc")
    truncate = (req.truncate or "END").upper()
    chunks = _nonneg(req.max_chunks_per_doc, "max_chunks_per_doc")
    if chunks and truncate == "END" and req.truncate is None:
        truncate = "CHUNK"
    return RerankJob(
        route=route,
        model=req.model,
        query=_query_text(req.query),
        documents=[to_doc(d, i) for i, d in enumerate(req.documents)],
        top_n=_nonneg(req.top_n, "top_n"),
        return_documents=bool(req.return_documents),
        truncate=truncate,
        max_tokens_per_doc=req.max_tokens_per_doc,
        max_chunks_per_doc=chunks,
        raw_scores=bool(req.raw_scores),
    )


def ranking_job(req: RankingRequest, route: str) -> RerankJob:
    top = req.top_k if req.top_k is not None else req.top_n
    return RerankJob(
        route=route,
        model=req.model,
        query=_query_text(req.query),
        documents=[to_doc(p, i, param="passages") for i, p in enumerate(req.passages)],
        top_n=_nonneg(top, "top_k"),
        truncate=(req.truncate or "END").upper(),
        raw_scores=True,
    )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def score_job(req: ScoreRequest, route: str) -> RerankJob:
    left = _first(req.queries, req.text_1, req.data_1)
    right = _first(req.documents, req.items, req.text_2, req.data_2)
    if left is None:
        raise InvalidInput("one of queries, text_1 or data_1 is required", param="text_1")
    if right is None:
        raise InvalidInput("one of documents, items, text_2 or data_2 is required", param="text_2")
    right_list = [right] if isinstance(right, (str, DocumentObject)) else list(right)
    docs = [to_doc(d, i, param="text_2") for i, d in enumerate(right_list)]
    pair_queries = None
    if isinstance(left, list):
        if not left:
            raise InvalidInput("text_1 must not be an empty list: give a query", param="text_1")
        if len(left) == 1:
            left = left[0]
        elif len(left) != len(docs):
            raise InvalidInput(
                f"text_1 has {len(left)} items and text_2 has {len(docs)}: give one query, or equal lengths",
                param="text_1",
            )
        else:
            pair_queries = list(left)
            left = left[0]
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 2:
        raise InvalidInput("truncate_prompt_tokens must be >= 2", param="truncate_prompt_tokens")
    activation = _first(req.use_activation, req.activation)
    raw = bool(req.raw_scores) or activation is False
    return RerankJob(
        route=route,
        model=req.model,
        query=left,
        documents=docs,
        max_length=req.truncate_prompt_tokens,
        raw_scores=raw,
        pair_queries=pair_queries,
    )
