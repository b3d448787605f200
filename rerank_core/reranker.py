"""The public Python API: ``load_reranker(source) -> Reranker`` with ``score`` and ``rerank``.

The work is split in three steps that the Serve deployments and Ray Data reuse:

* ``encode`` (CPU): prompts, tokens, truncation -> ``EncodedPairs``;
* ``forward_rows`` (GPU or CPU): token rows packed under a token budget -> float32 logits per row (the
  text model packs real tokens without padding; see ``models.llama_bidirectional``);
* ``finalize``: per-pair logits -> per-document logits (max over a document's chunks).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .batching import PackPlan, pack_varlen, pad_ids
from .checkpoint import load_state_dict_strict, resolve_source
from .config import CheckpointInfo, read_checkpoint_config
from .errors import InvalidInput
from .tokenization import EncodedPairs, PromptTokenizer

log = logging.getLogger("rerank_core")

DEFAULT_MAX_LENGTH = {"text": 8192, "vl": 10240}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def sigmoid(x: np.ndarray | Sequence[float]) -> np.ndarray:
    """Numerically stable logistic function in float32."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' was asked for but torch sees no CUDA device", param="device")
    return dev


def with_torch_threads(threads: int | None, fn, *args):
    """``fn(*args)`` with ``threads`` torch threads on the calling thread (None: as they are).

    torch's thread count is per thread once the thread has run parallel work (before that, its first
    parallel op copies the count last set anywhere), so ``get_num_threads`` comes first: it settles this
    thread's own count, which ``set_num_threads`` then changes for this thread alone."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``auto``: bfloat16 on GPU, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidInput(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'", param="dtype") from None


@dataclass(frozen=True)
class RerankResult:
    index: int
    logit: float
    probability: float

    def __iter__(self):  # unpacks as (index, logit, probability)
        return iter((self.index, self.logit, self.probability))


class Reranker:
    """A loaded text cross-encoder. Forward passes hold no state of their own on the object, so several
    threads may run ``forward_rows`` at once (a CPU scorer runs one 1-thread pass per core); changing its
    settings while a pass runs is not safe.

    ``max_batch_tokens``: real tokens per forward pass. ``attention_group_tokens``: padded tokens per
    attention group inside a pass (pairs of close lengths attend as one padded block; only attention
    sees padding). Default: 512 on CPU (tight groups: +8-20% tokens/s over padded passes on 2 AVX2
    cores), 4096 on GPU (fewer, larger kernels).
    """

    kind = "text"

    def __init__(
        self,
        info: CheckpointInfo,
        model: torch.nn.Module | None,
        tokenizer: PromptTokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_tokens: int = 16384,
        apply_temperature: bool = False,
        source: str | None = None,
        attention_group_tokens: int | None = None,
    ):
        self.info = info
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_batch_tokens = max_batch_tokens
        self.apply_temperature = apply_temperature
        self.source = source or info.path
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.attention_group_tokens = int(attention_group_tokens or (512 if device.type == "cpu" else 4096))
        self.cudnn_attention = False  # see _attention_kernels

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    # -- prepare -------------------------------------------------------------------------------------
    def _texts(self, documents: Sequence[Any]) -> list[str]:
        texts = []
        for i, d in enumerate(documents):
            if isinstance(d, str):
                texts.append(d)
            elif isinstance(d, dict) and set(d) <= {"text", "image"} and d.get("image") is None:
                texts.append(d.get("text") or "")
            else:
                raise InvalidInput(
                    f"document {i}: this text model accepts only text documents; images need "
                    "nvidia/llama-nemotron-rerank-vl-1b-v2",
                    param="documents",
                )
        return texts

    def encode(
        self,
        query: str,
        documents: Sequence[Any],
        truncate: str = "END",
        max_length: int | None = None,
        max_tokens_per_doc: int | None = None,
        max_chunks: int | None = None,
    ) -> EncodedPairs:
        if not isinstance(query, str):
            raise InvalidInput("query must be a string", param="query")
        limit = self.max_length if max_length is None else int(max_length)
        if limit < 2:
            raise InvalidInput("max_length must be at least 2", param="max_length")
        return self.tokenizer.encode_text_pairs(
            query,
            self._texts(documents),
            truncate=truncate,
            max_length=limit,
            max_tokens_per_doc=max_tokens_per_doc,
            max_chunks=max_chunks,
        )

    # -- forward -------------------------------------------------------------------------------------
    def plan_rows(self, rows: Sequence[np.ndarray], tiles: Sequence[np.ndarray | None] | None = None) -> PackPlan:
        """Attention groups (longest first) and the forward passes of ``max_batch_tokens`` real tokens
        that hold them (``batching.pack_varlen``)."""
        if tiles is not None and any(t is not None for t in tiles):
            raise InvalidInput("this text model cannot score images", param="documents")
        return pack_varlen([len(r) for r in rows], self.max_batch_tokens, self.attention_group_tokens)

    def forward_rows(
        self,
        rows: Sequence[np.ndarray],
        tiles: Sequence[np.ndarray | None] | None = None,
        plan: PackPlan | None = None,
    ) -> np.ndarray:
        """Float32 logits, one per token row, in input order.

        ``tiles`` (VL model only): per row, its uint8 image tiles [T, S, S, 3] or None. ``plan``: from
        ``plan_rows`` (computed here when not given). A plan with ``passes`` runs packed passes; one
        without (``batching.pack``) runs each micro-batch as a padded tensor.
        """
        if not rows:
            return np.zeros(0, dtype=np.float32)
        tiles = list(tiles) if tiles is not None else [None] * len(rows)
        plan = plan or self.plan_rows(rows, tiles)
        with self._attention_kernels():
            if plan.passes is None:
                outputs = [self._forward_batch([rows[i] for i in b.indices], [tiles[i] for i in b.indices])
                           for b in plan.batches]
            else:
                outputs = []
                for p in plan.passes:
                    outputs.extend(self._forward_pass([[rows[i] for i in plan.batches[k].indices] for k in p]))
        return plan.scatter(outputs)

    def _attention_kernels(self) -> contextlib.AbstractContextManager:
        """On CUDA, attention without cuDNN's kernel: it builds an execution plan for every new attention
        shape, and served traffic brings new shapes all the time (an H100 ran fresh 32-document requests in
        190-250 ms each with it against 59 ms once the shapes had been seen; benchmarks/README.md, GPU run).
        Flash attention and the memory-efficient kernel need no plans. ``cudnn_attention = True`` keeps it."""
        if self.device.type != "cuda" or self.cudnn_attention:
            return contextlib.nullcontext()
        return _WITHOUT_CUDNN_ATTENTION

    @torch.inference_mode()
    def _forward_pass(self, groups: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
        """One packed pass: token rows by attention group -> logits by group."""
        from .models.llama_bidirectional import packed_layout

        layout = packed_layout([[len(r) for r in g] for g in groups], self.device)
        ids = np.concatenate([r for g in groups for r in g]).astype(np.int64, copy=False)
        logits = self.model.forward_packed(self._to_device(ids), layout, apply_temperature=self.apply_temperature)
        flat = logits.float().cpu().numpy()
        return np.split(flat, np.cumsum([len(g) for g in groups])[:-1])

    @torch.inference_mode()
    def _forward_batch(self, rows: Sequence[np.ndarray], tiles: Sequence[np.ndarray | None]) -> np.ndarray:
        ids, mask = pad_ids(rows, self.pad_id)
        ids_t, mask_t = self._to_device(ids), self._to_device(mask)
        logits = self.model(ids_t, mask_t, apply_temperature=self.apply_temperature)
        return logits.float().cpu().numpy()

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def fuse_elementwise(self) -> bool:
        """Compile the elementwise steps of packed passes (each residual add with the norm after it, rotary,
        SwiGLU) into fused kernels with inductor; matmuls and attention stay as they are. For CPU scorers:
        +3.5-4.6% tokens/s in single-thread passes of the benchmark model (hidden 256), and +4-7% in the service
        with tcmalloc preloaded; with glibc's malloc the fresh output buffers cost more than the fusion saves
        when passes run side by side (benchmarks/README.md).

        Compiles now, in one small pass. Inductor needs a C++ compiler on CPU: without one, or on any compile
        error, this logs why and stays eager. True when the fused kernels are in use."""
        from .models.llama_bidirectional import compile_elementwise, reset_elementwise

        if compile_elementwise(self.model) == 0:
            return False
        t0 = time.monotonic()
        try:
            self.forward_encoded(self.encode("warm up", ["fused", "elementwise kernels", "of a packed pass here"]))
        except Exception as e:  # noqa: BLE001 - a missing compiler shows up as one of many exception types
            reset_elementwise(self.model)
            log.warning("could not compile the elementwise kernels (%s: %s); running eager",
                        type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
            return False
        log.info("elementwise kernels compiled in %.1f s", time.monotonic() - t0)
        return True

    def forward_encoded(self, enc: EncodedPairs) -> np.ndarray:
        n = len(enc.lengths)
        rows = [enc.pair(i) for i in range(n)]
        tiles = None if enc.tiles is None else [enc.pair_tiles(i) for i in range(n)]
        return self.forward_rows(rows, tiles)

    # -- finalize ------------------------------------------------------------------------------------
    @staticmethod
    def finalize(enc: EncodedPairs, pair_logits: np.ndarray) -> np.ndarray:
        """Per-document logits: a chunked document scores the max over its chunks."""
        out = np.full(enc.num_docs, -np.inf, dtype=np.float32)
        np.maximum.at(out, enc.doc_index, np.asarray(pair_logits, dtype=np.float32))
        return out

    # -- public API ----------------------------------------------------------------------------------
    def score(
        self,
        query: str,
        documents: Sequence[Any],
        truncate: str = "END",
        max_length: int | None = None,
        max_tokens_per_doc: int | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """Raw logits, one per document, in input order."""
        if not documents:
            return []
        enc = self.encode(query, documents, truncate, max_length, max_tokens_per_doc, **kwargs)
        return [float(x) for x in self.finalize(enc, self.forward_encoded(enc))]

    def rerank(
        self, query: str, documents: Sequence[Any], top_n: int | None = None, **kwargs: Any
    ) -> list[RerankResult]:
        """Documents sorted by descending logit as ``(index, logit, probability)``; ``top_n`` keeps the best."""
        logits = np.asarray(self.score(query, documents, **kwargs), dtype=np.float32)
        probs = sigmoid(logits)
        order = np.argsort(-logits, kind="stable")
        if top_n:
            order = order[: int(top_n)]
        return [RerankResult(int(i), float(logits[i]), float(probs[i])) for i in order]


class _WithoutCudnnAttention:
    """Turns torch's cuDNN attention off while any forward pass of this process is inside, and back to what it
    was when the last one leaves. The switch is process-wide (torch keeps no per-thread choice), so passes on
    several threads share one count instead of each restoring the flag under the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was = True

    def __enter__(self) -> None:
        with self._lock:
            if self._inside == 0:
                self._was = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0:
                torch.backends.cuda.enable_cudnn_sdp(self._was)


