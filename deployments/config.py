"""The application's arguments: the ``args`` block of ``serve_config.yaml``, validated.

Every field has a description; together they are the operator's manual (``python -m deployments.docs``
prints them as the config reference). Unknown keys are rejected so typos fail at deploy time.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingArgs(_Strict):
    """Serve autoscaling for one deployment (a subset of ``ray.serve.config.AutoscalingConfig``)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas; 0 lets the deployment scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Ongoing requests per replica the autoscaler aims for. Default: derived from the batch "
        "size for a scorer (a quarter of its batch in budget units: 16 with max_batch_tokens 16384 on GPU, 4 "
        "with cpu_forward_tokens 4096 on CPU), 8 for preprocess and 64 for the ingress; not Serve's default of "
        "2, which would keep batches small.",
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds load must stay high before adding replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds load must stay low before removing replicas.")
    look_back_period_s: float = Field(
        20.0, gt=0, description="Window over which load is averaged (more than Serve's 10 s metrics interval)."
    )

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingArgs":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class DeploymentArgs(_Strict):
    """Resources and scaling of one deployment."""

    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count. Leave unset to use `autoscaling` (one of the two)."
    )
    autoscaling: AutoscalingArgs | None = Field(None, description="Autoscaling; used when num_replicas is unset.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs each replica reserves.")
    memory_gb: float | None = Field(None, gt=0, description="Memory each replica reserves (GiB), if set.")
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests a replica works on at once. Default: 256 for the ingress, 32 for preprocess; for a "
        "scorer derived from the batch settings (on CPU at least as many as the ingress may send it, see "
        "max_queued_requests).",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=-1,
        description="Requests each caller may queue for this deployment before new ones are refused with "
        "503 and Retry-After (-1: unbounded; not recommended). Default: 512 for the ingress (its callers are "
        "the proxies, so this is where the service refuses load); for the preprocess and scorer deployments, "
        "as many chunk calls as the requests one ingress replica admits can have in flight (its "
        "max_ongoing_requests x limits.max_chunks_in_flight), so a request the ingress took is never refused "
        "halfway, after some of its chunks were scored.",
    )
    max_surge_percent: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Extra replicas (percent of the target) Serve may start during a rolling update before "
        "stopping old ones, so updates keep capacity (Serve's default: 0).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each replica requires, e.g. {\"cpu_group\": 0.01} to pin CPU "
        "deployments to nodes started with that resource (keeps them off GPU nodes).",
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels a replica must be scheduled on (ray_actor_options.label_selector).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> "DeploymentArgs":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self


