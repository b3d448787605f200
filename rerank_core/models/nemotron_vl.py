"""The multimodal cross-encoder of ``nvidia/llama-nemotron-rerank-vl-1b-v2``.

Reading order: SigLIP vision tower (embeddings -> encoder layers -> post-norm) -> pixel shuffle ->
projector ``mlp1`` -> embedding merge -> the bidirectional Llama trunk (reused from
``llama_bidirectional``) -> masked mean pooling -> float32 ``score`` head.

Module names follow the published checkpoint, so ``state_dict()`` keys equal the safetensors keys:

* ``model.vision_model.vision_model.{embeddings,encoder,post_layernorm}.*`` (the doubled name is HF's
  ``SiglipVisionModel`` wrapping a ``SiglipVisionTransformer`` called ``vision_model``);
* ``model.mlp1.{0,1,3}.*`` (LayerNorm, Linear, -, Linear; index 2 is the parameter-free GELU);
* ``model.language_model.*`` (a bare Llama: ``embed_tokens``, ``layers.N``, ``norm``);
* ``score.weight`` at the root.

The checkpoint also stores SigLIP's attention-pooling head (``...vision_model.head.*``); its output is
never used, so ``vl_key_map`` skips exactly those tensors and every other unknown tensor still fails.

Shapes: T = image tiles in the batch, S = tile side (512), P = patch side (16), G = S/P patches per
side (32), N = G*G patches per tile (1024), C = vision width, f = 1/downsample_ratio (2),
n = N/f^2 vision tokens per tile (256), H = LM width, B = batch, L = padded length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict_strict
from ..config import CheckpointInfo, NemotronVLConfig, SiglipVisionConfig
from ..errors import CheckpointError, InvalidInput
from ..imaging import BF16_PIXEL_TABLE
from .llama_bidirectional import LlamaBidirectionalModel, head_logits, masked_mean

VISION_PREFIX = "model.vision_model.vision_model."
UNUSED_PREFIXES = (VISION_PREFIX + "head.",)  # SigLIP attention-pooling head: stored, never used


# ------------------------------------------------------------------------------------------ vision tower
class SiglipEmbeddings(nn.Module):
    """Non-overlapping P x P patches (Conv2d with bias) + a learned position per patch (no interpolation)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, S, S] -> [T, N, C]; patch k = row-major index ``i * G + j``."""
        if pixel_values.shape[-2:] != (self.grid * self.patch_size,) * 2:
            raise InvalidInput(
                f"image tiles must be {self.grid * self.patch_size}x{self.grid * self.patch_size}, "
                f"got {tuple(pixel_values.shape[-2:])}"
            )
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, G, G]
        x = x.flatten(2).transpose(1, 2)  # [T, N, C]
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    """Full (unmasked) multi-head self-attention with biases, scale head_dim^-0.5."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        c = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.head_dim = c // self.n_heads
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, N, C] -> [T, N, C]."""
        t, n, _ = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:  # [T, N, C] -> [T, heads, N, head_dim]
            return proj(x).view(t, n, self.n_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), scale=self.head_dim**-0.5
        )
        return self.out_proj(out.transpose(1, 2).reshape(t, n, -1))


class SiglipMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(ln1(x)); x += mlp(ln2(x))``."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings -> encoder -> ``post_layernorm``: the last hidden state [T, N, C] (select_layer -1)."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, S, S] -> [T, N, C]."""
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


class SiglipVisionTower(nn.Module):
    """Wrapper that only exists so parameter names carry the published ``vision_model.vision_model.``."""

    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


