"""The pure packer: coverage, budgets, order, padding ratio."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rerank_core.batching import pack, pack_varlen, pad_ids


@pytest.mark.parametrize("seed", range(5))
def test_every_index_once_and_budget_held(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1024) for _ in range(rng.randint(1, 400))]
    plan = pack(lengths, max_tokens=8192, max_pairs=64)
    seen = sorted(i for b in plan.batches for i in b.indices)
    assert seen == list(range(len(lengths)))
    for b in plan.batches:
        assert b.max_len == max(lengths[i] for i in b.indices)
        assert b.padded_tokens <= 8192 or len(b.indices) == 1
        assert len(b.indices) <= 64
        assert b.real_tokens == sum(lengths[i] for i in b.indices)
    assert plan.real_tokens == sum(lengths)


@pytest.mark.parametrize("seed", range(5))
def test_varlen_passes_hold_real_tokens_and_groups_stay_in_order(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 1500) for _ in range(rng.randint(1, 300))]
    plan = pack_varlen(lengths, max_tokens=4096, group_tokens=512)
    assert sorted(i for b in plan.batches for i in b.indices) == list(range(len(lengths)))
    assert [k for p in plan.passes for k in p] == list(range(len(plan.batches)))  # every group once, in order
    for b in plan.batches:
        assert b.padded_tokens <= 512 or len(b.indices) == 1
    for p in plan.passes:
        real = sum(plan.batches[k].real_tokens for k in p)
        assert real <= 4096 or len(p) == 1
    # attention groups of 512 padded tokens keep padding far below passes padded as a whole
    assert plan.padding_ratio <= pack(lengths, 4096).padding_ratio + 1e-9


def test_plain_plan_runs_each_batch_as_a_pass():
    plan = pack([3, 2, 9], max_tokens=9)
    assert plan.passes is None and [b.indices for b in plan.batches] == [(2,), (0, 1)]  # [9], [3, 2]


def test_oversized_item_gets_its_own_batch():
    plan = pack([10, 5000, 20], max_tokens=1000)
    assert any(b.indices == (1,) for b in plan.batches)


def test_scatter_restores_input_order():
    lengths = [5, 300, 17, 300, 2, 99]
    plan = pack(lengths, max_tokens=320)
    outs = [[float(lengths[i]) for i in b.indices] for b in plan.batches]
    assert plan.scatter(outs).tolist() == [float(x) for x in lengths]


def test_mixed_lengths_padding_ratio_is_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(64, 1025, size=512)
    plan = pack(lengths.tolist(), max_tokens=16384)
    assert plan.padding_ratio <= 1.10
    naive = sum(max(lengths[i : i + 32]) * len(lengths[i : i + 32]) for i in range(0, 512, 32))
    assert naive / lengths.sum() > plan.padding_ratio


def test_tile_budget():
    plan = pack([10] * 8, max_tokens=10_000, tiles=[7, 7, 1, 0, 7, 3, 0, 7], max_tiles=10)
    for b in plan.batches:
        assert b.tiles <= 10 or len(b.indices) == 1


def test_pad_ids_left_and_right():
    rows = [np.array([1, 2, 3]), np.array([4])]
    ids, mask = pad_ids(rows, pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_ids(rows, pad_id=9, left=True)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_deal_hands_passes_to_the_least_loaded_forward_thread():
    from rerank_core.batching import pack, pack_varlen

    lengths = [300, 40, 250, 90, 500, 60, 120, 30, 410, 75]
    plan = pack_varlen(lengths, 600, 600)
    assert plan.passes is not None and len(plan.passes) >= 3
    shares = plan.deal(2)
    assert len(shares) == 2
    assert sorted(i for s in shares for i in s) == list(range(len(lengths)))  # every row once
    first = [i for k in plan.passes[0] for i in plan.batches[k].indices]
    second = [i for k in plan.passes[1] for i in plan.batches[k].indices]
    assert shares[0][: len(first)] == first and shares[1][: len(second)] == second  # first passes: 0, 1
    pass_tokens = [sum(plan.batches[k].padded_tokens for k in p) for p in plan.passes]
    real = [sum(lengths[i] for i in s) for s in shares]
    assert max(real) - min(real) <= max(pass_tokens)  # balanced to within one pass
    assert plan.deal(50) == [[i for k in p for i in plan.batches[k].indices] for p in plan.passes]  # no empties
    assert plan.deal(1) == [[i for p in plan.passes for k in p for i in plan.batches[k].indices]]
    padded = pack(lengths, 600)  # no passes: each micro-batch is one
    assert sorted(i for s in padded.deal(3) for i in s) == list(range(len(lengths)))
    assert len(padded.deal(3)) == min(3, len(padded.batches))


def test_deal_by_batch_hands_out_micro_batches_and_merge_puts_outputs_back():
    from rerank_core.batching import PackPlan, pack_varlen

    lengths = [300, 40, 250, 90, 500, 60, 120, 30, 410, 75]
    plan = pack_varlen(lengths, 4096, 256)  # one pass of several attention groups
    assert len(plan.passes) == 1 and len(plan.batches) > 2
    assert plan.deal(2) == [[i for b in plan.batches for i in b.indices]]  # by pass: a single share
    shares = plan.deal(2, by_batch=True)
    assert len(shares) == 2 and sorted(i for s in shares for i in s) == list(range(len(lengths)))
    padded = [sum(b.padded_tokens for b in plan.batches if b.indices[0] in s) for s in shares]
    assert abs(padded[0] - padded[1]) <= max(b.padded_tokens for b in plan.batches)  # balanced within a group
    parts = [[float(lengths[i]) for i in s] for s in shares]
    assert PackPlan.merge(len(lengths), shares, parts).tolist() == [float(x) for x in lengths]
