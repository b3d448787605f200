"""The bidirectional Llama cross-encoder of ``nvidia/llama-nemotron-rerank-1b-v2``.

Reading order: RMSNorm -> rotary embedding (llama3 scaling) -> attention -> MLP -> decoder layer ->
trunk (``LlamaBidirectionalModel``) -> classifier (``LlamaBidirectionalForSequenceClassification``).

Differences from a causal Llama: no causal mask (every position sees every non-pad key), masked mean
pooling over the last hidden state, and a one-logit ``score`` head at the root of the state dict.
Module names follow the published checkpoint so ``state_dict()`` keys equal the safetensors keys:
``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ..., ``model.norm.weight``,
``score.weight``.

Shapes: B = batch, L = padded length, H = hidden size, Nh = query heads, Nkv = key/value heads,
D = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, the statistics in float32, the product in the input dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused; same result in float32
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


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
    """cos/sin tables for the given positions, computed in float32 and cast to the activation dtype."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", llama3_inv_freq(cfg), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, L] -> cos, sin [B, 1, L, D]."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style (rotate-half) rotary embedding, the layout of HF Llama q/k weights."""
    return x * cos + _rotate_half(x) * sin


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
        """x [B, L, H]; key_mask bool [B, 1, 1, L] (True = real key) -> [B, L, H]."""
        bsz, length, _ = x.shape
        if self.qkv_weight is not None:
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nk], qkv[..., nq + nk :]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(bsz, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(bsz, length, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(bsz, length, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, scale=self.head_dim**-0.5, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, -1))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = F.linear(x, self.gate_up_weight, self.gate_up_bias)
        half = gate_up.shape[-1] // 2
        act = F.silu(gate_up[..., :half])
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
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, key_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


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


def head_logits(score: nn.Linear, pooled: torch.Tensor, temperature: float, apply_temperature: bool) -> torch.Tensor:
    """Float32 head: pooled [B, H] -> logits [B]."""
    logits = F.linear(pooled.float(), score.weight.float())[:, 0]
    if apply_temperature and temperature != 1.0:
        logits = logits / temperature
    return logits
