"""cluster/Dockerfile, read with a small Dockerfile parser (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
DOCKERIGNORE = REPO / "cluster" / "Dockerfile.dockerignore"


# ---------------------------------------------------------------------------------------------- parser
@dataclass
class Instruction:
    cmd: str         # upper-case keyword: FROM, RUN, COPY, ...
    args: str        # the rest, continuation lines joined with a space
    line: int        # 1-based line where the instruction starts

    def exec_form(self) -> list[str] | None:
        """The JSON array of CMD/ENTRYPOINT/RUN in exec form, else None."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def words(self) -> list[str]:
        return shlex.split(self.args, posix=True)


_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: comments and blank lines dropped, `\\` (or the `# escape=`
    character) continues a line; comment lines inside a continued instruction are skipped, as Docker does.
    Heredocs are not supported (and not used here)."""
    lines = text.splitlines()
    escape = "\\"
    for raw in lines:  # parser directives: only at the very top, before any other line
        m = _DIRECTIVE.match(raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment line inside a continuation
        if not buf:
            start = n
        if stripped.endswith(escape):
            buf.append(stripped[: -len(escape)].strip())
            continue
        buf.append(stripped)
        joined = " ".join(p for p in buf if p)
        keyword, _, rest = joined.partition(" ")
        out.append(Instruction(keyword.upper(), rest.strip(), start))
        buf = []
    if buf:
        raise ValueError(f"line {start}: instruction continues past the end of the file")
    return out


def test_parser_handles_continuations_comments_and_forms():
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM   base:1 AS build\n"
        "\n"
        "RUN a \\\n"
        "    # inside a continuation\n"
        "    && b \\\n"
        "    && c\n"
        "cmd [\"serve\", \"run\", \"x.yaml\"]\n"
        "ENV A=1 \\\n"
        "    B=2\n"
    )
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["FROM", "RUN", "CMD", "ENV"]
    assert ins[0].args == "base:1 AS build" and ins[0].line == 2
    assert ins[1].args == "a && b && c" and ins[1].line == 4
    assert ins[2].exec_form() == ["serve", "run", "x.yaml"]
    assert ins[3].args == "A=1 B=2"
    assert parse_dockerfile("# escape=`\nRUN a `\n  b\n")[0].args == "a b"
    with pytest.raises(ValueError):
        parse_dockerfile("RUN a \\\n")


# ---------------------------------------------------------------------------------------------- checks
@pytest.fixture(scope="module")
def ins() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _of(ins, cmd: str) -> list[Instruction]:
    return [i for i in ins if i.cmd == cmd]


def test_from_official_ray_2_60_cuda_image(ins):
    froms = _of(ins, "FROM")
    assert len(froms) == 1 and ins[0].cmd in ("FROM", "ARG")
    image = froms[0].words()[0]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(cu\d{3,})", image)
    assert m, image
    assert m.group(1) == "2.60.0"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[serve]=={m.group(1)}"' in pyproject  # the image's Ray is the project's Ray


def test_runs_as_non_root_user_at_the_end(ins):
    users = _of(ins, "USER")
    assert users, "no USER instruction"
    final = users[-1]
    assert final.args.split(":")[0] not in ("root", "0")
    entry = [i for i in ins if i.cmd in ("CMD", "ENTRYPOINT")]
    assert entry and all(final.line < e.line for e in entry)
    # every switch to root is followed by a switch back before the image ends
    for i, u in enumerate(users):
        if u.args.split(":")[0] in ("root", "0"):
            assert any(v.args.split(":")[0] not in ("root", "0") for v in users[i + 1:]), u.line


def test_installs_the_project_from_pyproject_without_the_cpu_torch_constraint(ins):
    copies = " ".join(i.args for i in _of(ins, "COPY"))
    for needed in ("pyproject.toml", "rerank_core", "deployments", "serve_config.yaml", "README.md"):
        assert needed in copies, needed
    runs = [i.args for i in _of(ins, "RUN")]
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert any(re.search(r"pip install\b.*--no-cache-dir.*\s\.(\s|$)", r) for r in installs), installs
    text = DOCKERFILE.read_text()
    assert "constraints-cpu" not in text and "whl/cpu" not in text
    # the COPY of pyproject.toml comes before the install, the install before CMD
    pip_line = next(i.line for i in ins if i.cmd == "RUN" and "pip install" in i.args)
    assert next(i.line for i in _of(ins, "COPY") if "pyproject.toml" in i.args) < pip_line


def test_no_model_weights_baked_in(ins):
    text = DOCKERFILE.read_text()
    for pattern in (r"\.safetensors", r"\.bin\b", r"snapshot_download", r"hf_hub_download",
                    r"huggingface-cli\s+download", r"\bhf\s+download", r"from_pretrained", r"load_reranker"):
        assert not re.search(pattern, text), pattern
    for c in _of(ins, "COPY") + _of(ins, "ADD"):
        assert not re.search(r"checkpoint|weights|models?/|\.cache", c.args), c.args
    env = " ".join(i.args for i in _of(ins, "ENV"))
    hf_home = re.search(r"HF_HOME=(\S+)", env)
    assert hf_home and hf_home.group(1).startswith("/data/")  # a mount path, filled at run time


def test_serve_high_throughput_mode_is_on(ins):
    # the mode tests/cluster/test_high_throughput.py checks; an ENV reaches every `ray start` in the image
    env = " ".join(i.args for i in _of(ins, "ENV"))
    assert re.search(r"\bRAY_SERVE_ENABLE_HA_PROXY=1\b", env)
    assert re.search(r"\bRAY_SERVE_THROUGHPUT_OPTIMIZED=1\b", env)


def test_ports_and_command(ins):
    exposed = {p for i in _of(ins, "EXPOSE") for p in i.words()}
    assert {"8000", "8265", "8080"} <= exposed
    cmd = _of(ins, "CMD")[-1].exec_form()
    assert cmd and cmd[:2] == ["serve", "run"] and cmd[-1].endswith("serve_config.yaml")


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for these rules: last matching rule wins, `!` re-includes,
    a match on a parent directory covers everything below it."""
    ignored = False
    parts = path.split("/")
    for rule in rules:
        neg = rule.startswith("!")
        pat = rule[1:] if neg else rule
        pat = pat.rstrip("/")
        prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
        pat_re = fnmatch.translate(pat).replace(".*", "[^/]*")
        pat_re = pat_re.replace("[^/]*[^/]*/", "(?:.*/)?")  # `**/` matches any depth
        if any(re.match(pat_re, p) for p in prefixes):
            ignored = not neg
    return ignored


def test_build_context_filter_sends_only_what_the_image_needs():
    rules = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "serve_config.yaml", "rerank_core/__init__.py",
                   "deployments/app.py"):
        assert not _ignored(needed, rules), needed
    for dropped in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "cluster/.secrets/keys",
                    "rerank_core/__pycache__/x.pyc", "rerank_core/model.safetensors", "benchmarks/x.py"):
        assert _ignored(dropped, rules), dropped