class ScorerArgs(DeploymentArgs):
    """The GPU scoring deployment of one model."""

    num_gpus: float = Field(
        0.5,
        ge=0,
        le=8,
        description="GPU fraction per scorer replica when the app runs on GPUs (0.5 = two replicas share a GPU; "
        "use 1/n). Ignored (0) when `accelerator` resolves to cpu.",
    )
    max_batch_tokens: int = Field(
        16384,
        ge=256,
        description="Token budget of one batch and of one forward pass: real tokens for the text model (its "
        "pairs are packed without padding), padded tokens (pairs x longest pair) for the VL model.",
    )
    cpu_forward_tokens: int = Field(
        4096,
        ge=256,
        description="On CPU, split each batch into forward passes of at most this many tokens "
        "(smaller passes stay in cache: about 25% more tokens/s than 16k-token passes on a 2-core AVX2 "
        "machine). VL batches still gather up to max_batch_tokens, so the length sort stays tight; a text model's "
        "CPU batch holds at most this many tokens (its pairs are packed without padding, and results return "
        "sooner), split into one share per forward thread, each run as passes of at most cpu_thread_tokens.",
    )
    cpu_thread_tokens: int = Field(
        2048,
        ge=16,
        description="On CPU, text model: the most tokens in one forward pass. A batch (up to cpu_forward_tokens) is "
        "split into shares, one per forward thread, and each share runs as passes of at most this many tokens "
        "(a pair longer than that runs alone). Smaller passes stay in cache: with two one-thread passes side by "
        "side on a 2-core machine, 2048-token passes scored 5.7% (64-512-token pairs) and 8% (128-1024) more "
        "pairs/s than 4096-token ones, and 1024 about as much as 2048 (benchmarks/README.md, stop 22).",
    )
    attention_group_tokens: int | None = Field(
        None,
        ge=16,
        description="Text model: padded tokens per attention group inside a packed forward pass (pairs of "
        "close lengths attend as one padded block; projections and MLP see no padding). Default: 512 on CPU, "
        "4096 on GPU.",
    )
    max_batch_tiles: int = Field(64, ge=1, description="Image tiles per forward pass (VL model).")
    batch_token_unit: int = Field(
        256,
        ge=1,
        description="Granularity of the token budget in Serve's batch queue (batch_queue: serve): "
        "max_batch_size = max_batch_tokens / batch_token_unit, and each queued chunk counts ceil(tokens / unit). "
        "The default fifo queue counts tokens exactly. Also sets the derived max_ongoing_requests and "
        "autoscaling target.",
    )
    batch_wait_timeout_s: float | None = Field(
        None,
        ge=0,
        description="How long a batch waits for more pairs once its first chunk arrived (the FIFO queue "
        "skips the wait when the replica was idle). Default: 0.005 on GPU (a bigger batch costs the GPU little "
        "more time), 0 on CPU, where a batch starts only when a forward thread is free, so waiting leaves that "
        "thread idle: one document per request at concurrency 4, 146 -> 180 pairs/s (benchmarks/README.md, "
        "stop 24).",
    )
    max_concurrent_batches: int = Field(
        1, ge=1, description="Batches a replica runs at once (2 overlaps host work with the GPU forward pass)."
    )
    batch_queue: Literal["fifo", "serve"] = Field(
        "fifo",
        description="fifo: strict arrival order under the token budget (the chunk that would overflow a batch "
        "starts the next one). serve: Serve's @serve.batch with batch_size_fn, which re-queues that chunk at "
        "the tail (higher tail latency under load; kept for comparison).",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch in a CPU-only scorer (default: num_cpus, at least 1)."
    )
    cpu_threads_per_pass: int = Field(
        1,
        ge=1,
        description="CPU-only scorer under load: torch threads each forward pass uses. The replica runs "
        "torch_threads / cpu_threads_per_pass passes at once, each on a thread of its own (and so that many "
        "batches: at least max_concurrent_batches). With 1, a pass never waits at a barrier for a thread whose "
        "core another process took: on a 2-core machine under load, two 1-thread passes scored 10-20% more "
        "pairs/s than one 2-thread pass (benchmarks/README.md). A text batch of several attention groups is "
        "split into equal shares, one per such thread, so batches finish in arrival order, each in a fraction of "
        "the time; a batch that cannot be split and starts while nothing else runs or waits uses all "
        "torch_threads if it holds at least cpu_lone_batch_min_tokens tokens, so a lone request is not slowed "
        "down.",
    )
    cpu_lone_batch_min_tokens: int = Field(
        256,
        ge=0,
        description="CPU-only scorer: the fewest tokens a batch that cannot be split over the forward threads "
        "needs to run on all torch_threads when it starts with nothing else running or queued; smaller ones run "
        "on one thread. Two threads speed a one-pair pass up 1.4x at 48 tokens, 1.7x at 256 and 1.8-2x from 512 on "
        "the benchmark model, but a two-thread pass waits at every op for a thread whose core another process "
        "took, and holds both threads when the next request comes. One document of 16-64 tokens per request: "
        "at concurrency 4, +5-7% pairs/s and p99 37 against 40-42 ms; at concurrency 1, p99 13-17 against 19-22 ms "
        "for 0-8% fewer pairs/s (benchmarks/README.md, stop 25). 0: every such batch uses all threads.",
    )
    cpu_script_layers: bool = Field(
        True,
        description="On CPU, text model: run the layers of each packed forward pass as one TorchScript call (the "
        "same ATen ops in the same order, so the same scores bit for bit) instead of ~25 Python-level op calls "
        "per layer. A forward thread then needs the GIL only to enter and leave the pass, so the replica's event "
        "loop (Ray and Serve's Python) no longer stalls it: an eager pass waits for the GIL after every op "
        "whenever the loop runs Python (benchmarks/README.md, stop 24).",
    )
    compile: bool = Field(
        False,
        description="Compiled kernels. Text model: its elementwise steps (residual adds with norms, rotary, SwiGLU) "
        "as fused kernels (Triton on GPU, C++ on CPU); matmuls and attention stay as they are. On an H100 in "
        "bfloat16: +18-20% tokens/s for passes of thousands of tokens, but a lone 10-document request took 32 ms "
        "instead of 24 (each compiled call costs host time), and ~12 s more at start. On CPU it pays only with "
        "tcmalloc preloaded in the Ray workers (LD_PRELOAD=libtcmalloc_minimal.so.4 when starting Ray): +4-7% "
        "pairs/s and a lower p99 in the benchmark service, against -3% with glibc's malloc, which the kernels' "
        "fresh output buffers make fault pages in; needs a C++ compiler (g++). VL model on GPU: torch.compile of "
        "the whole model. When the kernels do not compile, the replica logs a warning and runs eager.",
    )

    def batch_wait_s(self, cpu: bool) -> float:
        """batch_wait_timeout_s, or its default for the device: 0 on CPU, 0.005 s on GPU."""
        if self.batch_wait_timeout_s is not None:
            return self.batch_wait_timeout_s
        return 0.0 if cpu else 0.005

    @property
    def cpu_threads(self) -> int:
        """torch threads of a CPU-only replica in all: torch_threads, else num_cpus (at least 1)."""
        return self.torch_threads or max(1, int(round(self.num_cpus)))

    @property
    def cpu_pass_threads(self) -> int:
        """torch threads of one CPU forward pass under load: cpu_threads_per_pass, at most cpu_threads."""
        return min(self.cpu_threads_per_pass, self.cpu_threads)

    @property
    def cpu_parallel_passes(self) -> int:
        """Forward passes a CPU-only replica runs at once (each with ``cpu_pass_threads`` threads)."""
        return max(self.max_concurrent_batches, self.cpu_threads // self.cpu_pass_threads)

    def concurrent_batches(self, use_gpu: bool) -> int:
        """Batches a replica runs at once: max_concurrent_batches on GPU, the parallel passes on CPU."""
        return self.max_concurrent_batches if use_gpu else self.cpu_parallel_passes

    @property
    def cpu_batch_tokens(self) -> int:
        """Tokens per text batch on CPU: the smaller of max_batch_tokens and cpu_forward_tokens."""
        return min(self.max_batch_tokens, self.cpu_forward_tokens)

    @property
    def cpu_text_pass_tokens(self) -> int:
        """Tokens per forward pass of a CPU text scorer: a batch's share on one forward thread, run as passes of
        at most cpu_thread_tokens."""
        return min(self.cpu_batch_tokens, self.cpu_thread_tokens)


class ModelArgs(_Strict):
    """One served model."""

    id: str = Field(..., min_length=1, description="Model id clients send in `model` and see in /v1/models.")
    aliases: list[str] = Field(default_factory=list, description="Other ids accepted for this model.")
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Short name used in deployment names (Preprocess-<name>, Scorer-<name>). Default: "
        "derived from `id`.",
    )
    source: str = Field(
        ...,
        min_length=1,
        description="Where the weights are: a Hugging Face hub id (owner/name, downloaded into the HF cache on "
        "first start) or a local checkpoint directory. Pointing the app at other weights means editing this.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `source` is a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Trunk dtype: auto = bfloat16 on GPU, float32 on CPU. Pooling and head are float32."
    )
    max_tokens: int | None = Field(
        None,
        ge=16,
        description="Longest (query, document) pair in tokens, BOS and image tokens included. "
        "Default: 8192 for text models, 10240 for the VL model.",
    )
    query_max_tokens: int = Field(
        2048, ge=1, description="Longest query in tokens; a longer query is a 400 error."
    )
    query_budget: int | None = Field(
        None,
        ge=1,
        description="With truncate=END, the query keeps at most this many tokens so the passage keeps room "
        "(default: half of max_tokens).",
    )
    max_tiles: int | None = Field(
        None, ge=1, le=40, description="VL model: most image tiles per image (default: processor_config.json, 6)."
    )
    apply_temperature: bool = Field(
        False,
        description="Divide logits by the config's `temperature`. Off by default: the published references "
        "return the undivided head output.",
    )
    tokenize_in_ingress: bool | None = Field(
        None,
        description="Tokenize text-only chunks in the ingress (on a worker thread) instead of on a preprocess "
        "replica: one handle call per chunk instead of two. Default (unset): on when the app runs on CPU, where "
        "every hop's CPU comes out of the forward passes; off on GPU, where preprocess replicas scale apart "
        "from the ingress. Chunks with images always go to the preprocess replicas.",
    )
    bundle_scorer_calls: bool | None = Field(
        None,
        description="Send small chunks (at most 256 tokens) that reach the ingress in the same event-loop turn to "
        "the scorer as one handle call (at most 16 chunks and 1024 tokens; never two chunks of one request), so "
        "per-call costs are shared: +19% throughput at one-document requests on the 2-core CPU benchmark. A "
        "scorer then counts a bundle as one request in max_ongoing_requests, max_queued_requests and its "
        "autoscaling target. Default (unset): on when the app runs on CPU, off on GPU.",
    )
    preprocess: DeploymentArgs = Field(
        default_factory=lambda: DeploymentArgs(
            num_replicas=None, autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=4)
        ),
        description="CPU preprocessing replicas (prompts, tokens, truncation, image tiles).",
    )
    scorer: ScorerArgs = Field(
        default_factory=lambda: ScorerArgs(autoscaling=AutoscalingArgs(min_replicas=1, max_replicas=4)),
        description="Scoring replicas (GPU fractions, or CPU when accelerator resolves to cpu).",
    )

    @field_validator("source")
    @classmethod
    def _no_secrets(cls, v: str) -> str:
        if v.startswith(("http://", "https://")):
            raise ValueError("source must be a hub id or a local directory, not a URL")
        return v

    @property
    def deployment_name(self) -> str:
        if self.name:
            return self.name
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.id.split("/")[-1]).strip("-")
        return slug or "model"

    @property
    def all_ids(self) -> list[str]:
        return [self.id, *self.aliases]


