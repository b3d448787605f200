"""Tokenizing (query, document) pairs: prompts, BOS, truncation, long-document chunks.

The checkpoint's ``tokenizer.json`` is loaded with the ``tokenizers`` library as published (BPE,
pre-tokenizer, non-special added tokens such as ``assistant``), except that the special tokens are taken
out of its added vocabulary and the post-processor is dropped: ``<|begin_of_text|>``, ``<|eot_id|>``,
``<img>`` or ``<IMG_CONTEXT>`` typed by a user are tokenized as the plain text they are, exactly as if they
had no special meaning. BOS and the image block are put in as ids, read from the special-token list.

Truncation (``truncate``):

* ``END`` (default): the query keeps at most ``query_budget`` tokens, then the pair is cut from the right
  (the passage tail goes first) to ``max_length`` tokens, BOS included - the reference's right truncation.
* ``NONE``: a pair over ``max_length`` is an error naming both lengths.
* ``CHUNK``: a long passage is split into overlapping windows that each fit; the pair's score is the max
  over its windows (Cohere's hosted behaviour).

``max_tokens_per_doc`` cuts the passage itself to that many tokens before any of the above.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Encoding, Tokenizer

from .errors import CheckpointError, InputTooLong, InvalidInput
from .prompts import IMG_CONTEXT, IMG_END, IMG_START, PASSAGE_PREFIX, QUESTION_PREFIX, text_prompt

TRUNCATE_MODES = ("END", "NONE", "CHUNK")


def normalize_truncate(value: str | None) -> str:
    """Accept ``END``/``NONE``/``CHUNK`` in any case (``None`` = ``END``); ``START`` is not offered."""
    mode = (value or "END").upper()
    if mode not in TRUNCATE_MODES:
        raise InvalidInput(f"truncate must be one of {', '.join(TRUNCATE_MODES)}, got {value!r}", param="truncate")
    return mode


def check_text(text: str, what: str, param: str | None = None) -> None:
    """A clear error for strings that are not Unicode text: JSON (an HTTP body, a JSONL batch file) may
    carry lone surrogates (``"\\ud800"``), which the tokenizer rejects with a bare ``TypeError``."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode text (it contains a lone surrogate)", param=param) from None


@dataclass
class EncodedPairs:
    """Token ids of every pair, flat, plus what the caller needs to map scores back.

    ``ids`` is int32 [sum(lengths)]; pair i is ``ids[offsets[i]:offsets[i]+lengths[i]]``. A document split
    into chunks owns several pairs: ``doc_index[i]`` says which document pair i belongs to.
    """

    ids: np.ndarray
    lengths: np.ndarray
    doc_index: np.ndarray
    num_docs: int
    truncated: list[int] = field(default_factory=list)  # documents cut to fit
    query_truncated: bool = False
    # (document index or None for the query, what happened): rendered by ``warnings``
    notes: list[tuple[int | None, str]] = field(default_factory=list)
    # VL only: uint8 image tiles [sum(num_tiles), S, S, 3] of every pair, pair after pair; num_tiles [pairs]
    tiles: np.ndarray | None = None
    num_tiles: np.ndarray | None = None

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def pair(self, i: int) -> np.ndarray:
        o = int(self.offsets[i])
        return self.ids[o : o + int(self.lengths[i])]

    def warnings(self, doc_offset: int = 0) -> list[str]:
        """Human-readable notes; ``doc_offset`` shifts document numbers (for a chunk of a larger request)."""
        return [msg if i is None else f"document {i + doc_offset} {msg}" for i, msg in self.notes]

    def pair_tiles(self, i: int) -> np.ndarray | None:
        """Pair i's tiles [T, S, S, 3], or None for a text-only pair."""
        if self.tiles is None or self.num_tiles is None or not self.num_tiles[i]:
            return None
        start = int(self.num_tiles[:i].sum())
        return self.tiles[start : start + int(self.num_tiles[i])]

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())