# ------------------------------------------------------------------------------------- pixel shuffle
def pixel_shuffle(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Space-to-depth of a tile's patch grid (downsample ratio 1/factor).

    x [T, G, G, C] (row i, column j) -> [T, G/f, G/f, f*f*C] with
    ``out[t, a, b, (f*m + k)*C + c] = x[t, f*a + m, f*b + k, c]`` (m = row offset, k = column offset),
    which for f = 2 is models.md §2.4 step 2 (NVIDIA's "v2" reshape/permute sequence).
    """
    t, gh, gw, c = x.shape
    if gh % factor or gw % factor:
        raise ValueError(f"patch grid {gh}x{gw} is not divisible by {factor}")
    x = x.reshape(t, gh // factor, factor, gw // factor, factor, c)  # [t, a, m, b, k, c]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [t, a, b, m, k, c]
    return x.reshape(t, gh // factor, gw // factor, factor * factor * c)


# ---------------------------------------------------------------------------------------------- model
def _shuffle_factor(ratio: float) -> int:
    factor = round(1.0 / ratio) if ratio > 0 else 0
    if factor < 1 or abs(factor * ratio - 1.0) > 1e-9:
        raise CheckpointError(f"unsupported downsample_ratio {ratio!r} (must be 1/k for an integer k, e.g. 0.5)")
    return factor


def validate_vl_config(cfg: NemotronVLConfig) -> None:
    """Refuse configs this implementation would silently compute wrongly."""
    v = cfg.vision
    if v.hidden_act != "gelu_pytorch_tanh":
        raise CheckpointError(f"unsupported vision hidden_act {v.hidden_act!r} (only 'gelu_pytorch_tanh')")
    if v.hidden_size % v.num_attention_heads:
        raise CheckpointError("vision hidden_size must be a multiple of num_attention_heads")
    if v.image_size % v.patch_size:
        raise CheckpointError("vision image_size must be a multiple of patch_size")
    if cfg.force_image_size != v.image_size:
        raise CheckpointError(
            f"force_image_size {cfg.force_image_size} differs from the vision image_size {v.image_size}; "
            "position-embedding interpolation is not supported"
        )
    if v.num_channels != 3:
        raise CheckpointError("the vision tower must take 3-channel (RGB) tiles")
    factor = _shuffle_factor(cfg.downsample_ratio)
    grid = v.image_size // v.patch_size
    if grid % factor:
        raise CheckpointError(f"patch grid {grid} is not divisible by the pixel-shuffle factor {factor}")
    per_tile = (grid // factor) ** 2
    if cfg.num_image_token != per_tile:
        raise CheckpointError(f"num_image_token {cfg.num_image_token} but the vision tower gives {per_tile} per tile")


class NemotronVLBackbone(nn.Module):
    """Everything under ``model.``: vision tower, projector ``mlp1`` and the language model."""

    def __init__(self, cfg: NemotronVLConfig):
        super().__init__()
        self.config = cfg
        self.factor = _shuffle_factor(cfg.downsample_ratio)
        c4 = cfg.vision.hidden_size * self.factor * self.factor
        h = cfg.llm.hidden_size
        self.vision_model = SiglipVisionTower(cfg.vision)
        self.mlp1 = nn.Sequential(nn.LayerNorm(c4, eps=1e-5), nn.Linear(c4, h), nn.GELU(), nn.Linear(h, h))
        self.language_model = LlamaBidirectionalModel(cfg.llm)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, S, S] (vision dtype) -> LM-space vectors [T * n, H], tile after tile.

        Within a tile, vector ``a * (G/f) + b`` is the shuffled 2x2 neighbourhood at (a, b).
        """
        x = self.vision_model(pixel_values)  # [T, N, C]
        t, n, c = x.shape
        g = round(n**0.5)
        x = pixel_shuffle(x.reshape(t, g, g, c), self.factor)  # [T, G/f, G/f, f*f*C]
        x = self.mlp1(x.reshape(t, -1, x.shape[-1]))  # [T, n, H]
        return x.reshape(-1, x.shape[-1])


class NemotronVLForSequenceClassification(nn.Module):
    """Backbone + masked mean pooling + ``score`` (Linear H -> 1, no bias); pooling and head in float32.

    ``forward(input_ids [B, L], attention_mask [B, L], tiles=None, apply_temperature=False)`` -> logits [B]
    float32. ``tiles``: uint8 [T, S, S, 3] (RGB, HWC) of every image in the batch, row after row, in the
    order their ``<IMG_CONTEXT>`` runs appear in the flattened batch; normalised here, on the model's
    device, through the 256-entry bf16-rounded table the reference's processor effectively applies.
    """

    def __init__(self, cfg: NemotronVLConfig):
        super().__init__()
        validate_vl_config(cfg)
        self.config = cfg
        self.model = NemotronVLBackbone(cfg)
        self.score = nn.Linear(cfg.llm.hidden_size, 1, bias=False)
        # explicit CPU device: built on the meta device, this buffer must still hold real values
        table = torch.tensor(BF16_PIXEL_TABLE, dtype=torch.float32, device="cpu")
        self.register_buffer("pixel_table", table, persistent=False)

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.model.vision_model.vision_model.embeddings.patch_embedding.weight.dtype

    def normalize_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 [T, S, S, 3] -> [T, 3, S, S] in the vision dtype, values bf16((k/255 - 0.5)/0.5)."""
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
            raise InvalidInput(f"tiles must be uint8 [T, S, S, 3], got {tiles.dtype} {tuple(tiles.shape)}")
        t, s1, s2, _ = tiles.shape
        table = self.pixel_table.to(device=tiles.device, dtype=torch.float32)
        nchw = tiles.permute(0, 3, 1, 2).reshape(-1).int()  # uint8 -> int32 indices, channels first
        return table.index_select(0, nchw).view(t, 3, s1, s2).to(self.vision_dtype)

    def merge_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_vectors: torch.Tensor | None
    ) -> torch.Tensor:
        """Token embeddings [B, L, H] with every real ``<IMG_CONTEXT>`` position replaced, in flattened
        batch-major order, by the next image vector. A count mismatch raises instead of misaligning."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        slots = (input_ids == self.config.img_context_token_id) & attention_mask.bool()
        n_slots = int(slots.sum())
        n_vectors = 0 if image_vectors is None else int(image_vectors.shape[0])
        if n_slots != n_vectors:
            raise InvalidInput(
                f"the batch has {n_slots} <IMG_CONTEXT> positions but its images give {n_vectors} vectors "
                f"({self.config.num_image_token} per tile); an image block was cut or tiles are missing"
            )
        if n_vectors:
            embeds = embeds.masked_scatter(slots[..., None], image_vectors.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tiles: torch.Tensor | None = None,
        apply_temperature: bool = False,
    ) -> torch.Tensor:
        vectors = None
        if tiles is not None and tiles.shape[0] > 0:
            vectors = self.model.image_embeddings(self.normalize_tiles(tiles.to(input_ids.device)))
        embeds = self.merge_embeddings(input_ids, attention_mask, vectors)
        hidden = self.model.language_model(attention_mask, inputs_embeds=embeds)
        pooled = masked_mean(hidden, attention_mask)
        return head_logits(self.score, pooled, self.config.temperature, apply_temperature)


# ------------------------------------------------------------------------------------------- loading
def vl_key_map(key: str) -> str | None:
    """Checkpoint key -> parameter name; ``None`` for the unused SigLIP head. A flat vision layout
    (``model.vision_model.{embeddings,encoder,post_layernorm}``) is accepted and nested."""
    if key.startswith("model.vision_model.") and not key.startswith(VISION_PREFIX):
        key = VISION_PREFIX + key.removeprefix("model.vision_model.")
    return None if key.startswith(UNUSED_PREFIXES) else key


def build_vl_model(info: CheckpointInfo, dtype: torch.dtype) -> nn.Module:
    """The VL module for a checkpoint, weights loaded strictly, in ``dtype`` (head kept in float32)."""
    with torch.device("meta"):
        model = NemotronVLForSequenceClassification(info.config)
    load_state_dict_strict(
        model, info.path, key_map=vl_key_map, dtype=dtype, keep_float32=lambda k: k == "score.weight"
    )
    return model.eval()
