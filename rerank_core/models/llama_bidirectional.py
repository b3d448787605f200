"""The bidirectional Llama cross-encoder of ``nvidia/llama-nemotron-rerank-1b-v2``.

Reading order: RMSNorm -> rotary embedding (llama3 scaling) -> attention -> MLP -> decoder layer ->
trunk (``LlamaBidirectionalModel``) -> classifier (``LlamaBidirectionalForSequenceClassification``).

Differences from a causal Llama: no causal mask (every position sees every non-pad key), masked mean
pooling over the last hidden state, and a one-logit ``score`` head at the root of the state dict.
Module names follow the published checkpoint so ``state_dict()`` keys equal the safetensors keys:
``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ..., ``model.norm.weight``,
``score.weight``.

Two layouts run the same weights:

* padded (``forward``): ``[B, L]`` token ids with a mask; every layer works on ``B * L`` positions.
* packed (``forward_packed``): the real tokens of all sequences concatenated, ``[T]``. Projections, MLP
  and norms work on the ``T`` real tokens only; attention gathers each group of similar-length sequences
  into a small padded block (``PackedLayout``), runs SDPA with a key mask, and scatters back. No pad
  token ever reaches a matmul, so the padded/real ratio only costs inside attention.

Shapes: B = batch, L = padded length, T = packed tokens, H = hidden size, Nh = query heads,
Nkv = key/value heads, D = head dim.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig

log = logging.getLogger("rerank_core")


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, the statistics in float32, the product in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return cpu_rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused; same result in float32
        return rms_norm_expr(x, self.weight, self.eps)


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm on CPU (``RMSNorm.forward``, and the scripted layers). In float32, where F.rms_norm runs unfused
    (pow, mean, rsqrt, mul, mul), one norm reduction and two in-place products read [T, H] three times instead
    of five (40% faster on 4096 x 256); other dtypes: ``rms_norm_expr``."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        scale = torch.linalg.vector_norm(x, 2.0, [-1], True).square_().div_(x.shape[-1])
        return torch.mul(x, scale.add_(eps).rsqrt_()).mul_(weight)
    return rms_norm_expr(x, weight, eps)


def llama3_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies [D/2], float32, with Llama 3 long-context scaling when configured.

    Computed with float32 tensor ops in the same order as the reference so the tables agree bit for bit.
    """
    d = cfg.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d
    inv = 1.0 / (cfg.rope_theta**exponents)
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type", rs.get("type")) != "llama3":
        return inv
    factor = float(rs["factor"])
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    orig = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    long_wave = wavelen > orig / low  # low frequencies: fully scaled
    short_wave = wavelen < orig / high  # high frequencies: untouched
    scaled = torch.where(long_wave, inv / factor, inv)
    s = (orig / wavelen - low) / (high - low)
    blended = (1 - s) * scaled / factor + s * scaled
    return torch.where(~long_wave & ~short_wave, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin half tables for the given positions, computed in float32 and cast to the activation dtype."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", llama3_inv_freq(cfg), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] -> cos, sin [B, L, 1, D/2].

        HF Llama repeats the D/2 frequencies twice (``cat(freqs, freqs)``); both halves of a head see the
        same angle, so half tables carry the same values with half the memory traffic.
        """
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)[None, None, :]
        return freqs.cos().to(dtype)[:, :, None], freqs.sin().to(dtype)[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style (rotate-half) rotary embedding, the layout of HF Llama q/k weights.

    x [B, L, N, D] (any strides), cos/sin [B, L, 1, D/2] -> a new contiguous [B, L, N, D]:
    ``first = x1*cos - x2*sin``, ``second = x2*cos + x1*sin``, written straight into the output halves
    (no rotated copy, no concatenation).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=first).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=second).addcmul_(x1, sin)
    return out


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    repeat_kv: bool | None = None,
) -> torch.Tensor:
    """Bidirectional attention, q [B, Nh, L, D], k/v [B, Nkv, L, D] (Nkv divides Nh), mask bool [B, 1, 1, L] or
    None -> [B, Nh, L, D].

    On CUDA a masked call repeats the key/value heads up to Nh (``repeat_kv``, default: on CUDA with a mask):
    torch's flash kernel admits grouped heads but no mask, its memory-efficient kernel a mask but not grouped
    heads, so a masked grouped call would otherwise run the math kernel (cuDNN's admits both but builds a plan
    for every new shape; ``Reranker._attention_kernels`` keeps it out). The repeat is what ``enable_gqa`` means,
    so the result is the same."""
    nh, nkv = q.shape[1], k.shape[1]
    if repeat_kv is None:
        repeat_kv = q.is_cuda and mask is not None
    if nkv != nh and repeat_kv:
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        nkv = nh
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=nkv != nh)


class Attention(nn.Module):
    """Grouped-query self-attention without a causal mask; pad keys are masked out."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=b)
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One q/k/v matmul instead of three. The three weights become views of the fused one, so the
        state dict keeps its published keys and no memory is duplicated. Call after moving to the device."""
        self.qkv_weight, self.qkv_bias = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, H]; cos/sin [B, L, 1, D/2]; key_mask bool [B, 1, 1, L] (True = real key) -> [B, L, H]."""
        bsz, length, _ = x.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_weight is not None:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            # q and k side by side as heads [B, L, Nh + Nkv, D]: one rotary pass for both
            qk = apply_rotary(qkv[..., : (nh + nkv) * d].view(bsz, length, nh + nkv, d), cos, sin)
            q, k = qk[:, :, :nh], qk[:, :, nh:]
            v = qkv[..., (nh + nkv) * d :].view(bsz, length, nkv, d)
        else:
            q = apply_rotary(self.q_proj(x).view(bsz, length, nh, d), cos, sin)
            k = apply_rotary(self.k_proj(x).view(bsz, length, nkv, d), cos, sin)
            v = self.v_proj(x).view(bsz, length, nkv, d)
        out = grouped_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask, d**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, -1))

    def forward_packed(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: "PackedLayout",
        rotary: Callable[..., torch.Tensor] = apply_rotary,
    ) -> torch.Tensor:
        """x [T, H]; cos/sin [T, 1, D/2] -> [T, H]: attention per group of ``layout``."""
        t = x.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        if self.qkv_weight is not None:
            heads = F.linear(x, self.qkv_weight, self.qkv_bias).view(t, nh + 2 * nkv, d)
        else:
            heads = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).view(t, nh + 2 * nkv, d)
        qk = rotary(heads[:, : nh + nkv], cos, sin)  # [T, Nh + Nkv, D]
        v = heads[:, nh + nkv :]
        out = torch.empty((t, nh * d), dtype=x.dtype, device=x.device)
        for g in layout.groups:
            if g.gather is None:  # no padding: the group's tokens are already [b, L] in order
                qk_g = qk[g.start : g.end].view(g.b, g.length, nh + nkv, d)
                v_g = v[g.start : g.end].view(g.b, g.length, nkv, d)
            else:  # [b, L, *, D]; pad slots repeat a real token (index_select: ~7x faster than qk[gather])
                flat = g.gather.view(-1)
                qk_g = qk.index_select(0, flat).view(g.b, g.length, nh + nkv, d)
                v_g = v.index_select(0, flat).view(g.b, g.length, nkv, d)
            o = grouped_attention(
                qk_g[:, :, :nh].transpose(1, 2), qk_g[:, :, nh:].transpose(1, 2), v_g.transpose(1, 2), g.key_mask,
                d**-0.5,
            )
            o = o.transpose(1, 2).reshape(g.b * g.length, nh * d)
            if g.real is None:
                out[g.start : g.end] = o
            else:
                torch.index_select(o, 0, g.real, out=out[g.start : g.end])
        return self.o_proj(out)