class PromptTokenizer:
    """Builds token ids for reranker pairs from a checkpoint's tokenizer files."""

    def __init__(self, path: str, max_length: int = 8192, query_budget: int | None = None, parallel: bool = False):
        """``parallel``: tokenize a request's prompts on the tokenizers library's thread pool. Off by
        default: in a serving process its idle workers spin and took a quarter of a core from the model
        on a 2-core machine; scale preprocessing with replicas instead."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise CheckpointError(f"tokenizer.json not found in {path}")
        with open(tok_file, encoding="utf-8") as f:
            spec = json.load(f)
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = {}
        if os.path.exists(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                cfg = json.load(f)
        plain = dict(spec)
        plain["added_tokens"] = [t for t in spec.get("added_tokens", []) if not t.get("special")]
        plain["post_processor"] = None
        plain["truncation"] = None
        plain["padding"] = None
        self.plain = Tokenizer.from_str(json.dumps(plain))
        self.special_ids = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
        self.bos_id = self._special_id(cfg, "bos_token", "<|begin_of_text|>")
        if self.bos_id is None:
            raise CheckpointError(f"{path}: the tokenizer has no BOS token")
        self.pad_id = self._special_id(cfg, "pad_token", "<|end_of_text|>")
        self.img_start_id = self.special_ids.get(IMG_START)
        self.img_end_id = self.special_ids.get(IMG_END)
        self.img_context_id = self.special_ids.get(IMG_CONTEXT)
        self.vocab_size = max([self.plain.get_vocab_size(with_added_tokens=True), *self.special_ids.values()]) + 1
        self.max_length = max_length
        self.query_budget = query_budget
        self.parallel = parallel

    def _special_id(self, cfg: dict, key: str, fallback: str) -> int | None:
        value = cfg.get(key, fallback)
        if isinstance(value, dict):
            value = value.get("content")
        return self.special_ids.get(value) if value else None

    # -- small helpers -------------------------------------------------------------------------------
    def encode_plain(self, text: str) -> Encoding:
        return self.plain.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self.encode_plain(text).ids)

    def _cut_text(self, text: str, n_tokens: int) -> tuple[str, bool]:
        """The longest prefix of ``text`` made of its first ``n_tokens`` tokens."""
        enc = self.encode_plain(text)
        if len(enc.ids) <= n_tokens:
            return text, False
        if n_tokens <= 0:
            return "", True
        return text[: enc.offsets[n_tokens][0]], True

    def _budget(self, max_length: int) -> int:
        return self.query_budget if self.query_budget is not None else max_length // 2

    def _fit_query(
        self, query: str, max_length: int, truncate: str, notes: list[tuple[int | None, str]]
    ) -> tuple[str, bool]:
        budget = self._budget(max_length)
        q_len = self.count_tokens(query)
        if q_len <= budget:
            return query, False
        if truncate == "NONE":
            raise InputTooLong(
                f"Query length {q_len} exceeds the query budget of {budget} tokens (truncate is NONE)", param="query"
            )
        notes.append((None, f"query truncated to {budget} tokens"))
        return self._cut_text(query, budget)[0], True

    # -- text pairs ----------------------------------------------------------------------------------
    def encode_text_pairs(
        self,
        query: str,
        documents: list[str],
        truncate: str = "END",
        max_length: int | None = None,
        max_tokens_per_doc: int | None = None,
        chunk_overlap: float = 0.125,
        max_chunks: int | None = None,
        prefix_ids: list[list[int]] | None = None,
    ) -> EncodedPairs:
        """Token ids for ``question:{query} \\n \\n passage:{doc}`` with BOS, for every document.

        ``prefix_ids`` (VL): ids inserted after BOS for each document (an image block), never truncated;
        when given for a document, its prompt text starts with a space (`` question:``).
        """
        truncate = normalize_truncate(truncate)
        check_text(query, "query", "query")
        for i, d in enumerate(documents):
            check_text(d, f"document {i}", "documents")
        max_length = int(max_length or self.max_length)
        notes: list[tuple[int | None, str]] = []
        query, q_cut = self._fit_query(query, max_length, truncate, notes)
        n = len(documents)
        prefix_ids = prefix_ids or [[] for _ in range(n)]
        truncated: list[int] = []
        if max_tokens_per_doc is not None:
            cut_docs = []
            for i, d in enumerate(documents):
                d2, cut = self._cut_text(d, int(max_tokens_per_doc))
                if cut:
                    truncated.append(i)
                    notes.append((i, f"truncated to max_tokens_per_doc={max_tokens_per_doc} tokens"))
                cut_docs.append(d2)
            documents = cut_docs
        prompts = [(" " if prefix_ids[i] else "") + text_prompt(query, d) for i, d in enumerate(documents)]
        if self.parallel:
            encs = self.plain.encode_batch(prompts, add_special_tokens=False)
        else:
            encs = [self.plain.encode(p, add_special_tokens=False) for p in prompts]
        pieces: list[list[int]] = []
        doc_index: list[int] = []
        for i, enc in enumerate(encs):
            head = [self.bos_id, *prefix_ids[i]]
            total = len(head) + len(enc.ids)
            if total <= max_length:
                pieces.append(head + enc.ids)
                doc_index.append(i)
                continue
            if len(head) > max_length:
                raise InputTooLong(
                    f"document {i}: its image block takes {len(head)} tokens, more than the maximum of "
                    f"{max_length}; send a smaller image, fewer tiles, or raise the model's max_tokens",
                    param="documents",
                )
            if truncate == "NONE":
                raise InputTooLong(
                    f"Input length {total} exceeds maximum allowed token size {max_length} (document {i})",
                    param="documents",
                )
            if truncate == "END":
                pieces.append((head + enc.ids)[:max_length])
                doc_index.append(i)
                truncated.append(i)
                notes.append((i, f"truncated to {max_length} tokens"))
                continue
            chunks = self._chunks(query, documents[i], head, max_length, chunk_overlap, bool(prefix_ids[i]))
            if max_chunks is not None and len(chunks) > max_chunks:
                chunks = chunks[:max_chunks]
                notes.append((i, f"scored on its first {max_chunks} chunks only (max_chunks_per_doc)"))
            for chunk in chunks:
                pieces.append(chunk)
                doc_index.append(i)
            notes.append((i, f"split into {doc_index.count(i)} chunks of at most {max_length} tokens"))
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int32, count=len(pieces))
        # chain.from_iterable feeds fromiter from C: 146 us for 32 pieces of 300 ids where a nested generator
        # took 258 (the ingress tokenizes every text request)
        ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lengths.sum()))
        return EncodedPairs(
            ids=ids,
            lengths=lengths,
            doc_index=np.asarray(doc_index, dtype=np.int32),
            num_docs=n,
            truncated=sorted(set(truncated)),
            query_truncated=q_cut,
            notes=notes,
        )

    def _fixed_len(self, query: str, leading_space: bool) -> int:
        """Tokens of the prompt without any passage text (BOS and image block excluded)."""
        return len(self.encode_plain((" " if leading_space else "") + QUESTION_PREFIX + query + PASSAGE_PREFIX).ids)

    def _chunks(
        self, query: str, passage: str, head: list[int], max_length: int, overlap: float, leading_space: bool
    ) -> list[list[int]]:
        """Overlapping passage windows whose full prompts fit in ``max_length`` tokens."""
        room = max_length - len(head) - self._fixed_len(query, leading_space) - 2  # 2: merges across the seam
        room = max(room, 1)
        enc = self.encode_plain(passage)
        offsets = enc.offsets
        stride = max(1, room - int(room * overlap))
        out = []
        start = 0
        pre = " " if leading_space else ""
        while True:
            end = min(start + room, len(offsets))
            text = passage[offsets[start][0] : offsets[end - 1][1]]
            ids = self.encode_plain(pre + text_prompt(query, text)).ids
            out.append((head + ids)[:max_length])
            if end >= len(offsets):
                return out
            start += stride
