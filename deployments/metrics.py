"""Prometheus metrics through Ray's exporter (``ray.serve.metrics``); names get Ray's ``ray_`` prefix.

Created inside replicas (never at import), tagged by model; Serve adds application, deployment and
replica tags itself. No label ever carries request content or keys.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

MS_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
PAIR_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
TOKEN_BUCKETS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "rerank_requests", description="HTTP requests by route, model and status.", tag_keys=("route", "model", "status")
        )
        self.latency = Histogram(
            "rerank_request_latency_ms",
            description="End-to-end request latency at the ingress (ms).",
            boundaries=MS_BUCKETS,
            tag_keys=("route", "model"),
        )
        self.documents = Counter("rerank_documents", description="Documents received.", tag_keys=("model",))

    def record(self, route: str, model: str | None, status: int, latency_ms: float, documents: int | None) -> None:
        tags = {"route": route, "model": model or "none"}
        self.requests.inc(tags={**tags, "status": str(status)})
        self.latency.observe(latency_ms, tags=tags)
        if documents:
            self.documents.inc(documents, tags={"model": tags["model"]})


class PreprocessMetrics:
    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.latency = Histogram(
            "rerank_preprocess_latency_ms",
            description="Prompt building, tokenization and image tiling per chunk (ms).",
            boundaries=MS_BUCKETS,
            tag_keys=("model",),
        )
        self.images = Counter("rerank_images", description="Images decoded and tiled.", tag_keys=("model",))

    def record(self, ms: float, images: int) -> None:
        self.latency.observe(ms, tags=self.tags)
        if images:
            self.images.inc(images, tags=self.tags)


class ScorerMetrics:
    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        keys = ("model",)
        self.pairs = Counter("rerank_pairs_scored", description="(query, document) pairs scored.", tag_keys=keys)
        self.tokens = Counter("rerank_tokens_scored", description="Real tokens scored.", tag_keys=keys)
        self.padded = Counter(
            "rerank_padded_tokens",
            description="Tokens run incl. padding (text model: padding exists only inside attention groups).",
            tag_keys=keys,
        )
        self.padding_ratio = Gauge(
            "rerank_padding_ratio", description="Padded over real tokens of the last batch.", tag_keys=keys
        )
        self.batch_pairs = Histogram(
            "rerank_batch_pairs", description="Pairs per batch.", boundaries=PAIR_BUCKETS, tag_keys=keys
        )
        self.batch_tokens = Histogram(
            "rerank_batch_tokens", description="Padded tokens per batch.", boundaries=TOKEN_BUCKETS, tag_keys=keys
        )
        self.queue_ms = Histogram(
            "rerank_queue_wait_ms", description="Time a chunk waited for its batch (ms).", boundaries=MS_BUCKETS,
            tag_keys=keys,
        )
        self.forward_ms = Histogram(
            "rerank_forward_latency_ms", description="Forward time of a batch (ms).", boundaries=MS_BUCKETS,
            tag_keys=keys,
        )

    def record_batch(self, pairs: int, real: int, padded: int, forward_ms: float, waits_ms: list[float]) -> None:
        t = self.tags
        self.pairs.inc(pairs, tags=t)
        self.tokens.inc(real, tags=t)
        self.padded.inc(padded, tags=t)
        self.padding_ratio.set(padded / max(1, real), tags=t)
        self.batch_pairs.observe(pairs, tags=t)
        self.batch_tokens.observe(padded, tags=t)
        self.forward_ms.observe(forward_ms, tags=t)
        for w in waits_ms:
            self.queue_ms.observe(w, tags=t)
