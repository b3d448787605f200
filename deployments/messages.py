"""Plain dataclasses that cross deployment handles (picklable, numpy inside, no pydantic or tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PrepareRequest:
    """One chunk of a request's documents, for a preprocess replica."""

    query: str
    documents: list[tuple[str | None, str | None]]  # (text, image data URL / base64)
    truncate: str = "END"
    max_length: int | None = None
    max_tokens_per_doc: int | None = None
    max_chunks: int | None = None
    request_id: str = ""


@dataclass
class ScoredChunk:
    """A scorer's answer for one chunk: per-document logits and what happened on the way."""

    logits: np.ndarray  # float32 [documents in the chunk]
    tokens: int  # tokens actually scored (image tokens and chunk windows included)
    notes: list[tuple[int | None, str]] = field(default_factory=list)  # chunk-local document indices
    truncated: list[int] = field(default_factory=list)
    pairs: int = 0
    padded_tokens: int = 0
    queue_ms: float = 0.0
    forward_ms: float = 0.0
    # filled in by the ingress: its round trips to the preprocess and scorer replicas (hops included)
    preprocess_ms: float = 0.0
    score_ms: float = 0.0
