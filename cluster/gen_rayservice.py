#!/usr/bin/env python3
"""Render the cluster manifests from serve_config.yaml, the one source of truth of the Serve config.

    python cluster/gen_rayservice.py            # (re)write the generated files
    python cluster/gen_rayservice.py --check    # exit 1 with a diff if a committed file is stale

Generated files (never edit them by hand):

- ``cluster/rayservice.yaml``: the KubeRay RayService. Everything but ``serveConfigV2`` comes from
  ``cluster/rayservice.yaml.tmpl``; ``serveConfigV2`` is serve_config.yaml with two overrides per
  application: ``args.accelerator: gpu`` (the GPU group starts at zero pods, so ``auto`` would resolve to
  cpu at deploy time) and ``args.auth.api_keys_file`` pointed at the mounted Secret.
- ``cluster/prefetch-weights-job.yaml``: the one-shot Job that fills the Hugging Face cache volume with
  the checkpoints named in serve_config.yaml (from ``cluster/prefetch-weights-job.yaml.tmpl``).
- ``cluster/serve_config.vm.yaml``: the same Serve config for a ``ray up`` cluster, keys file on the VM.

Values derived from the Serve config (so scaling is edited in one place): the GPU worker group's
``maxReplicas`` (enough GPUs for every scorer at ``max_replicas``) and its logical ``num-cpus`` (only
what the scorers packed on one GPU ask for, so CPU-only replicas are not placed on GPU pods).

Output is deterministic: keys keep the order of serve_config.yaml, nothing depends on time or host.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ---------------------------------------------------------------------------------------------- settings
# The container image built from cluster/Dockerfile. PLACEHOLDER: replace the registry/repository with
# yours, then run this script again (the value is substituted into every generated manifest).
IMAGE = "registry.example.com/REPLACE-ME/nemotron-rerank:0.1.0"
RAY_VERSION = "2.60.0"
NAMESPACE = "rerank"
GPUS_PER_NODE = 1  # nvidia.com/gpu of one GPU worker pod (keep in sync with rayservice.yaml.tmpl)

# Where the Kubernetes Secret with the API keys is mounted (directory) and the key inside it (file).
API_KEYS_SECRET = "rerank-api-keys"
API_KEYS_DIR = "/etc/rerank/api-keys"
API_KEYS_FILE = f"{API_KEYS_DIR}/keys"
# The keys file on `ray up` VMs (file_mounts in ray-cluster.yaml copy cluster/.secrets/ there).
VM_API_KEYS_FILE = "/home/ubuntu/rerank-secrets/keys"

# The Hugging Face cache volume (PersistentVolumeClaim in pvc.yaml) and HF_HOME inside the pods.
HF_CACHE_CLAIM = "rerank-hf-cache"
HF_HOME = "/data/huggingface"

# Checkpoint files a serving copy needs; must equal rerank_core.checkpoint.CHECKPOINT_PATTERNS (a test
# checks it; it is repeated here so this script does not import torch).
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
# Checkpoints prefetched although serve_config.yaml does not serve them (yet). The multimodal reranker
# is downloaded ahead so that adding it to serve_config.yaml needs no second prefetch run.
EXTRA_PREFETCH = [("nvidia/llama-nemotron-rerank-vl-1b-v2", None)]

SERVE_CONFIG = REPO / "serve_config.yaml"
RAYSERVICE_TEMPLATE = HERE / "rayservice.yaml.tmpl"
PREFETCH_TEMPLATE = HERE / "prefetch-weights-job.yaml.tmpl"
RAYSERVICE_OUT = HERE / "rayservice.yaml"
PREFETCH_OUT = HERE / "prefetch-weights-job.yaml"
VM_SERVE_CONFIG_OUT = HERE / "serve_config.vm.yaml"

GENERATOR = "cluster/gen_rayservice.py"


# ------------------------------------------------------------------------------------------- serve config
def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or not cfg.get("applications"):
        raise SystemExit(f"{path}: not a Serve config with `applications`")
    return cfg


# Ray node label of the RayService's CPU worker group (workerGroupSpecs[].labels). The ingress and preprocess
# replicas select it, so they never land on a GPU pod: those advertise only the CPUs their scorers ask for,
# and a CPU replica there would leave a scorer unschedulable.
CPU_POOL_LABEL = {"rerank-pool": "cpu"}


def with_overrides(cfg: dict[str, Any], api_keys_file: str, pin_cpu_pool: bool = False) -> dict[str, Any]:
    """serve_config.yaml as the cluster runs it: GPUs always, keys from the mounted Secret; with
    ``pin_cpu_pool`` (the RayService), CPU deployments select the CPU worker group's node label."""
    out = copy.deepcopy(cfg)
    for app in out["applications"]:
        args = app.setdefault("args", {})
        if args is None:
            args = app["args"] = {}
        args["accelerator"] = "gpu"
        auth = args.get("auth") or {}
        auth["api_keys_file"] = api_keys_file
        args["auth"] = auth
        if pin_cpu_pool:
            for part in [args.setdefault("ingress", {})] + [m.setdefault("preprocess", {}) for m in args.get("models", [])]:
                part["label_selector"] = dict(CPU_POOL_LABEL)
    return out


