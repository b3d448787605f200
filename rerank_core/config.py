"""Model configurations, read from the published ``config.json`` files unchanged.

Two layouts exist:

* the text reranker's flat Llama config (``model_type: llama_bidirec``);
* the VL reranker's nested config (``llm_config`` + ``vision_config``).

Only the fields the forward pass needs are kept; everything is read from the file, nothing is hard-coded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

TEXT_MODEL_TYPES = ("llama_bidirec", "llama")
VL_MODEL_TYPES = ("llama_nemotron_vl_rerank", "llama_nemotron_vl")


@dataclass(frozen=True)
class LlamaConfig:
    """The bidirectional Llama trunk (text model, and the VL model's ``llm_config``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    pooling: str = "avg"
    temperature: float = 1.0
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    max_position_embeddings: int = 131072

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            return cls(
                hidden_size=hidden,
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                intermediate_size=int(d["intermediate_size"]),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(d.get("rope_theta", 500000.0)),
                rope_scaling=d.get("rope_scaling"),
                hidden_act=d.get("hidden_act", "silu"),
                attention_bias=bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)),
                pooling=d.get("pooling", "avg"),
                temperature=float(d.get("temperature", 1.0)),
                bos_token_id=d.get("bos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json is missing the field {e.args[0]!r}") from None

    def validate(self) -> None:
        if self.hidden_act != "silu":
            raise CheckpointError(f"unsupported hidden_act {self.hidden_act!r} (only 'silu')")
        if self.pooling != "avg":
            raise CheckpointError(f"unsupported pooling {self.pooling!r} (only 'avg')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise CheckpointError("head_dim must be even for rotary embeddings")
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in (None, "default", "llama3"):
            raise CheckpointError(f"unsupported rope_scaling type {kind!r} (only 'llama3')")


@dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 512
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SiglipVisionConfig":
        try:
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                image_size=int(d.get("image_size", 512)),
                patch_size=int(d.get("patch_size", 16)),
                num_channels=int(d.get("num_channels", 3)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            )
        except KeyError as e:
            raise CheckpointError(f"vision_config is missing the field {e.args[0]!r}") from None


@dataclass(frozen=True)
class NemotronVLConfig:
    llm: LlamaConfig
    vision: SiglipVisionConfig
    downsample_ratio: float = 0.5
    img_context_token_id: int = 128258
    force_image_size: int = 512
    pad_token_id: int | None = None
    temperature: float = 1.0
    max_input_tiles: int = 6  # processor_config.json (inference); config.json's value is the training one
    use_thumbnail: bool = True
    num_image_token: int = 256

    @classmethod
    def from_dict(cls, d: dict[str, Any], processor: dict[str, Any] | None = None) -> "NemotronVLConfig":
        if "llm_config" not in d or "vision_config" not in d:
            raise CheckpointError("VL config.json needs both 'llm_config' and 'vision_config'")
        processor = processor or {}
        llm = LlamaConfig.from_dict(d["llm_config"])
        vision = SiglipVisionConfig.from_dict(d["vision_config"])
        ratio = float(d.get("downsample_ratio", 0.5))
        size = int(d.get("force_image_size") or vision.image_size)
        per_tile = int((size // vision.patch_size) ** 2 * ratio * ratio)
        return cls(
            llm=llm,
            vision=vision,
            downsample_ratio=ratio,
            img_context_token_id=int(d.get("img_context_token_id", 128258)),
            force_image_size=size,
            pad_token_id=d.get("pad_token_id"),
            temperature=float(d.get("temperature", 1.0)),
            max_input_tiles=int(processor.get("max_input_tiles", d.get("max_input_tiles", 6))),
            use_thumbnail=bool(processor.get("use_thumbnail", d.get("use_thumbnail", True))),
            num_image_token=int(processor.get("num_image_token", per_tile)),
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint directory holds: its kind, parsed config and raw JSON."""

    path: str
    kind: str  # "text" | "vl"
    config: Any  # LlamaConfig | NemotronVLConfig
    raw: dict = field(repr=False, default_factory=dict)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.basename(path)} not found in {os.path.dirname(path)}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def read_checkpoint_config(path: str) -> CheckpointInfo:
    """Parse ``config.json`` (and ``processor_config.json`` for VL) in a checkpoint directory."""
    raw = _read_json(os.path.join(path, "config.json"))
    model_type = raw.get("model_type", "")
    if model_type in VL_MODEL_TYPES or "llm_config" in raw:
        proc_path = os.path.join(path, "processor_config.json")
        proc = _read_json(proc_path) if os.path.exists(proc_path) else {}
        cfg = NemotronVLConfig.from_dict(raw, proc)
        cfg.llm.validate()
        return CheckpointInfo(path=path, kind="vl", config=cfg, raw=raw)
    if model_type in TEXT_MODEL_TYPES:
        cfg = LlamaConfig.from_dict(raw)
        cfg.validate()
        return CheckpointInfo(path=path, kind="text", config=cfg, raw=raw)
    raise CheckpointError(
        f"unsupported model_type {model_type!r} in {path}/config.json; expected one of "
        f"{TEXT_MODEL_TYPES + VL_MODEL_TYPES}"
    )
