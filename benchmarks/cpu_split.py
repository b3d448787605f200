"""Where a machine's CPU went during a run, by process kind (Linux /proc; every process the user can read).

``snapshot()`` reads each process's CPU seconds so far (user + system, all its threads); ``split(a, b)`` turns two
snapshots into cores used per label between them. Labels name what a process is, not its pid: Ray workers by
their title (``ServeReplica:rerank:Scorer-text``, ``DashboardAgent``, ...), vLLM's processes by theirs
(``VLLM::Worker``, ``VLLM::EngineCore``), Python scripts by script or module, anything else by executable.
loadgen.py takes the snapshots at the edges of its steady window (the last three quarters of the run), so the
split shows, for either server, how much of the machine its model got and what the rest went to.
"""

from __future__ import annotations

import os

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def label(cmdline: list[str]) -> str:
    """A short, pid-free name for a process from its argv."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    if first.startswith("ray::"):  # an actor's title may end in the method it runs: ServeController.listen...
        return first.split()[0].removeprefix("ray::").split(".")[0]
    if first.startswith("VLLM::"):
        return first.split()[0]
    exe = os.path.basename(first.split()[0])
    if exe.startswith("python"):
        rest = cmdline[1:]
        if len(rest) >= 2 and rest[0] == "-m":
            return rest[1]
        scripts = [a for a in rest if a.endswith(".py")]
        if scripts:
            return os.path.basename(scripts[0])
    return exe


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (label, CPU seconds so far)} for every readable process; empty where there is no /proc (macOS), so
    a run there reports no split instead of failing."""
    out: dict[int, tuple[str, float]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:  # gone, or not ours to read
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry)] = (label(argv), (int(fields[11]) + int(fields[12])) / HZ)
    return out


def split(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]], seconds: float,
          floor: float = 0.01) -> dict[str, float]:
    """Cores used per label between snapshots ``a`` and ``b`` taken ``seconds`` apart, largest first; labels
    under ``floor`` cores are summed as "other". A process that started in between counts from zero."""
    cores: dict[str, float] = {}
    for pid, (name, cpu) in b.items():
        used = cpu - a.get(pid, (name, 0.0))[1]
        if used > 0:
            cores[name] = cores.get(name, 0.0) + used / seconds
    out: dict[str, float] = {}
    other = 0.0
    for name, c in sorted(cores.items(), key=lambda kv: -kv[1]):
        if c >= floor:
            out[name] = round(c, 3)
        else:
            other += c
    if other:
        out["other"] = round(other, 3)
    return out
