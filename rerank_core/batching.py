"""Packing pairs into micro-batches under a padded-token budget (pure: no torch, no ray).

Pairs are sorted by length (longest first) and taken greedily: a micro-batch grows while
``len(batch) * longest <= max_tokens`` (and the optional pair and image-tile caps hold). Sorting keeps
neighbours close in length, so padding stays small; results are put back in input order by the caller
with ``PackPlan.scatter``. One pair longer than the budget gets a micro-batch of its own.

``pack_varlen`` plans for a model that runs its token-wise layers (projections, MLP, norms) on the real
tokens only, concatenated without padding: micro-batches are then attention groups (padded only inside
attention, and kept small so lengths in a group stay close), and consecutive groups share one forward
pass of at most ``max_tokens`` real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class MicroBatch:
    """Indices (into the packed input) of one forward pass, longest first."""

    indices: tuple[int, ...]
    max_len: int
    real_tokens: int
    tiles: int = 0

    @property
    def padded_tokens(self) -> int:
        return self.max_len * len(self.indices)


@dataclass(frozen=True)
class PackPlan:
    """``batches``: micro-batches (padded tensors, or attention groups of a varlen pass). ``passes``: which
    consecutive batches run in one forward pass (None: each batch is its own pass)."""

    batches: tuple[MicroBatch, ...]
    n: int
    passes: tuple[tuple[int, ...], ...] | None = None

    @property
    def real_tokens(self) -> int:
        return sum(b.real_tokens for b in self.batches)

    @property
    def padded_tokens(self) -> int:
        return sum(b.padded_tokens for b in self.batches)

    @property
    def padding_ratio(self) -> float:
        """Padded tokens over real tokens (1.0 = no padding)."""
        return self.padded_tokens / max(1, self.real_tokens)

    def deal(self, workers: int, by_batch: bool = False) -> list[list[int]]:
        """Row indices for ``workers`` forward threads that run passes side by side: the passes (each
        micro-batch on its own when there are none, or with ``by_batch``), in planned order, each to the thread
        with the fewest tokens so far (the first ``workers`` units to threads 0, 1, ...). Threads left without
        a pass are dropped, so fewer lists may come back."""
        if self.passes is not None and not by_batch:
            groups = self.passes
        else:
            groups = tuple((k,) for k in range(len(self.batches)))
        n = max(1, workers)
        shares: list[list[int]] = [[] for _ in range(n)]
        load = [0] * n
        for p in groups:
            w = min(range(n), key=lambda j: (load[j], j))
            shares[w].extend(i for k in p for i in self.batches[k].indices)
            load[w] += sum(self.batches[k].padded_tokens for k in p)
        return [s for s in shares if s]

    @staticmethod
    def merge(n: int, shares: Sequence[Sequence[int]], parts: Sequence[Sequence[float]]) -> np.ndarray:
        """Outputs of the shares ``deal`` gave (each in its share's row order) -> one float32 array of ``n``
        in input order."""
        out = np.empty(n, dtype=np.float32)
        for idx, values in zip(shares, parts, strict=True):
            out[list(idx)] = values
        return out

    def scatter(self, per_batch: Sequence[Sequence[float]]) -> np.ndarray:
        """Per-micro-batch outputs (in each batch's index order) -> one float32 array in input order."""
        out = np.empty(self.n, dtype=np.float32)
        for batch, values in zip(self.batches, per_batch, strict=True):
            if len(values) != len(batch.indices):
                raise ValueError("a micro-batch returned the wrong number of outputs")
            out[list(batch.indices)] = values
        return out


def pack(
    lengths: Sequence[int],
    max_tokens: int,
    max_pairs: int | None = None,
    tiles: Sequence[int] | None = None,
    max_tiles: int | None = None,
) -> PackPlan:
    """Plan micro-batches for pairs of the given token lengths.

    ``max_tokens`` caps padded tokens (pairs x longest) per micro-batch; ``max_pairs`` caps pairs;
    ``tiles``/``max_tiles`` cap image tiles (VL model). Every input index appears in exactly one batch.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    lengths = np.asarray(lengths, dtype=np.int64)
    tile_counts = np.zeros(len(lengths), dtype=np.int64) if tiles is None else np.asarray(tiles, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[MicroBatch] = []
    current: list[int] = []
    longest = real = tile_sum = 0

    def close() -> None:
        if current:
            batches.append(MicroBatch(tuple(current), int(longest), int(real), int(tile_sum)))

    for i in order.tolist():
        length, t = int(lengths[i]), int(tile_counts[i])
        fits = (
            current
            and (len(current) + 1) * longest <= max_tokens
            and (max_pairs is None or len(current) < max_pairs)
            and (max_tiles is None or tile_sum + t <= max_tiles)
        )
        if not fits:
            close()
            current, longest, real, tile_sum = [], length, 0, 0
        current.append(i)
        real += length
        tile_sum += t
    close()
    return PackPlan(tuple(batches), len(lengths))


def pack_varlen(lengths: Sequence[int], max_tokens: int, group_tokens: int) -> PackPlan:
    """Attention groups of at most ``group_tokens`` padded tokens (``pack``), combined in order into
    forward passes of at most ``max_tokens`` real tokens. A group over the pass budget runs alone."""
    if group_tokens < 1:
        raise ValueError("group_tokens must be positive")
    plan = pack(lengths, min(group_tokens, max_tokens))
    passes: list[tuple[int, ...]] = []
    current: list[int] = []
    real = 0
    for k, b in enumerate(plan.batches):
        if current and real + b.real_tokens > max_tokens:
            passes.append(tuple(current))
            current, real = [], 0
        current.append(k)
        real += b.real_tokens
    if current:
        passes.append(tuple(current))
    return PackPlan(plan.batches, plan.n, tuple(passes))


def pad_ids(rows: Sequence[np.ndarray], pad_id: int, length: int | None = None, left: bool = False):
    """Stack int token rows into ``ids`` int64 [B, L] and ``mask`` int64 [B, L] (1 = real token)."""
    length = length or max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for j, r in enumerate(rows):
        n = len(r)
        if left:
            ids[j, length - n :] = r
            mask[j, length - n :] = 1
        else:
            ids[j, :n] = r
            mask[j, :n] = 1
    return ids, mask
