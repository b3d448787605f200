"""Synthetic, reproducible reranking workloads: fresh queries and documents of chosen token lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "protein calorie mountain summit river ocean forest cloud energy battery solar wind engine rocket orbit planet "
    "galaxy neuron synapse memory language grammar syntax token vector matrix tensor kernel compiler runtime "
    "network packet router switch server client request response latency throughput replica cluster node "
    "scheduler queue batch budget padding length sequence attention head layer norm residual gradient loss "
    "optimizer dataset benchmark metric ranking retrieval passage query document relevance score logit "
    "probability sigmoid history culture music painting theatre novel poem author reader library museum "
    "city village bridge tunnel railway airport harbour market bakery garden kitchen recipe flour sugar salt "
    "pepper tomato onion garlic lemon apple orange banana coffee tea water milk cheese bread butter egg"
).split()


@dataclass(frozen=True)
class Cell:
    """One workload cell: documents per request, document length range (tokens), query length (words)."""

    docs_per_request: int = 32
    doc_tokens: tuple[int, int] = (64, 512)
    query_words: int = 12


class TextFactory:
    """Makes texts of approximately a target token count (checked with the real tokenizer)."""

    def __init__(self, count_tokens, seed: int = 0):
        self.count = count_tokens
        self.rng = random.Random(seed)
        self.serial = 0

    def words(self, n: int) -> str:
        self.serial += 1
        # a serial number makes every text unique, so no cache can help either side
        return f"[{self.serial}] " + " ".join(self.rng.choice(WORDS) for _ in range(n))

    def text_of_tokens(self, target: int) -> str:
        n = max(1, int(target * 0.9))
        text = self.words(n)
        # grow or trim to within a few tokens of the target
        for _ in range(6):
            t = self.count(text)
            if abs(t - target) <= 3:
                break
            n = max(1, int(n * target / max(t, 1)))
            self.serial -= 1
            text = self.words(n)
        return text

    def request(self, cell: Cell) -> tuple[str, list[str]]:
        lo, hi = cell.doc_tokens
        query = self.words(cell.query_words)
        docs = [self.text_of_tokens(self.rng.randint(lo, hi)) for _ in range(cell.docs_per_request)]
        return query, docs