def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of linears sharing an input; re-point each at its slice."""
    weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
    has_bias = all(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.detach() for lin in linears]).contiguous() if has_bias else None
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


def fuse_projections(module: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up matmuls in every Llama layer of ``module`` (after it is on its device)."""
    for m in module.modules():
        if isinstance(m, (Attention, MLP)):
            m.fuse()
    return module


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One gate/up matmul instead of two (weights become views of the fused one, as in Attention)."""
        self.gate_up_weight, self.gate_up_bias = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, silu_mul: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``silu_mul`` (optional, needs fused weights): a fused ``silu(gate) * up`` over the [T, 2I] output."""
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)
        if silu_mul is not None:
            return self.down_proj(silu_mul(gate_up))
        half = gate_up.shape[-1] // 2
        act = F.silu(gate_up[..., :half], inplace=True)  # in place: no second [T, I] buffer to allocate
        return self.down_proj(act.mul_(gate_up[..., half:]))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``h += attn(norm1(h)); h += mlp(norm2(h))``."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, key_mask)  # a new h: the input stays intact
        return h.add_(self.mlp(self.post_attention_layernorm(h)))

    def forward_packed(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: "PackedLayout") -> torch.Tensor:
        h = h + self.self_attn.forward_packed(self.input_layernorm(h), cos, sin, layout)
        return h.add_(self.mlp(self.post_attention_layernorm(h)))


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences ``[start, end)`` of the packed tokens that attend as one padded block [b, L].

    ``gather`` [b, L]: packed token index of every slot (a pad slot repeats its row's first token; the
    key mask hides it, and its output is dropped); ``real`` [n]: the slots of real tokens in the
    flattened block, in packed order; ``key_mask`` [b, 1, 1, L]. All three are None when the group has
    no padding (every sequence of length L).
    """

    start: int
    end: int
    b: int
    length: int
    gather: torch.Tensor | None
    real: torch.Tensor | None
    key_mask: torch.Tensor | None


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence's tokens sit in a packed pass. ``positions`` [T] (0..n-1 per sequence),
    ``segment`` [T] (sequence index of every token), ``lengths`` [S], ``groups`` in packed order."""

    positions: torch.Tensor
    segment: torch.Tensor
    lengths: torch.Tensor
    groups: tuple[AttentionGroup, ...]

    @property
    def num_sequences(self) -> int:
        return int(self.lengths.shape[0])


