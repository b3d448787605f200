"""Tiny random-weight checkpoints in the published layouts, for tests and offline demos.

``make_tiny(kind, out)`` writes ``config.json`` shaped like the published one (same keys, small sizes),
``model.safetensors`` with the published key names, and tokenizer files: copied from ``tokenizer`` (a
directory holding a real ``tokenizer.json``) or, without one, a small byte-level BPE tokenizer built here
from a fixed corpus, so the project needs nothing outside itself. Scores from these models are
meaningless; they exist to exercise the real code paths.

The weights are generated from the key list below, independently of the model classes, so loading them
also checks that the classes use the published names.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>"]
VL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>"]

_CORPUS = """Reranking orders the documents a retriever found by how well each answers the query.
A cross-encoder reads the question and the passage together and returns one relevance logit.
How much protein should a female eat? As a general guideline, the average requirement is about
46 grams per day for women; it depends on age, activity and pregnancy. Definition of summit for
English language learners: the highest point of a mountain. Calorie intake should not fall below
1,200 a day in women or 1,500 a day in men, except under the supervision of a health professional.
Ray Serve scales model inference across a cluster; replicas share GPUs by fractions and autoscale
with load. Images of pages, slides, charts and scanned documents are split into tiles of 512 pixels.
Die Suche liefert Dokumente; der Reranker sortiert sie neu. La recherche trouve des passages et le
reclassement les ordonne. La búsqueda encuentra documentos y el reordenamiento los ordena.
""" * 4


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64


def build_small_tokenizer(out: str, vl: bool) -> None:
    """Train a byte-level BPE tokenizer on a fixed corpus and save HF-style files into ``out``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = LLAMA3_SPECIALS + (VL_SPECIALS if vl else [])
    tok = Tokenizer(models.BPE())
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    pad = "<|finetune_right_pad_id|>" if vl else "<|end_of_text|>"
    eos = "<|eot_id|>" if vl else "<|end_of_text|>"
    cfg = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": 10240 if vl else 8192,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "pad_token": pad}, f, indent=2)


