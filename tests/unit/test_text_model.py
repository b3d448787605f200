"""Numerical evidence for the text cross-encoder: parity with a reference, batching and padding invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_core import load_reranker
from rerank_core.batching import pack, pack_varlen, pad_ids
from rerank_core.models.llama_bidirectional import packed_layout

QUERY = "how much protein should a female eat?"
DOCS = [
    "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day. "
    "But, as you can see from this chart, you'll need to increase that if you're expecting or training for a marathon.",
    "Definition of summit for English Language Learners. : 1  the highest point of a mountain : the top of a mountain.",
    "Calorie intake should not fall below 1,200 a day in women or 1,500 a day in men.",
]
MULTILINGUAL = [
    "Eiweiß: Frauen brauchen etwa 46 Gramm pro Tag.",
    "女性每天应摄入约46克蛋白质。",
    "تحتاج المرأة إلى حوالي 46 غرامًا من البروتين يوميًا.",
    "Белок: женщинам нужно около 46 граммов в день. 🥚🍗",
    "protein",
    "",
]


@pytest.fixture(scope="module")
def reference(tiny_text):
    from tests.reference import ReferenceTextReranker

    return ReferenceTextReranker(tiny_text)


@pytest.mark.parametrize(
    "query,docs,max_length",
    [
        (QUERY, DOCS, 8192),
        (QUERY, MULTILINGUAL, 8192),
        ("protein", ["protein"], 8192),
        (QUERY, [DOCS[0] * 6, DOCS[1], DOCS[2] * 3], 64),
        (QUERY, [DOCS[0] * 6, DOCS[1], DOCS[2] * 3], 128),
        ("女性蛋白质需求", [d * (k + 1) for k, d in enumerate(DOCS + MULTILINGUAL)], 8192),
    ],
    ids=["card-example", "multilingual", "single-word", "truncate-64", "truncate-128", "mixed-lengths"],
)
def test_parity_with_reference(text_reranker, reference, query, docs, max_length):
    mine = np.array(text_reranker.score(query, docs, max_length=max_length))
    ref = np.array(reference.score_pairs(query, docs, max_length=max_length))
    assert np.abs(ref).max() > 0.05, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=0)


def test_tokens_match_transformers_tokenizer(text_reranker, reference):
    """Our prompt ids equal transformers' tokenization of the template (BOS, no EOS, right truncation)."""
    for max_length in (8192, 64, 17):
        enc = text_reranker.encode(QUERY, DOCS + MULTILINGUAL, max_length=max_length)
        for i, d in enumerate(DOCS + MULTILINGUAL):
            ref = reference.tokenizer(
                f"question:{QUERY} \n \n passage:{d}", truncation=True, max_length=max_length
            )["input_ids"]
            assert enc.pair(i).tolist() == ref


def test_batched_equals_single(text_reranker):
    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)]
    batched = text_reranker.score(QUERY, docs)
    single = [text_reranker.score(QUERY, [d])[0] for d in docs]
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_forward_on_two_threads_at_once_equals_one_at_a_time(text_reranker):
    """A CPU scorer runs several forward passes of one model at once, one per thread: nothing in a pass
    may leak into another."""
    from concurrent.futures import ThreadPoolExecutor

    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)]
    enc = text_reranker.encode(QUERY, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    jobs = [rows[k::3] for k in range(3)] * 4  # three different batches, each run four times
    alone = [text_reranker.forward_rows(j) for j in jobs[:3]]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(text_reranker.forward_rows, jobs))
    for k, got in enumerate(together):
        np.testing.assert_allclose(got, alone[k % 3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("group_tokens,pass_tokens", [(16, 64), (64, 300), (512, 4096), (1 << 20, 1 << 20)])
def test_packed_passes_equal_padded_batches(text_reranker, group_tokens, pass_tokens):
    """Real tokens only through the matmuls, padding only inside attention groups: same logits as padded
    batches. Duplicated documents make groups without any padding (the no-gather path)."""
    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)] + DOCS + DOCS
    enc = text_reranker.encode(QUERY, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    lengths = [len(r) for r in rows]
    padded = text_reranker.forward_rows(rows, plan=pack(lengths, 1 << 20))
    plan = pack_varlen(lengths, pass_tokens, group_tokens)
    assert plan.passes is not None
    packed = text_reranker.forward_rows(rows, plan=plan)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=0)