class LimitsArgs(_Strict):
    """Request limits; requests over them get a clear 400 or 413."""

    max_documents: int = Field(1000, ge=1, description="Documents (passages) per request.")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Request body size, checked before the body is parsed (413)."
    )
    max_document_chars: int = Field(200_000, ge=1, description="Characters per document text.")
    max_query_chars: int = Field(20_000, ge=1, description="Characters in the query.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Bytes per decoded image (413).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Pixels (width x height) per image (413).")
    max_images_per_request: int = Field(64, ge=0, description="Images per request.")
    docs_per_chunk: int = Field(
        32,
        ge=1,
        description="A request's documents are scored in chunks of at most this many, so a large request "
        "spreads over replicas and shares batches with small ones.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Scoring that has not finished after this long is cancelled (504). A last resort against "
        "stuck work, not a latency target: requests wait in first-in-first-out queues, so under a sustained "
        "load whose latency exceeds the limit every request would time out after using its share of the "
        "machine, and none would succeed. A client that disconnects cancels its request's queued work anyway.",
    )
    max_chunks_in_flight: int = Field(
        16,
        ge=1,
        description="Chunks of one request sent to the preprocess and scorer replicas at once; the rest wait "
        "in the ingress. A request that times out or fails then leaves at most this many calls behind (a busy "
        "replica may start queued calls before their cancellation reaches it), and one huge request cannot "
        "flood the queues ahead of small ones.",
    )


