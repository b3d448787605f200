"""The Grafana dashboard parses and plots only metrics the service actually exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def exported_metric_names() -> set[str]:
    src = (REPO / "deployments" / "metrics.py").read_text()
    names = set()
    for kind, name in re.findall(r'(Counter|Gauge|Histogram)\(\s*"([a-z_]+)"', src):
        base = "ray_" + name
        names |= {base + "_total"} if kind == "Counter" else {base}
        if kind == "Histogram":
            names |= {base + "_bucket", base + "_sum", base + "_count"}
    return names


def test_dashboard_uses_exported_metrics():
    dash = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 8 and all(p["title"] for p in dash["panels"])
    used = {m for e in exprs for m in re.findall(r"\b(ray_rerank_[a-z_]+)", e)}
    known = exported_metric_names()
    assert used and used <= known, sorted(used - known)
    # the list: requests by route/model/status, pairs and tokens, padding, batch histograms, latencies
    for needed in ("ray_rerank_requests_total", "ray_rerank_pairs_scored_total", "ray_rerank_tokens_scored_total",
                   "ray_rerank_padded_tokens_total", "ray_rerank_batch_pairs_bucket", "ray_rerank_batch_tokens_bucket",
                   "ray_rerank_queue_wait_ms_bucket", "ray_rerank_preprocess_latency_ms_bucket",
                   "ray_rerank_forward_latency_ms_bucket"):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