_WITHOUT_CUDNN_ATTENTION = _WithoutCudnnAttention()


def build_model(info: CheckpointInfo, dtype: torch.dtype) -> torch.nn.Module:
    """The module for a checkpoint, weights loaded strictly, in ``dtype`` (head in float32)."""
    if info.kind == "text":
        from .models.llama_bidirectional import LlamaBidirectionalForSequenceClassification

        with torch.device("meta"):
            model = LlamaBidirectionalForSequenceClassification(info.config)
        load_state_dict_strict(model, info.path, dtype=dtype, keep_float32=lambda k: k == "score.weight")
        return model.eval()
    from .models.nemotron_vl import build_vl_model

    return build_vl_model(info, dtype)


def load_reranker(
    source: str,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    max_length: int | None = None,
    max_batch_tokens: int = 16384,
    apply_temperature: bool = False,
    query_budget: int | None = None,
    load_weights: bool = True,
    **kwargs: Any,
) -> Reranker:
    """Load a reranker from a local checkpoint directory or a Hugging Face hub id.

    ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``. ``dtype``: ``None`` picks
    bfloat16 on GPU and float32 on CPU. ``max_length``: the pair limit (default 8192 text, 10240 VL).
    ``apply_temperature``: divide logits by the config's ``temperature`` (off: see the model module).
    ``load_weights=False`` gives a reranker that can only ``encode`` (CPU preprocessing replicas).
    Other keyword arguments go to the reranker class (VL: ``image_limits``, ``max_batch_tiles``).
    """
    t0 = time.monotonic()
    path = resolve_source(source, revision, weights=load_weights)
    info = read_checkpoint_config(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    log.info("loading %s reranker from %s on %s in %s", info.kind, path, dev, str(dt).replace("torch.", ""))
    limit = int(max_length or DEFAULT_MAX_LENGTH[info.kind])
    tokenizer = PromptTokenizer(path, max_length=limit, query_budget=query_budget)
    model = None
    if load_weights:
        from .models.llama_bidirectional import fuse_projections, script_packed_layers

        model = fuse_projections(build_model(info, dt).to(dev))
        if dev.type == "cpu":
            script_packed_layers(model)  # packed CPU passes without the GIL (see the model module)
    cls = Reranker
    if info.kind == "vl":
        from .vl_reranker import VLReranker

        cls = VLReranker
    r = cls(info, model, tokenizer, dev, dt, max_batch_tokens, apply_temperature, source=source, **kwargs)
    log.info("reranker ready in %.1f s", time.monotonic() - t0)
    return r
