"""Runs a scenario script (a Ray cluster of its own) in a subprocess and returns its ``SCENARIO_RESULT``.

Other test directories start their own Ray in the pytest process, and one process cannot hold two Ray
clusters. The child gets a private RAY_TMPDIR, so no other process on the machine can join its cluster
through Ray's "current cluster" address file, and a session of its own, so on timeout the whole process
group (the scenario and the Ray processes it started) can be killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from deployments.haproxy import haproxy_pids, stop_new_haproxy

REPO = Path(__file__).resolve().parents[2]


def run_scenario(script: Path, timeout_s: int) -> dict:
    ray_tmp = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: Unix socket paths are limited
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    haproxy_before = haproxy_pids()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script.name} did not finish in {timeout_s} s; stderr tail:\n{stderr[-3000:]}")
    finally:
        strays = stop_new_haproxy(haproxy_before)  # Serve's HAProxy reloads can outlive the cluster
        if strays:
            print(f"{script.name}: stopped HAProxy processes left behind: {strays}")
        if os.environ.get("RERANK_KEEP_SCENARIO_LOGS"):  # debugging: keep the cluster's logs
            print(f"{script.name}: Ray logs kept in {ray_tmp}")
        else:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("SCENARIO_RESULT ")]
    assert lines, f"no result (exit {proc.returncode}); stderr tail:\n{stderr[-4000:]}"
    result = json.loads(lines[-1][len("SCENARIO_RESULT "):])
    assert result["error"] is None, result["error"] + "\n--- stderr tail ---\n" + stderr[-3000:]
    print(f"{script.stem} timings (s):", result["timings_s"])
    return result