def _copy_tokenizer(src: str, out: str) -> None:
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        raise FileNotFoundError(f"{src} has no tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def _tok_info(out: str) -> tuple[int, dict[str, int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    names = LLAMA3_SPECIALS + VL_SPECIALS
    return tok.get_vocab_size(with_added_tokens=True), {n: tok.token_to_id(n) for n in names}


def _llm_config(s: TinySizes, vocab: int, ids: dict[str, int], pad: int, temperature: float) -> dict:
    return {
        "architectures": ["LlamaBidirectionalForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "llama_bidirectional_model.LlamaBidirectionalConfig",
            "AutoModelForSequenceClassification": "llama_bidirectional_model.LlamaBidirectionalForSequenceClassification",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": ids["<|end_of_text|>"],
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "id2label": {"0": "LABEL_0"},
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate,
        "label2id": {"LABEL_0": 0},
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama_bidirec",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pad_token_id": pad,
        "pooling": "avg",
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "temperature": temperature,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


def _llama_tensors(prefix: str, s: TinySizes, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def lin(o: int, i: int) -> torch.Tensor:
        return torch.randn(o, i, generator=g) / i**0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    t = {f"{prefix}embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    for n in range(s.layers):
        p = f"{prefix}layers.{n}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = lin(q, h)
        t[p + "self_attn.k_proj.weight"] = lin(kv, h)
        t[p + "self_attn.v_proj.weight"] = lin(kv, h)
        t[p + "self_attn.o_proj.weight"] = lin(h, q)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "mlp.gate_proj.weight"] = lin(s.intermediate, h)
        t[p + "mlp.up_proj.weight"] = lin(s.intermediate, h)
        t[p + "mlp.down_proj.weight"] = lin(h, s.intermediate)
    t[f"{prefix}norm.weight"] = norm(h)
    return t


def _vision_tensors(s: TinySizes, g: torch.Generator, image_size: int, patch: int) -> dict[str, torch.Tensor]:
    c, i = s.vision_hidden, s.vision_intermediate
    p = "model.vision_model.vision_model."

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    n_pos = (image_size // patch) ** 2
    t = {
        p + "embeddings.patch_embedding.weight": rnd(c, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        p + "embeddings.patch_embedding.bias": rnd(c, scale=0.1),
        p + "embeddings.position_embedding.weight": rnd(n_pos, c, scale=0.5),
        p + "post_layernorm.weight": 1 + rnd(c, scale=0.1),
        p + "post_layernorm.bias": rnd(c, scale=0.1),
    }
    for n in range(s.vision_layers):
        lp = f"{p}encoder.layers.{n}."
        for ln in ("layer_norm1", "layer_norm2"):
            t[f"{lp}{ln}.weight"] = 1 + rnd(c, scale=0.1)
            t[f"{lp}{ln}.bias"] = rnd(c, scale=0.1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{lp}self_attn.{proj}.weight"] = rnd(c, c, scale=c**-0.5)
            t[f"{lp}self_attn.{proj}.bias"] = rnd(c, scale=0.1)
        t[f"{lp}mlp.fc1.weight"] = rnd(i, c, scale=c**-0.5)
        t[f"{lp}mlp.fc1.bias"] = rnd(i, scale=0.1)
        t[f"{lp}mlp.fc2.weight"] = rnd(c, i, scale=i**-0.5)
        t[f"{lp}mlp.fc2.bias"] = rnd(c, scale=0.1)
    # the SigLIP attention-pooling head: stored in the published checkpoint, never used
    hp = p + "head."
    t[hp + "probe"] = rnd(1, 1, c)
    t[hp + "attention.in_proj_weight"] = rnd(3 * c, c, scale=c**-0.5)
    t[hp + "attention.in_proj_bias"] = rnd(3 * c, scale=0.1)
    t[hp + "attention.out_proj.weight"] = rnd(c, c, scale=c**-0.5)
    t[hp + "attention.out_proj.bias"] = rnd(c, scale=0.1)
    t[hp + "layernorm.weight"] = 1 + rnd(c, scale=0.1)
    t[hp + "layernorm.bias"] = rnd(c, scale=0.1)
    t[hp + "mlp.fc1.weight"] = rnd(i, c, scale=c**-0.5)
    t[hp + "mlp.fc1.bias"] = rnd(i, scale=0.1)
    t[hp + "mlp.fc2.weight"] = rnd(c, i, scale=i**-0.5)
    t[hp + "mlp.fc2.bias"] = rnd(c, scale=0.1)
    return t


def make_tiny(
    kind: str,
    out: str,
    tokenizer: str | None = None,
    sizes: TinySizes = TinySizes(),
    seed: int = 0,
    dtype: str = "float32",
    temperature: float = 0.2,
) -> str:
    """Write a tiny checkpoint of ``kind`` ("text" or "vl") into ``out``; returns ``out``."""
    from safetensors.torch import save_file

    if kind not in ("text", "vl"):
        raise ValueError("kind must be 'text' or 'vl'")
    vl = kind == "vl"
    os.makedirs(out, exist_ok=True)
    if tokenizer:
        _copy_tokenizer(tokenizer, out)
    else:
        build_small_tokenizer(out, vl)
    vocab, ids = _tok_info(out)
    if vl and ids["<IMG_CONTEXT>"] is None:
        raise ValueError("a VL checkpoint needs a tokenizer with <img>, </img> and <IMG_CONTEXT> tokens")
    g = torch.Generator().manual_seed(seed)
    store = getattr(torch, dtype)
    if not vl:
        pad = ids["<|end_of_text|>"]
        config = _llm_config(sizes, vocab, ids, pad, temperature)
        tensors = _llama_tensors("model.", sizes, vocab, g)
        tensors["score.weight"] = torch.randn(1, sizes.hidden, generator=g) / sizes.hidden**0.5 * 4
    else:
        pad = ids["<|finetune_right_pad_id|>"]
        llm = _llm_config(sizes, vocab, ids, ids["<|end_of_text|>"], 1.0)
        image_size, patch = 512, 16
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": sizes.vision_hidden,
            "intermediate_size": sizes.vision_intermediate,
            "num_hidden_layers": sizes.vision_layers,
            "num_attention_heads": sizes.vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch,
            "layer_norm_eps": 1e-06,
            "hidden_act": "gelu_pytorch_tanh",
            "attention_dropout": 0.0,
            "drop_path_rate": 0.1,
        }
        config = {
            "architectures": ["LlamaNemotronVLForSequenceClassification"],
            "model_type": "llama_nemotron_vl_rerank",
            "downsample_ratio": 0.5,
            "force_image_size": image_size,
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "min_dynamic_patch": 1,
            "max_dynamic_patch": 12,
            "max_input_tiles": 4,
            "ps_version": "v2",
            "select_layer": -1,
            "img_context_token_id": ids["<IMG_CONTEXT>"],
            "template": "bidirectional-llama-retriever",
            "prompt_template": "v1",
            "pooling": "avg",
            "bidirectional_attention": False,
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "pad_token_id": pad,
            "vocab_size": vocab,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.47.1",
            "llm_config": llm,
            "vision_config": vision,
        }
        tensors = _llama_tensors("model.language_model.", sizes, vocab, g)
        tensors.update(_vision_tensors(sizes, g, image_size, patch))
        c4, h = sizes.vision_hidden * 4, sizes.hidden
        tensors["model.mlp1.0.weight"] = 1 + 0.1 * torch.randn(c4, generator=g)
        tensors["model.mlp1.0.bias"] = 0.1 * torch.randn(c4, generator=g)
        tensors["model.mlp1.1.weight"] = torch.randn(h, c4, generator=g) / c4**0.5
        tensors["model.mlp1.1.bias"] = 0.1 * torch.randn(h, generator=g)
        tensors["model.mlp1.3.weight"] = torch.randn(h, h, generator=g) / h**0.5
        tensors["model.mlp1.3.bias"] = 0.1 * torch.randn(h, generator=g)
        tensors["score.weight"] = torch.randn(1, h, generator=g) / h**0.5 * 4
        proc = {
            "processor_class": "LlamaNemotronVLRerankProcessor",
            "max_input_tiles": 6,
            "num_image_token": 256,
            "per_tile_len": 256,
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "padding": True,
            "pad_to_multiple_of": None,
            "prompt_template": "v1",
            "template": "bidirectional-llama-retriever",
        }
        with open(os.path.join(out, "processor_config.json"), "w") as f:
            json.dump(proc, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.to(store).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out
