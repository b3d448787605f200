"""Finding a checkpoint and loading its tensors strictly.

``resolve_source`` turns a local directory or a Hugging Face hub id into a local directory; the hub is
asked only when the id is not a directory, and a missing copy fails fast with a message that says what
was tried and how to point at a local copy. ``load_state_dict_strict`` reads ``model.safetensors`` or a
sharded ``model.safetensors.index.json`` and fills a module whose parameter names are the published key
names, refusing missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import CheckpointError, WeightsNotFound

log = logging.getLogger("rerank_core.checkpoint")

# Files a serving copy needs (no optimizer state, no remote code).
CHECKPOINT_PATTERNS = [
    "config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
]


def resolve_source(
    source: str, revision: str | None = None, cache_dir: str | None = None, weights: bool = True
) -> str:
    """Return a local directory holding the checkpoint named by ``source``.

    ``source`` is a local directory, or a hub id such as ``nvidia/llama-nemotron-rerank-1b-v2``, resolved
    with ``huggingface_hub`` from the local cache first and then from the network (unless
    ``HF_HUB_OFFLINE=1``). ``weights=False`` fetches only configs and tokenizer files (preprocessing).
    """
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise WeightsNotFound(
            f"model source {source!r} is not a directory and not a hub id (owner/name). "
            "Point `source` at a local checkpoint directory holding config.json, tokenizer.json and "
            "model.safetensors."
        )
    patterns = CHECKPOINT_PATTERNS if weights else [p for p in CHECKPOINT_PATTERNS if "safetensors" not in p]
    tried = []
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise WeightsNotFound(f"{source}: huggingface_hub is not installed; use a local directory") from None
    try:
        path = snapshot_download(
            source, revision=revision, allow_patterns=patterns, cache_dir=cache_dir, local_files_only=True
        )
        log.info("model %s found in the local Hugging Face cache at %s", source, path)
        return path
    except Exception as e:  # noqa: BLE001 - any cache miss means "try the network"
        tried.append(f"the local Hugging Face cache ({type(e).__name__})")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        t0 = time.monotonic()
        log.info("downloading %s (revision %s) from the Hugging Face hub", source, revision or "main")
        try:
            path = snapshot_download(
                source, revision=revision, allow_patterns=patterns, cache_dir=cache_dir, etag_timeout=10
            )
            log.info("downloaded %s in %.1f s to %s", source, time.monotonic() - t0, path)
            return path
        except Exception as e:  # noqa: BLE001
            tried.append(f"a download from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    else:
        tried.append("no download: HF_HUB_OFFLINE is set")
    raise WeightsNotFound(
        f"could not find the weights of {source!r} (revision {revision or 'main'}). Tried: "
        + "; ".join(tried)
        + ". Download them where there is network (`huggingface-cli download "
        + source
        + " --local-dir DIR`) and set the model's `source` to that directory, or set HF_HOME to a cache that holds them."
    )


def safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint directory: one ``model.safetensors`` or the shards of an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise WeightsNotFound(f"{path}: shards listed in model.safetensors.index.json are missing: {missing[:5]}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise WeightsNotFound(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(
    module: nn.Module,
    path: str,
    key_map: Callable[[str], str | None] = lambda k: k,
    dtype: torch.dtype = torch.float32,
    keep_float32: Callable[[str], bool] = lambda k: False,
) -> None:
    """Fill ``module`` from the checkpoint at ``path``.

    ``key_map`` turns a checkpoint key into the module's parameter name, or ``None`` for a tensor that is
    known and deliberately unused (the SigLIP attention-pooling head). Tensors are cast to ``dtype``
    except where ``keep_float32(name)``. Any missing, unexpected or mis-shaped tensor raises
    ``CheckpointError`` before the module is touched.
    """
    from safetensors import safe_open

    t0 = time.monotonic()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    files = safetensors_files(path)
    located: dict[str, tuple[str, str]] = {}
    unexpected, misshaped = [], []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key_map(key)
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[name]:
                    misshaped.append(f"{key}: checkpoint {list(shape)} vs model {list(expected[name])}")
                located[name] = (file, key)
    missing = set(expected) - set(located)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_summarise(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_summarise(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + "; ".join(problems))

    state: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (file, key) in located.items():
        by_file.setdefault(file, []).append((name, key))
    n_bytes = 0
    for file, items in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name, key in items:
                t = f.get_tensor(key)
                n_bytes += t.numel() * t.element_size()
                state[name] = t.to(torch.float32 if keep_float32(name) else dtype)
    module.load_state_dict(state, strict=True, assign=True)
    log.info(
        "loaded %d tensors (%.1f MB) from %d file(s) in %s in %.1f s",
        len(state),
        n_bytes / 1e6,
        len(files),
        path,
        time.monotonic() - t0,
    )