def packed_layout(group_lengths: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> PackedLayout:
    """Layout for sequences concatenated group after group (sequences in the order given).

    ``group_lengths``: per attention group, the lengths of its sequences. Index tensors are built with
    numpy on the host and moved to ``device`` once per pass.
    """
    lengths = np.asarray([n for g in group_lengths for n in g], dtype=np.int64)
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError("every sequence needs at least one token")
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    total = int(lengths.sum())
    segment = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(total) - np.repeat(starts, lengths)

    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    groups = []
    seq = 0
    for g in group_lengths:
        lens = np.asarray(g, dtype=np.int64)
        b, longest = len(lens), int(lens.max())
        first = int(starts[seq])
        end = first + int(lens.sum())
        if (lens == longest).all():
            groups.append(AttentionGroup(first, end, b, longest, None, None, None))
        else:
            slot = np.arange(longest)[None, :]
            valid = slot < lens[:, None]  # [b, L]
            row_start = starts[seq : seq + b][:, None]
            gather = np.where(valid, row_start + slot, row_start)
            real = np.flatnonzero(valid.reshape(-1))  # row-major = packed order within the group
            groups.append(
                AttentionGroup(first, end, b, longest, put(gather), put(real), put(valid[:, None, None, :].copy()))
            )
        seq += b
    return PackedLayout(put(positions), put(segment), put(lengths), tuple(groups))


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence positions 0..n-1 of the real tokens, whatever the padding side. mask [B, L] -> [B, L].

    RoPE depends only on relative offsets and pad keys are masked, so this equals the reference's
    0..L-1 over the padded length up to float noise, and makes scores independent of padding.
    """
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


class LlamaBidirectionalModel(nn.Module):
    """Embeddings, N decoder layers and the final norm; returns the last hidden state [B, L, H]."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.ops: ElementwiseOps | None = None  # fused elementwise kernels for forward_packed (compile_elementwise)
        # per-layer weight lists of the TorchScript layers, while CPU packed passes use them (script_packed_layers)
        self._script_weights: tuple | None = None

    @property
    def scripted(self) -> bool:
        """CPU packed passes run through the TorchScript layers."""
        return self._script_weights is not None

    def _layer_weight_lists(self) -> tuple:
        """The arguments of ``_packed_layers`` that hold weights, one list per kind (fused projections only)."""
        layers = self.layers
        if any(layer.self_attn.qkv_weight is None or layer.mlp.gate_up_weight is None for layer in layers):
            raise ValueError("scripted packed passes need fused projections (fuse_projections)")
        return (
            [layer.input_layernorm.weight for layer in layers],
            [layer.self_attn.qkv_weight for layer in layers],
            [layer.self_attn.qkv_bias for layer in layers],
            [layer.self_attn.o_proj.weight for layer in layers],
            [layer.self_attn.o_proj.bias for layer in layers],
            [layer.post_attention_layernorm.weight for layer in layers],
            [layer.mlp.gate_up_weight for layer in layers],
            [layer.mlp.gate_up_bias for layer in layers],
            [layer.mlp.down_proj.weight for layer in layers],
            [layer.mlp.down_proj.bias for layer in layers],
        )

    def forward(
        self,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """attention_mask [B, L] (1 = real token); input_ids [B, L] or inputs_embeds [B, L, H]."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        mask = attention_mask.bool()
        cos, sin = self.rotary_emb(positions_from_mask(mask), h.dtype)
        key_mask = mask[:, None, None, :]
        for layer in self.layers:
            h = layer(h, cos, sin, key_mask)
        return self.norm(h)

    def forward_packed(self, input_ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """input_ids [T] (real tokens only, laid out by ``layout``) -> last hidden state [T, H]."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(layout.positions[None], h.dtype)  # [1, T, 1, D/2]
        cos, sin = cos[0], sin[0]
        if self.ops is not None:
            return self._forward_packed_fused(h, cos, sin, layout, self.ops)
        if self.scripted and h.device.type == "cpu":
            return self._forward_packed_scripted(h, cos, sin, layout)
        for layer in self.layers:
            h = layer.forward_packed(h, cos, sin, layout)
        return self.norm(h)

    def _forward_packed_scripted(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout
    ) -> torch.Tensor:
        """The eager layers' ops in the same order, run by the TorchScript interpreter in one call (see
        ``script_packed_layers``): the calling thread holds the GIL only to enter and leave it."""
        cfg = self.config
        groups = layout.groups
        with torch.jit.optimized_execution(False):  # the plain interpreter: the same ATen calls as eager
            return _scripted_layers()(
                h, cos, sin, *self._script_weights, self.norm.weight, float(cfg.rms_norm_eps),
                cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                [g.start for g in groups], [g.end for g in groups], [g.b for g in groups], [g.length for g in groups],
                [g.gather for g in groups], [g.real for g in groups], [g.key_mask for g in groups],
            )

    def _forward_packed_fused(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout, ops: ElementwiseOps
    ) -> torch.Tensor:
        """The layers of ``forward_packed`` with each residual add fused into the norm that follows it (the
        next layer's input norm, or the final norm after the last layer), rotary and SwiGLU as one kernel each."""
        if len(self.layers) == 0:
            return self.norm(h)
        first = self.layers[0].input_layernorm
        x = ops.rms_norm(h, first.weight, first.eps)
        following = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, after in zip(self.layers, following):
            a = layer.self_attn.forward_packed(x, cos, sin, layout, rotary=ops.rotary)
            mid = layer.post_attention_layernorm
            h, x = ops.add_rms_norm(h, a, mid.weight, mid.eps)
            h, x = ops.add_rms_norm(h, layer.mlp(x, silu_mul=ops.silu_mul), after.weight, after.eps)
        return x


# ------------------------------------------------------------------------- TorchScript packed layers (CPU)
# Why: an eager pass calls ~25 ATen ops per layer from Python, taking the GIL back after each. In a scorer
# replica the event loop thread runs Python (Ray, Serve, asyncio) beside the forward threads, and a thread
# waiting for the GIL gets it only when the holder blocks or its switch interval (5 ms) runs out: a forward
# pass stalled for most of any stretch the loop was busy (a one-pair pass beside a thread running Python half
# the time: 11.8 ms instead of 6.0). The interpreter runs the whole stack of layers without the GIL.


def _packed_layers(
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    in_norm: list[torch.Tensor],
    qkv_w: list[torch.Tensor],
    qkv_b: list[torch.Tensor | None],
    o_w: list[torch.Tensor],
    o_b: list[torch.Tensor | None],
    post_norm: list[torch.Tensor],
    gate_up_w: list[torch.Tensor],
    gate_up_b: list[torch.Tensor | None],
    down_w: list[torch.Tensor],
    down_b: list[torch.Tensor | None],
    final_norm: torch.Tensor,
    eps: float,
    nh: int,
    nkv: int,
    d: int,
    g_start: list[int],
    g_end: list[int],
    g_b: list[int],
    g_len: list[int],
    g_gather: list[torch.Tensor | None],
    g_real: list[torch.Tensor | None],
    g_mask: list[torch.Tensor | None],
) -> torch.Tensor:
    """``DecoderLayer.forward_packed`` for every layer (fused projections), then the final norm."""
    t = h.shape[0]
    for i in range(len(qkv_w)):
        heads = F.linear(cpu_rms_norm(h, in_norm[i], eps), qkv_w[i], qkv_b[i]).view(t, nh + 2 * nkv, d)
        qk = apply_rotary(heads[:, : nh + nkv], cos, sin)
        v = heads[:, nh + nkv :]
        out = torch.empty((t, nh * d), dtype=h.dtype, device=h.device)
        for j in range(len(g_start)):
            gather = g_gather[j]
            if gather is None:
                qk_g = qk[g_start[j] : g_end[j]].view(g_b[j], g_len[j], nh + nkv, d)
                v_g = v[g_start[j] : g_end[j]].view(g_b[j], g_len[j], nkv, d)
            else:
                flat = gather.view(-1)
                qk_g = qk.index_select(0, flat).view(g_b[j], g_len[j], nh + nkv, d)
                v_g = v.index_select(0, flat).view(g_b[j], g_len[j], nkv, d)
            o = F.scaled_dot_product_attention(
                qk_g[:, :, :nh].transpose(1, 2),
                qk_g[:, :, nh:].transpose(1, 2),
                v_g.transpose(1, 2),
                attn_mask=g_mask[j],
                scale=d**-0.5,
                enable_gqa=nkv != nh,
            )
            o = o.transpose(1, 2).reshape(g_b[j] * g_len[j], nh * d)
            real = g_real[j]
            if real is None:
                out[g_start[j] : g_end[j]] = o
            else:
                torch.index_select(o, 0, real, out=out[g_start[j] : g_end[j]])
        h = h + F.linear(out, o_w[i], o_b[i])
        gate_up = F.linear(cpu_rms_norm(h, post_norm[i], eps), gate_up_w[i], gate_up_b[i])
        half = gate_up.shape[-1] // 2
        act = F.silu(gate_up[..., :half], inplace=True)
        h = h.add_(F.linear(act.mul_(gate_up[..., half:]), down_w[i], down_b[i]))
    return cpu_rms_norm(h, final_norm, eps)


_SCRIPTED: list = []
_SCRIPT_LOCK = threading.Lock()


def _scripted_layers() -> Callable[..., torch.Tensor]:
    """``_packed_layers`` compiled by ``torch.jit.script`` once per process."""
    if not _SCRIPTED:
        with _SCRIPT_LOCK:
            if not _SCRIPTED:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                    _SCRIPTED.append(torch.jit.script(_packed_layers))
    return _SCRIPTED[0]


def script_packed_layers(model: nn.Module, on: bool = True) -> int:
    """Run the packed passes of every Llama trunk in ``model`` through the TorchScript layers (CPU only; GPU
    passes and fused elementwise kernels keep their own path). Scripts now: where TorchScript cannot compile
    it (a torch without it), this logs why and the passes stay eager. Returns the number of trunks changed."""
    if on:
        try:
            _scripted_layers()
        except Exception as e:  # noqa: BLE001 - any scripting failure leaves the eager path, which is correct
            log.warning("TorchScript could not compile the packed layers (%s: %s); CPU passes stay eager",
                        type(e).__name__, str(e).strip().splitlines()[0][:300] if str(e).strip() else "")
            on = False
    trunks = [m for m in model.modules() if isinstance(m, LlamaBidirectionalModel)]
    for m in trunks:
        m._script_weights = m._layer_weight_lists() if on else None
    return len(trunks)


# ------------------------------------------------------------------------- fused elementwise steps (CPU)
# Written as plain tensor expressions for inductor to fuse: one loop each instead of several eager kernels,
# each of which reads and writes the whole [T, H] or [T, I] activation. Eager, they equal the modules above.


def rms_norm_expr(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    v = x.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def add_rms_norm_expr(
    h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + a, rms_norm(h + a)): the residual stream and the next block's input."""
    h = h + a
    return h, rms_norm_expr(h, weight, eps)


def rotary_expr(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu_mul_expr(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


@dataclass(frozen=True)
class ElementwiseOps:
    """The elementwise steps of a packed pass, as callables (compiled by ``compile_elementwise``)."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., torch.Tensor]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


def eager_elementwise() -> ElementwiseOps:
    return ElementwiseOps(rms_norm_expr, add_rms_norm_expr, rotary_expr, silu_mul_expr)


def compile_elementwise(model: nn.Module) -> int:
    """Route every Llama trunk in ``model`` through fused elementwise kernels in its packed passes.

    Only the elementwise steps are compiled (inductor, dynamic shapes); matmuls and attention stay the eager
    ATen kernels. Inductor generates C++ on CPU, so a C++ compiler must be present; compilation happens on
    the first pass (run one to find out, and ``reset_elementwise`` on failure). The kernels run with the
    calling thread's torch thread count. Returns the number of trunks changed.
    """
    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, dynamic=True, fullgraph=True)

    ops = ElementwiseOps(*(compiled(f) for f in (rms_norm_expr, add_rms_norm_expr, rotary_expr, silu_mul_expr)))
    return _set_ops(model, ops)


def reset_elementwise(model: nn.Module) -> int:
    """Back to the eager modules."""
    return _set_ops(model, None)


def _set_ops(model: nn.Module, ops: ElementwiseOps | None) -> int:
    trunks = [m for m in model.modules() if isinstance(m, LlamaBidirectionalModel)]
    for m in trunks:
        m.ops = ops
    return len(trunks)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions, in float32. hidden [B, L, H], mask [B, L] -> [B, H]."""
    m = attention_mask.to(torch.float32)[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


class LlamaBidirectionalForSequenceClassification(nn.Module):
    """Trunk + masked mean pooling + ``score`` (Linear H -> 1, no bias), all after the trunk in float32.

    ``forward`` returns the raw head output [B] in float32. The published config's ``temperature``
    (0.2) is not applied by default, matching NVIDIA's reference run on its pinned transformers release,
    the model card's logits and vLLM; pass ``apply_temperature=True`` to divide by it.
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBidirectionalModel(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, apply_temperature: bool = False
    ) -> torch.Tensor:
        hidden = self.model(attention_mask, input_ids=input_ids)
        return head_logits(self.score, masked_mean(hidden, attention_mask), self.config.temperature, apply_temperature)

    def forward_packed(self, input_ids: torch.Tensor, layout: PackedLayout, apply_temperature: bool = False) -> torch.Tensor:
        """input_ids [T] packed by ``layout`` -> logits [S] (one per sequence, in layout order)."""
        hidden = self.model.forward_packed(input_ids, layout)
        return head_logits(self.score, packed_mean(hidden, layout), self.config.temperature, apply_temperature)


def packed_mean(hidden: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Mean over each sequence's tokens, in float32. hidden [T, H] -> [S, H]."""
    sums = torch.zeros((layout.num_sequences, hidden.shape[-1]), dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, layout.segment, hidden.float())
    return sums / layout.lengths.to(torch.float32)[:, None]


def head_logits(score: nn.Linear, pooled: torch.Tensor, temperature: float, apply_temperature: bool) -> torch.Tensor:
    """Float32 head: pooled [B, H] -> logits [B]."""
    logits = F.linear(pooled.float(), score.weight.float())[:, 0]
    if apply_temperature and temperature != 1.0:
        logits = logits / temperature
    return logits