def app_args(cfg: dict[str, Any]) -> list[Any]:
    """Each application's args, validated (and filled with defaults) by deployments.config.AppArgs."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from deployments.config import AppArgs  # pydantic only; no torch, no ray

    return [AppArgs.model_validate(app.get("args") or {}) for app in cfg["applications"]]


def _max_replicas(dep: Any) -> int:
    if dep.num_replicas is not None:
        return dep.num_replicas
    if dep.autoscaling is not None:
        return dep.autoscaling.max_replicas
    return 1


def gpu_group_max_replicas(cfg: dict[str, Any], gpus_per_node: int = GPUS_PER_NODE) -> int:
    """GPU pods needed to run every scorer at max_replicas (fractions pack per GPU, never across)."""
    gpus = 0
    for args in app_args(cfg):
        for m in args.models:
            g = m.scorer.num_gpus
            if g <= 0:
                continue
            if math.ceil(g) > gpus_per_node:
                raise SystemExit(f"{m.id}: a scorer asks {g} GPUs, a GPU pod has {gpus_per_node}")
            if g < 1:
                gpus += math.ceil(_max_replicas(m.scorer) / math.floor(1 / g + 1e-9))
            else:
                gpus += _max_replicas(m.scorer) * math.ceil(g)
    return max(1, math.ceil(gpus / gpus_per_node))


def gpu_node_num_cpus(cfg: dict[str, Any], gpus_per_node: int = GPUS_PER_NODE) -> int:
    """Logical CPUs a GPU pod advertises: what scorers filling its GPUs ask for, and no more.

    With spare logical CPUs there, Ray could place CPU-only replicas (ingress, preprocess) on GPU pods,
    which keeps expensive pods from scaling down. ``ray start --num-cpus`` takes an integer.
    """
    ratio = 0.0
    for args in app_args(cfg):
        for m in args.models:
            if m.scorer.num_gpus > 0:
                ratio = max(ratio, m.scorer.num_cpus / m.scorer.num_gpus)
    return max(1, math.ceil(ratio * gpus_per_node - 1e-9))


def hub_sources(cfg: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(hub id, revision) of every served model whose source is a hub id, then EXTRA_PREFETCH; unique."""
    seen: list[tuple[str, str | None]] = []
    for args in app_args(cfg):
        for m in args.models:
            src = m.source
            if src.startswith((".", "/", "~")) or src.count("/") != 1:
                continue  # a local directory: nothing to download
            if (src, m.revision) not in seen:
                seen.append((src, m.revision))
    for item in EXTRA_PREFETCH:
        if item[0] not in {s for s, _ in seen}:
            seen.append(item)
    return seen


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


# ------------------------------------------------------------------------------------------- templating
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def render(template: str, values: dict[str, str], name: str) -> str:
    """Fill ``{{ key }}`` placeholders. A placeholder alone on its line takes a multi-line value,
    indented to the placeholder's column; elsewhere the value must be one line. Unknown or unused keys
    are errors, so the template and this script cannot drift apart silently."""
    used: set[str] = set()
    out: list[str] = []
    for lineno, line in enumerate(template.splitlines(), 1):
        stripped = line.strip()
        whole = _PLACEHOLDER.fullmatch(stripped)
        if whole:
            key = whole.group(1)
            if key not in values:
                raise KeyError(f"{name}:{lineno}: unknown placeholder {{{{ {key} }}}}")
            used.add(key)
            indent = line[: len(line) - len(line.lstrip())]
            out.extend((indent + v) if v else "" for v in values[key].splitlines())
            continue

        def sub(match: re.Match, lineno: int = lineno) -> str:
            key = match.group(1)
            if key not in values:
                raise KeyError(f"{name}:{lineno}: unknown placeholder {{{{ {key} }}}}")
            if "\n" in values[key]:
                raise ValueError(f"{name}:{lineno}: multi-line value for inline placeholder {key}")
            used.add(key)
            return values[key]

        out.append(_PLACEHOLDER.sub(sub, line))
    unused = set(values) - used
    if unused:
        raise KeyError(f"{name}: values never used: {sorted(unused)}")
    return "\n".join(out) + "\n"


