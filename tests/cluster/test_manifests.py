"""The cluster manifests: schema-valid, in sync with serve_config.yaml, and shaped as the README says."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED = Path(os.environ.get("RERANK_SHARED_DIR", REPO.parent / "shared"))
RAYSERVICE_SCHEMA = SHARED / "schemas" / "rayservice_v1.json"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_rayservice", CLUSTER / "gen_rayservice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


@pytest.fixture(scope="module")
def rs() -> dict:
    return load("rayservice.yaml")


@pytest.fixture(scope="module")
def serve_v2(rs) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((REPO / "serve_config.yaml").read_text())


def groups(rs: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def head(rs: dict) -> dict:
    return rs["spec"]["rayClusterConfig"]["headGroupSpec"]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------- RayService JSON schema
@pytest.fixture(scope="module")
def rayservice_validator():
    if not RAYSERVICE_SCHEMA.exists():
        pytest.skip(f"KubeRay RayService schema not found at {RAYSERVICE_SCHEMA} (set RERANK_SHARED_DIR)")
    import jsonschema

    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_rayservice_validates_against_kuberay_schema(rs, rayservice_validator):
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert _errors(rayservice_validator, rs) == []


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("typo_in_group_key", "groupNam"),
        ("string_replicas", "'four' is not of type 'integer'"),
        ("typo_in_container_key", "imagePullPolicyy"),
        ("typo_in_spec_key", "serveConfigV3"),
    ],
)
def test_schema_is_strict_and_rejects_broken_copies(rs, rayservice_validator, breakage, expected):
    broken = copy.deepcopy(rs)
    gpu = broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    if breakage == "typo_in_group_key":
        gpu["groupNam"] = gpu.pop("groupName")
    elif breakage == "string_replicas":
        gpu["maxReplicas"] = "four"
    elif breakage == "typo_in_container_key":
        gpu["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    else:
        broken["spec"]["serveConfigV3"] = broken["spec"].pop("serveConfigV2")
    errors = _errors(rayservice_validator, broken)
    assert errors, f"{breakage} was accepted"
    assert any(expected in e for e in errors), errors


# ------------------------------------------------------------------------- serveConfigV2 and drift
def test_serve_config_v2_is_a_valid_serve_config(serve_v2):
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import AppArgs

    ServeDeploySchema.model_validate(serve_v2)
    for app in serve_v2["applications"]:
        args = AppArgs.model_validate(app["args"])
        assert args.accelerator == "gpu"
        assert args.auth.api_keys_file == gen.API_KEYS_FILE


def test_serve_config_v2_is_serve_config_plus_the_overrides(serve_v2, serve_config):
    """Undo the intended overrides (accelerator, keys file, the CPU pool's label selector); what is left must
    be serve_config.yaml exactly."""
    undone = copy.deepcopy(serve_v2)
    for got, orig in zip(undone["applications"], serve_config["applications"], strict=True):
        got["args"]["accelerator"] = orig["args"]["accelerator"]
        got["args"]["auth"]["api_keys_file"] = orig["args"]["auth"]["api_keys_file"]
        for part in [got["args"]["ingress"]] + [m["preprocess"] for m in got["args"]["models"]]:
            assert part.pop("label_selector") == gen.CPU_POOL_LABEL
    assert undone == serve_config


def test_committed_files_match_the_generator():
    r = subprocess.run(
        [sys.executable, str(CLUSTER / "gen_rayservice.py"), "--check"],
        check=False, cwd=REPO, capture_output=True, text=True,
    )
    assert r.returncode == 0, f"stale generated files; run `python cluster/gen_rayservice.py`\n{r.stdout}{r.stderr}"


def test_check_mode_detects_drift(tmp_path, serve_config):
    """A changed serve_config.yaml makes --check fail with a diff naming the change."""
    changed = copy.deepcopy(serve_config)
    changed["applications"][0]["args"]["limits"]["max_documents"] = 123
    cfg = tmp_path / "serve_config.yaml"
    cfg.write_text(yaml.safe_dump(changed, sort_keys=False))
    for name in ("rayservice.yaml", "prefetch-weights-job.yaml", "serve_config.vm.yaml"):
        (tmp_path / name).write_text((CLUSTER / name).read_text())
    r = subprocess.run(
        [sys.executable, str(CLUSTER / "gen_rayservice.py"), "--check", "--serve-config", str(cfg),
         "--out-dir", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, text=True,
    )
    assert r.returncode == 1
    assert "-          max_documents: 1000" in r.stdout and "+          max_documents: 123" in r.stdout
    # and the committed file is left alone in check mode
    assert (tmp_path / "rayservice.yaml").read_text() == (CLUSTER / "rayservice.yaml").read_text()


def test_generator_is_deterministic():
    assert gen.build() == gen.build()
    text = (CLUSTER / "rayservice.yaml").read_text()
    assert text.startswith("# GENERATED by cluster/gen_rayservice.py")
    assert "{{" not in text and "}}" not in text


def test_render_rejects_unknown_and_unused_placeholders():
    with pytest.raises(KeyError):
        gen.render("a: {{ nope }}\n", {}, "t")
    with pytest.raises(KeyError):
        gen.render("a: 1\n", {"unused": "x"}, "t")
    assert gen.render("a:\n  {{ block }}\n", {"block": "x: 1\ny: 2"}, "t") == "a:\n  x: 1\n  y: 2\n"


def test_vm_serve_config_is_serve_config_with_vm_overrides(serve_config):
    from ray.serve.schema import ServeDeploySchema

    vm = load("serve_config.vm.yaml")
    ServeDeploySchema.model_validate(vm)
    assert vm == gen.with_overrides(serve_config, gen.VM_API_KEYS_FILE)
    # ray-cluster.yaml copies the keys directory to the path the config names
    mounts = load("ray-cluster.yaml")["file_mounts"]
    assert os.path.dirname(gen.VM_API_KEYS_FILE) in mounts


# ------------------------------------------------------------------------------ cluster shape
def test_ray_version_image_and_autoscaling(rs):
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == "2.60.0"
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["version"] == "v2"
    images = {ray_container(head(rs))["image"]} | {ray_container(g)["image"] for g in groups(rs).values()}
    assert images == {gen.IMAGE}
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_head_runs_no_replicas_and_exposes_dashboard_and_metrics(rs):
    h = head(rs)
    assert h["rayStartParams"]["num-cpus"] == "0"
    assert h["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    c = ray_container(h)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == 8080 and ports["dashboard"] == 8265 and ports["serve"] == 8000
    assert not any("gpu" in k for k in c["resources"]["limits"])
    # KubeRay deploys serveConfigV2 only once the head is Ready: an app readiness probe would deadlock
    assert "readinessProbe" not in c


def test_gpu_group_scales_from_zero_with_one_gpu_per_pod(rs, serve_v2):
    g = groups(rs)["gpu"]
    assert g["minReplicas"] == 0 and g["replicas"] == 0
    assert g["maxReplicas"] >= 1 and isinstance(g["idleTimeoutSeconds"], int)
    res = ray_container(g)["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "1"
    # enough GPU pods for every scorer at max_replicas (0.5 GPU each -> two per pod)
    need = 0
    for app in serve_v2["applications"]:
        for m in app["args"]["models"]:
            sc = m["scorer"]
            per_gpu = int(1 / sc["num_gpus"] + 1e-9)
            need += -(-sc["autoscaling"]["max_replicas"] // per_gpu)
    assert g["maxReplicas"] == need
    # logical CPUs: just what the scorers sharing the GPU ask for
    cpus = max(
        m["scorer"]["num_cpus"] * int(1 / m["scorer"]["num_gpus"] + 1e-9)
        for app in serve_v2["applications"] for m in app["args"]["models"]
    )
    assert int(g["rayStartParams"]["num-cpus"]) == max(1, round(cpus))
    assert any(t.get("key") == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))


def test_cpu_group_for_ingress_and_preprocessing(rs):
    g = groups(rs)["cpu"]
    assert g["minReplicas"] >= 1 and g["maxReplicas"] >= g["minReplicas"]
    assert not any("gpu" in k for k in ray_container(g)["resources"]["limits"])


def test_cpu_deployments_select_the_cpu_group_label(rs, serve_v2):
    # GPU pods advertise only their scorers' CPUs: an ingress or preprocess replica there would starve a scorer
    labels = groups(rs)["cpu"]["labels"]
    assert labels == gen.CPU_POOL_LABEL and "labels" not in groups(rs)["gpu"]
    for app in serve_v2["applications"]:
        args = app["args"]
        assert args["ingress"]["label_selector"] == labels
        for m in args["models"]:
            assert m["preprocess"]["label_selector"] == labels, m["name"]
            assert "label_selector" not in m["scorer"], m["name"]


def test_every_container_has_requests_and_limits(rs):
    rc = rs["spec"]["rayClusterConfig"]
    containers = [c for c in head(rs)["template"]["spec"]["containers"]]
    for g in groups(rs).values():
        containers += g["template"]["spec"]["containers"]
    containers.append({"name": "autoscaler", "resources": rc["autoscalerOptions"]["resources"]})
    for doc in load_all("prefetch-weights-job.yaml"):
        containers += doc["spec"]["template"]["spec"]["containers"]
    for c in containers:
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)


def test_workers_are_ready_only_when_the_app_is(rs):
    for name, g in groups(rs).items():
        c = ray_container(g)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["serve"] == 8000 and ports["metrics"] == 8080
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/v1/health/ready" and probe["port"] == "serve", name
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True


def test_hf_cache_volume_and_api_keys_secret_are_mounted(rs):
    pvc = load("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    secrets = {d["metadata"]["name"]: d for d in load_all("secret.example.yaml")}
    keys_secret = secrets[gen.API_KEYS_SECRET]
    key_name = os.path.basename(gen.API_KEYS_FILE)
    assert key_name in keys_secret["stringData"]
    for name, g in groups(rs).items():
        spec = g["template"]["spec"]
        c = spec["containers"][0]
        vols = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert env_of(c)["HF_HOME"]["value"] == mounts["hf-cache"]["mountPath"] == gen.HF_HOME, name
        assert vols["hf-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], name
        assert env_of(c)["HF_HUB_OFFLINE"]["value"] == "1", name
        assert vols["api-keys"]["secret"]["secretName"] == gen.API_KEYS_SECRET, name
        assert mounts["api-keys"]["mountPath"] == os.path.dirname(gen.API_KEYS_FILE), name
        assert mounts["api-keys"]["readOnly"] is True
        assert "subPath" not in mounts["api-keys"]  # subPath mounts never see Secret updates


def test_prefetch_job_downloads_every_served_checkpoint(serve_config, rs):
    from rerank_core.checkpoint import CHECKPOINT_PATTERNS

    assert gen.CHECKPOINT_PATTERNS == CHECKPOINT_PATTERNS
    (job,) = load_all("prefetch-weights-job.yaml")
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    script = c["args"][0]
    served = [m["source"] for app in serve_config["applications"] for m in app["args"]["models"]]
    for source in [*served, "nvidia/llama-nemotron-rerank-vl-1b-v2"]:
        line = next((ln for ln in script.splitlines() if ln.startswith(f"hf download {source} ")), None)
        assert line is not None, source
        for pattern in CHECKPOINT_PATTERNS:
            assert f"--include '{pattern}'" in line
    mount = c["volumeMounts"][0]
    assert mount["mountPath"] == env_of(c)["HF_HOME"]["value"] == gen.HF_HOME
    assert not mount.get("readOnly")
    claim = {v["name"]: v for v in spec["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == load("pvc.yaml")["metadata"]["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert env_of(c)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_podmonitor_scrapes_the_ray_metrics_port(rs):
    (pm,) = load_all("podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert rs["metadata"]["namespace"] in pm["spec"]["namespaceSelector"]["matchNames"]
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.pop("ray.io/is-ray-node") == "yes"  # set by KubeRay on every Ray pod
    pods = [head(rs)] + list(groups(rs).values())
    for p in pods:
        labels = p["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items()), labels
    head_ports = {p["name"] for p in ray_container(head(rs))["ports"]}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= head_ports


def test_manifests_parse_with_expected_kinds():
    kinds = {
        "rayservice.yaml": ["RayService"],
        "pvc.yaml": ["PersistentVolumeClaim"],
        "secret.example.yaml": ["Secret", "Secret"],
        "podmonitor.yaml": ["PodMonitor"],
        "prefetch-weights-job.yaml": ["Job"],
    }
    for name, expected in kinds.items():
        docs = load_all(name)
        assert [d["kind"] for d in docs] == expected, name
        for d in docs:
            assert d["metadata"]["namespace"] == gen.NAMESPACE, name


# ------------------------------------------------------------------------------ no secrets in git
SECRET_PATTERNS = {
    "hugging face token": re.compile(r"\bhf_[A-Za-z0-9]{20,}"),
    "openai-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),
    "nvidia api key": re.compile(r"\bnvapi-[A-Za-z0-9_-]{16,}"),
    "aws access key": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "bearer literal": re.compile(r"Bearer\s+(?!\$|<|\{)[A-Za-z0-9._~+/-]{20,}"),
}


def _cluster_files() -> list[Path]:
    return [p for p in sorted(CLUSTER.rglob("*")) if p.is_file() and ".secrets" not in p.parts
            and "__pycache__" not in p.parts]


def test_no_literal_secrets_anywhere_in_cluster():
    assert len(_cluster_files()) >= 10
    for path in _cluster_files():
        text = path.read_text(errors="replace")
        for what, pattern in SECRET_PATTERNS.items():
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(REPO)}: looks like a {what}: {m.group(0)[:12]}..."


def test_secret_scan_catches_a_planted_key():
    planted = "token: hf_" + "a1B2c3D4e5F6g7H8i9J0kLmN"
    assert SECRET_PATTERNS["hugging face token"].search(planted)
    assert SECRET_PATTERNS["bearer literal"].search("-H 'Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123'")
    assert not SECRET_PATTERNS["bearer literal"].search('-H "Authorization: Bearer $RERANK_API_KEY"')


def test_secret_example_holds_placeholders_only():
    for doc in load_all("secret.example.yaml"):
        assert doc["kind"] == "Secret" and "data" not in doc  # no base64 blobs to hide real values
        for value in doc["stringData"].values():
            for line in filter(None, (s.strip() for s in value.splitlines())):
                assert line.startswith("REPLACE_"), line
    assert "EXAMPLE ONLY" in (CLUSTER / "secret.example.yaml").read_text()


def test_secret_env_vars_come_from_secret_refs(rs):
    containers = [ray_container(head(rs))] + [ray_container(g) for g in groups(rs).values()]
    containers += [c for d in load_all("prefetch-weights-job.yaml") for c in d["spec"]["template"]["spec"]["containers"]]
    for c in containers:
        for e in c.get("env", []):
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", e["name"]):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


# ------------------------------------------------------------------------------ ray up config
@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_ray_cluster_yaml_validates_against_rays_schema(ray_schema):
    import jsonschema
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = load("ray-cluster.yaml")
    jsonschema.Draft7Validator(ray_schema).validate(cfg)
    validate_config(cfg)  # ray's own helper: schema + head type + min/max workers checks
    validate_config(fillout_defaults(copy.deepcopy(cfg)))  # as `ray up` sees it, AWS defaults merged


@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "string_gpu_count", "missing_node_config",
                                      "undeclared_head_type", "max_workers_too_small"])
def test_broken_ray_cluster_yaml_is_rejected(breakage):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = load("ray-cluster.yaml")
    types = cfg["available_node_types"]
    if breakage == "unknown_top_level_key":
        cfg["max_worker"] = cfg.pop("max_workers")
    elif breakage == "string_gpu_count":
        types["gpu_worker"]["resources"]["GPU"] = "one"
    elif breakage == "missing_node_config":
        del types["cpu_worker"]["node_config"]
    elif breakage == "undeclared_head_type":
        cfg["head_node_type"] = "head_typo"
    else:
        cfg["max_workers"] = 0
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(cfg)


def test_ray_cluster_yaml_shape():
    cfg = load("ray-cluster.yaml")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["gpu_worker"]["min_workers"] == 0
    assert "GPU" not in types["cpu_worker"]["resources"] and types["cpu_worker"]["min_workers"] >= 1
    assert any(re.search(r"pip install .*~/rerank\b", c) for c in cfg["setup_commands"])
    assert not any("constraints-cpu" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["/home/ubuntu/rerank"] == "."
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:  # the image's Serve mode
        if "ray start" in c:
            assert "RAY_SERVE_ENABLE_HA_PROXY=1" in c and "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in c, c


def test_ray_cluster_gpu_nodes_fit_the_serve_config(serve_config):
    """Hand-written ray-cluster.yaml must still fit serve_config.yaml's scorers (same rules as the GPU group)."""
    gpu = load("ray-cluster.yaml")["available_node_types"]["gpu_worker"]
    k8s = gen.with_overrides(serve_config, gen.API_KEYS_FILE)
    assert gpu["max_workers"] >= gen.gpu_group_max_replicas(k8s, gpus_per_node=gpu["resources"]["GPU"])
    assert gpu["resources"]["CPU"] == gen.gpu_node_num_cpus(k8s, gpus_per_node=gpu["resources"]["GPU"])
