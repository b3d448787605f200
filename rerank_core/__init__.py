"""Llama Nemotron rerankers in plain PyTorch: models, tokenization, tiling and batching (no Ray here).

    from rerank_core import load_reranker
    r = load_reranker("nvidia/llama-nemotron-rerank-1b-v2")   # or a local checkpoint directory
    r.score("how much protein should a female eat?", ["...", "..."])   # raw logits, input order
    r.rerank(query, documents, top_n=3)   # [(index, logit, probability)], best first
"""

from .errors import (
    CheckpointError,
    InputTooLong,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    RerankError,
    WeightsNotFound,
)
from .reranker import Reranker, RerankResult, load_reranker, sigmoid

__all__ = [
    "CheckpointError",
    "InputTooLong",
    "InvalidInput",
    "ModelNotFound",
    "PayloadTooLarge",
    "RerankError",
    "RerankResult",
    "Reranker",
    "WeightsNotFound",
    "load_reranker",
    "sigmoid",
]

__version__ = "0.1.0"