def test_packed_layout_points_at_the_right_tokens():
    layout = packed_layout([[5, 3], [2, 2]])
    assert layout.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 0, 1]
    assert layout.segment.tolist() == [0] * 5 + [1] * 3 + [2] * 2 + [3] * 2
    first, second = layout.groups
    assert (first.start, first.end, first.b, first.length) == (0, 8, 2, 5)
    assert first.gather.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 5, 5]]  # pad slots repeat the row's first token
    assert first.real.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert first.key_mask[:, 0, 0].tolist() == [[True] * 5, [True, True, True, False, False]]
    assert (second.start, second.end, second.gather, second.key_mask) == (8, 12, None, None)
    with pytest.raises(ValueError):
        packed_layout([[3, 0]])


def test_tiny_token_budget_equals_large(tiny_text):
    """Splitting into many micro-batches (budget of one pair each) changes nothing."""
    small = load_reranker(tiny_text, device="cpu", max_batch_tokens=1)
    large = load_reranker(tiny_text, device="cpu", max_batch_tokens=1 << 20)
    docs = DOCS + MULTILINGUAL
    np.testing.assert_allclose(small.score(QUERY, docs), large.score(QUERY, docs), atol=1e-5, rtol=0)


def test_left_or_right_padding_changes_nothing(text_reranker):
    enc = text_reranker.encode(QUERY, DOCS + MULTILINGUAL)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    out = {}
    for left in (False, True):
        ids, mask = pad_ids(rows, text_reranker.pad_id, length=max(map(len, rows)) + 7, left=left)
        with torch.inference_mode():
            out[left] = text_reranker.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    alone = np.array([text_reranker.forward_rows([r])[0] for r in rows])
    np.testing.assert_allclose(out[False], out[True], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[False], alone, atol=1e-5, rtol=0)


def test_pad_token_values_do_not_leak(text_reranker):
    """Whatever id sits under the padding, the logit is the same."""
    enc = text_reranker.encode(QUERY, DOCS)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    results = []
    for pad in (0, 5, text_reranker.pad_id):
        ids, mask = pad_ids(rows, pad)
        with torch.inference_mode():
            results.append(text_reranker.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy())
    np.testing.assert_allclose(results[0], results[1], atol=1e-6)
    np.testing.assert_allclose(results[0], results[2], atol=1e-6)


def test_temperature_not_applied_by_default(tiny_text):
    """The config says temperature 0.2; the published references return the undivided head output."""
    default = load_reranker(tiny_text, device="cpu")
    assert default.info.config.temperature == pytest.approx(0.2)
    divided = load_reranker(tiny_text, device="cpu", apply_temperature=True)
    a = np.array(default.score(QUERY, DOCS))
    b = np.array(divided.score(QUERY, DOCS))
    np.testing.assert_allclose(b, a / 0.2, rtol=1e-5, atol=1e-6)


def test_rerank_sorts_and_applies_sigmoid(text_reranker):
    logits = text_reranker.score(QUERY, DOCS + MULTILINGUAL)
    ranked = text_reranker.rerank(QUERY, DOCS + MULTILINGUAL)
    assert [r.index for r in ranked] == list(np.argsort(-np.array(logits), kind="stable"))
    for idx, logit, prob in ranked:
        assert logit == pytest.approx(logits[idx], abs=1e-6)
        assert prob == pytest.approx(1 / (1 + np.exp(-logit)), rel=1e-5)
    assert len(text_reranker.rerank(QUERY, DOCS, top_n=2)) == 2