class AuthArgs(_Strict):
    """API keys. The keys themselves never live in this file."""

    api_keys_env: str | None = Field(
        "RERANK_API_KEYS",
        description="Environment variable holding accepted Bearer keys, comma- or newline-separated.",
    )
    api_keys_file: str | None = Field(
        None, description="File holding accepted Bearer keys, one per line (e.g. a mounted Kubernetes Secret)."
    )
    reload_s: float = Field(5.0, gt=0, description="How often the keys file is checked for changes (seconds).")


class HttpArgs(_Strict):
    cors_allow_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty = CORS off (the default)."
    )


class AppArgs(_Strict):
    """The ``args`` of the application in serve_config.yaml, passed to ``deployments.app:build_app``."""

    models: list[ModelArgs] = Field(..., min_length=1, description="Served models; the first is the default.")
    default_model: str | None = Field(
        None, description="Model id used when a request names none (default: the first model)."
    )
    accelerator: Literal["auto", "gpu", "cpu"] = Field(
        "auto",
        description="auto: ask for GPUs only when the Ray cluster has some at deploy time (so the same file runs "
        "on a laptop); gpu: always (KubeRay with an autoscaling GPU group); cpu: never.",
    )
    ingress: DeploymentArgs = Field(
        default_factory=lambda: DeploymentArgs(num_replicas=None, autoscaling=AutoscalingArgs(max_replicas=2)),
        description="The HTTP ingress replicas.",
    )
    limits: LimitsArgs = Field(default_factory=LimitsArgs, description="Request limits.")
    auth: AuthArgs = Field(default_factory=AuthArgs, description="Where API keys come from.")
    http: HttpArgs = Field(default_factory=HttpArgs, description="HTTP behaviour (CORS).")
    log_requests: bool = Field(True, description="One structured log line per request (never text or keys).")

    @model_validator(mode="after")
    def _unique(self) -> "AppArgs":
        seen: dict[str, str] = {}
        for m in self.models:
            for i in m.all_ids:
                if i in seen:
                    raise ValueError(f"model id or alias {i!r} is used twice")
                seen[i] = m.id
        names = [m.deployment_name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model deployment names must differ: {names}; set `name` on each model")
        if self.default_model and self.default_model not in seen:
            raise ValueError(f"default_model {self.default_model!r} is not a served model id")
        return self

    def model_for(self, requested: str | None) -> ModelArgs | None:
        wanted = requested or self.default_model or self.models[0].id
        for m in self.models:
            if wanted in m.all_ids:
                return m
        return None


def to_serve_autoscaling(a: AutoscalingArgs, target: float) -> dict[str, Any]:
    return {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "initial_replicas": a.initial_replicas,
        "target_ongoing_requests": a.target_ongoing_requests or target,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
    }
