"""benchmarks/gpu.py runs end to end on a CPU (``--device cpu --small``), so the GPU run does not rot between
the rare sessions that have a GPU: its parity part builds tiny checkpoints and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import LLAMA3_TOKENIZER, LLAMA3_VL_TOKENIZER

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_parity_part_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tokenizer", str(LLAMA3_TOKENIZER),
         "--vl-tokenizer", str(LLAMA3_VL_TOKENIZER), "--out", str(out), "--device", "cpu", "--small",
         "--parts", "check"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "check.json").read_text())
    assert "error" not in res, res
    for kind in ("text", "vl"):
        fp32, bf16 = res[kind]["float32"], res[kind]["bfloat16"]
        assert fp32["max_abs_err_vs_cpu_fp32"] == 0.0  # the same device and dtype as the reference
        assert fp32["batched_vs_alone_max_abs"] < 1e-5 and fp32["rank_order_equal"]
        assert 0 < bf16["max_abs_err_vs_cpu_fp32"] < 0.1
    assert res["text"]["float32"]["packed_vs_padded_max_abs"] < 1e-5