def header(source: str) -> str:
    return (
        f"# GENERATED by {GENERATOR} from {source}.\n"
        f"# Do not edit by hand: change those files, run `python {GENERATOR}` and commit the result\n"
        f"# (`python {GENERATOR} --check` fails when this file is stale).\n"
    )


def build(serve_config_path: Path = SERVE_CONFIG) -> dict[Path, str]:
    """Every generated file's path and content."""
    cfg = load_serve_config(serve_config_path)
    k8s_cfg = with_overrides(cfg, API_KEYS_FILE, pin_cpu_pool=True)
    vm_cfg = with_overrides(cfg, VM_API_KEYS_FILE)
    app_args(k8s_cfg)  # refuse to render args the app would reject

    serve_v2 = (
        f"# Generated from serve_config.yaml by {GENERATOR}: accelerator gpu, keys from the Secret.\n"
        + dump_yaml(k8s_cfg)
    )
    common = {"image": IMAGE, "namespace": NAMESPACE, "hf_home": HF_HOME, "hf_cache_claim": HF_CACHE_CLAIM}
    rayservice = header("cluster/rayservice.yaml.tmpl and serve_config.yaml") + render(
        RAYSERVICE_TEMPLATE.read_text(encoding="utf-8"),
        {
            **common,
            "ray_version": RAY_VERSION,
            "serve_config_v2": serve_v2,
            "gpu_max_replicas": str(gpu_group_max_replicas(k8s_cfg)),
            "gpu_num_cpus": str(gpu_node_num_cpus(k8s_cfg)),
            "cpu_pool_label": ", ".join(f"{k}: {v}" for k, v in CPU_POOL_LABEL.items()),
            "api_keys_secret": API_KEYS_SECRET,
            "api_keys_dir": API_KEYS_DIR,
        },
        RAYSERVICE_TEMPLATE.name,
    )

    downloads = []
    for repo_id, revision in hub_sources(cfg):
        cmd = f"hf download {repo_id}"
        if revision:
            cmd += f" --revision {revision}"
        cmd += "".join(f" --include '{p}'" for p in CHECKPOINT_PATTERNS)
        downloads.append(cmd)
    script = "\n".join(
        [
            "set -euo pipefail",
            "# `hf` is the CLI of huggingface_hub >= 0.34 (formerly `huggingface-cli download`).",
            'command -v hf >/dev/null || { echo "the hf CLI (huggingface_hub>=0.34) is missing" >&2; exit 1; }',
            *downloads,
            f'du -sh "{HF_HOME}"',
        ]
    )
    prefetch = header("cluster/prefetch-weights-job.yaml.tmpl and serve_config.yaml") + render(
        PREFETCH_TEMPLATE.read_text(encoding="utf-8"),
        {**common, "download_script": script},
        PREFETCH_TEMPLATE.name,
    )

    vm = (
        header("serve_config.yaml")
        + "# For a `ray up` cluster (cluster/ray-cluster.yaml): accelerator gpu (the GPU node type starts at\n"
        + "# zero nodes), API keys from the file that file_mounts copies to every node.\n"
        + "# Deploy: serve deploy cluster/serve_config.vm.yaml (see cluster/README.md).\n"
        + dump_yaml(vm_cfg)
    )
    return {RAYSERVICE_OUT: rayservice, PREFETCH_OUT: prefetch, VM_SERVE_CONFIG_OUT: vm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 with a diff if a file is stale")
    p.add_argument("--serve-config", type=Path, default=SERVE_CONFIG, help="the Serve config to render from")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="compare/write the generated files in this directory instead"
    )
    a = p.parse_args(argv)
    files = build(a.serve_config)
    stale = 0
    for path, text in files.items():
        target = (a.out_dir / path.name) if a.out_dir else path
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current == text:
            continue
        stale += 1
        if a.check:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    text.splitlines(keepends=True),
                    fromfile=f"{target} (committed)",
                    tofile=f"{target} (generated)",
                )
            )
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if a.check and stale:
        print(f"\n{stale} generated file(s) are stale: run `python {GENERATOR}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
