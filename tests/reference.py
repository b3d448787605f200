"""An independent reference of the text cross-encoder for parity tests.

Built from transformers' own Llama layers (``LlamaDecoderLayer``, ``LlamaRMSNorm``,
``LlamaRotaryEmbedding``) with eager attention and a 4D key-padding mask instead of a causal one, the
transformers tokenizer with left padding and right truncation, and positions 0..L-1 over the padded
length - the way NVIDIA's reference code runs the published checkpoint.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

PROMPT = "question:{query} \n \n passage:{passage}"


def hf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(path, "tokenizer.json"),
        bos_token=cfg.get("bos_token"),
        eos_token=cfg.get("eos_token"),
        pad_token=cfg.get("pad_token"),
    )
    tok.padding_side = "left"
    return tok


class ReferenceTextReranker(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map", "model_type")}
        self.config = LlamaConfig(**raw)
        self.config._attn_implementation = "eager"
        c = self.config
        self.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList(LlamaDecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(c)
        self.score = torch.nn.Linear(c.hidden_size, 1, bias=False)
        sd = load_file(os.path.join(path, "model.safetensors"))
        mine = {k.removeprefix("model."): v.float() for k, v in sd.items()}
        self.load_state_dict(mine, strict=True)
        self.tokenizer = hf_tokenizer(path)
        self.eval()

    @torch.no_grad()
    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, length = input_ids.shape
        h = self.embed_tokens(input_ids)
        pos = torch.arange(length)[None].expand(b, -1)
        cos_sin = self.rotary(h, pos)
        mask = torch.zeros(b, 1, length, length)
        mask = mask.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        h = self.norm(h)
        m = attention_mask[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)
        return self.score(pooled)[:, 0]

    def score_pairs(self, query: str, docs: list[str], max_length: int = 8192) -> list[float]:
        texts = [PROMPT.format(query=query, passage=d) for d in docs]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return self.forward_ids(enc["input_ids"], enc["attention_mask"]).tolist()