def test_bf16_runs_and_stays_close(tiny_text):
    """bf16 trunk with float32 pooling and head: close to float32 on a tiny model."""
    r32 = load_reranker(tiny_text, device="cpu", dtype="float32")
    r16 = load_reranker(tiny_text, device="cpu", dtype="bfloat16")
    assert r16.model.score.weight.dtype == torch.float32
    assert r16.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    a, b = np.array(r32.score(QUERY, DOCS)), np.array(r16.score(QUERY, DOCS))
    assert np.abs(a - b).max() < 0.25


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (4096, 256)])
def test_cpu_rmsnorm_equals_the_fused_op(shape):
    """The CPU RMSNorm (one norm reduction, two products) equals torch's rms_norm in float32."""
    from rerank_core.models.llama_bidirectional import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1]) + 0.5)
    x = torch.randn(shape) * 3
    want = torch.nn.functional.rms_norm(x, (shape[-1],), norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), want, atol=2e-6, rtol=2e-6)
    tiny = torch.full((1, shape[-1]), 1e-4)  # eps dominates: both must agree there too
    torch.testing.assert_close(norm(tiny), torch.nn.functional.rms_norm(tiny, (shape[-1],), norm.weight, 1e-5))


def test_fused_elementwise_passes_equal_the_modules(tiny_text):
    """Packed passes through the fused elementwise path (each residual add with the norm after it, rotary,
    SwiGLU): the plain expressions, and the same compiled by inductor, give the modules' logits."""
    from torch._dynamo.utils import counters

    from rerank_core.batching import pack_varlen
    from rerank_core.models.llama_bidirectional import _set_ops, eager_elementwise

    r = load_reranker(tiny_text, device="cpu")
    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)]
    enc = r.encode(QUERY, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    plan = pack_varlen([len(x) for x in rows], 256, 128)
    want = r.forward_rows(rows, plan=plan)
    assert _set_ops(r.model, eager_elementwise()) == 1
    np.testing.assert_allclose(r.forward_rows(rows, plan=plan), want, atol=1e-5, rtol=0)
    torch._dynamo.reset()  # forget kernels compiled earlier in this process, so compiling them shows below
    graphs = counters["stats"]["unique_graphs"]
    assert r.fuse_elementwise()
    assert counters["stats"]["unique_graphs"] >= graphs + 4  # the four kernels compiled: the fused path ran
    np.testing.assert_allclose(r.forward_rows(rows, plan=plan), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.score(QUERY, docs[:1]), r.score(QUERY, docs)[:1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scripted_packed_passes_equal_eager_bit_for_bit(tiny_text, dtype):
    """CPU packed passes run their layers as one TorchScript call (on by default): the same ATen ops in the
    same order as the eager modules, so the same logits to the bit, with and without padded groups."""
    from rerank_core.models.llama_bidirectional import script_packed_layers

    r = load_reranker(tiny_text, device="cpu", dtype=dtype)
    assert r.model.model.scripted  # load_reranker scripts CPU models
    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)] + DOCS + DOCS
    enc = r.encode(QUERY, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    lengths = [len(x) for x in rows]
    for group_tokens, pass_tokens in [(16, 64), (128, 256), (512, 4096), (1 << 20, 1 << 20)]:
        plan = pack_varlen(lengths, pass_tokens, group_tokens)
        scripted = r.forward_rows(rows, plan=plan)
        assert script_packed_layers(r.model, False) == 1
        eager = r.forward_rows(rows, plan=plan)
        script_packed_layers(r.model)
        np.testing.assert_array_equal(scripted, eager)


def test_scripted_passes_do_not_call_the_eager_layers(tiny_text, monkeypatch):
    """With scripting on, a packed pass never enters the Python layer modules (that is what frees the GIL);
    with it off, it does."""
    from rerank_core.models.llama_bidirectional import DecoderLayer, script_packed_layers

    r = load_reranker(tiny_text, device="cpu")
    calls = []
    eager = DecoderLayer.forward_packed
    monkeypatch.setattr(DecoderLayer, "forward_packed", lambda self, *a: calls.append(1) or eager(self, *a))
    want = r.score(QUERY, DOCS)
    assert calls == []
    script_packed_layers(r.model, False)
    assert r.score(QUERY, DOCS) == want
    assert len(calls) == len(r.model.model.layers)


def test_a_torch_that_cannot_script_leaves_the_passes_eager(tiny_text, monkeypatch, caplog):
    """Where TorchScript fails (a torch without it), loading still works: the passes stay eager, with a
    warning that says why."""
    import rerank_core.models.llama_bidirectional as lb

    def fail(fn):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(lb, "_SCRIPTED", [])
    monkeypatch.setattr(torch.jit, "script", fail)
    with caplog.at_level("WARNING", logger="rerank_core"):
        r = load_reranker(tiny_text, device="cpu")
    assert r.model.model.scripted is False
    assert "no TorchScript here" in caplog.text
    assert len(r.score(QUERY, DOCS)) == len(DOCS)


def test_repeated_kv_heads_give_grouped_attention():
    """A masked grouped-heads call on CUDA repeats the key/value heads (so torch can pick its memory-efficient
    kernel instead of math): the same result as enable_gqa, and as attention written out by hand."""
    from rerank_core.models.llama_bidirectional import grouped_attention

    g = torch.Generator().manual_seed(3)
    b, nh, nkv, length, d = 3, 8, 2, 11, 16
    q = torch.randn(b, nh, length, d, generator=g)
    k = torch.randn(b, nkv, length, d, generator=g)
    v = torch.randn(b, nkv, length, d, generator=g)
    lens = torch.tensor([11, 7, 1])
    mask = (torch.arange(length)[None, :] < lens[:, None])[:, None, None, :]
    grouped = grouped_attention(q, k, v, mask, d**-0.5, repeat_kv=False)
    repeated = grouped_attention(q, k, v, mask, d**-0.5, repeat_kv=True)
    torch.testing.assert_close(repeated, grouped, atol=1e-6, rtol=0)
    kk, vv = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * d**-0.5
    by_hand = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv
    torch.testing.assert_close(grouped, by_hand, atol=1e-5, rtol=0)
    assert grouped_attention(q, k, v, None, d**-0.5).shape == (b, nh, length, d)


def test_model_with_repeated_kv_heads_scores_the_same(tiny_text, monkeypatch):
    """The whole model, packed and padded passes, with the key/value heads repeated (the CUDA path) as without."""
    import functools

    from rerank_core.models import llama_bidirectional as lb

    r = load_reranker(tiny_text, device="cpu", dtype="float32")
    lb.script_packed_layers(r.model, False)  # the eager layers: what a GPU runs
    docs = [d * k for k, d in enumerate(DOCS + MULTILINGUAL, start=1)] + DOCS
    enc = r.encode(QUERY, docs)
    rows = [enc.pair(i) for i in range(len(enc.lengths))]
    lengths = [len(x) for x in rows]
    plans = [pack_varlen(lengths, 256, 64), pack(lengths, 1 << 20)]
    before = [r.forward_rows(rows, plan=p) for p in plans]
    monkeypatch.setattr(lb, "grouped_attention", functools.partial(lb.grouped_attention, repeat_kv=True))
    after = [r.forward_rows(rows, plan=p) for p in plans]
    for a, b in zip(after, before):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_cuda_passes_keep_cudnn_attention_out(tiny_text):
    """On CUDA, forward passes run with cuDNN's attention kernel off (it builds a plan per new shape), the other
    kernels as they were; the flag comes back after the last of several overlapping passes (threads) leaves;
    ``cudnn_attention`` opts back in; CPU passes leave it alone."""
    r = load_reranker(tiny_text, device="cpu", load_weights=False)
    assert r.cudnn_attention is False
    torch.backends.cuda.enable_cudnn_sdp(True)
    flash, efficient = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()
    r.device = torch.device("cuda")  # only the choice of kernels is looked at here; nothing runs
    outer, inner = r._attention_kernels(), r._attention_kernels()
    with outer:
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        with inner:  # a second thread's pass, overlapping
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # the first pass is still inside
        assert torch.backends.cuda.flash_sdp_enabled() == flash
        assert torch.backends.cuda.mem_efficient_sdp_enabled() == efficient
    assert torch.backends.cuda.cudnn_sdp_enabled()
    r.cudnn_attention = True
    with r._attention_kernels():
        assert torch.backends.cuda.cudnn_sdp_enabled()
    r.cudnn_attention = False
    r.device = torch.device("cpu")
    with r._attention_kernels():
        assert torch.backends.cuda.cudnn_sdp_enabled()
