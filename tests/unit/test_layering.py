"""rerank_core must stay free of serving frameworks (one-way imports)."""

from __future__ import annotations

import subprocess
import sys


def test_rerank_core_imports_no_ray_starlette_fastapi():
    code = (
        "import sys, pkgutil, importlib, rerank_core\n"
        "import rerank_core.models\n"
        "for m in pkgutil.walk_packages(rerank_core.__path__, 'rerank_core.'):\n"
        "    if m.name != 'rerank_core.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('ray', 'starlette', 'fastapi'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
