"""Print the configuration reference (Markdown) from the pydantic field descriptions.

    python -m deployments.docs > docs/configuration.md

A test checks that the committed file equals this output, so the reference never drifts from the code.
"""

from __future__ import annotations

import json
import sys
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import AppArgs


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is None:
        if isinstance(annotation, type):
            return annotation.__name__
        return str(annotation).replace("typing.", "")
    args = [a for a in get_args(annotation) if a is not type(None)]
    name = getattr(origin, "__name__", str(origin)).replace("typing.", "")
    if name in ("Union", "UnionType"):
        inner = " | ".join(_type_name(a) for a in args)
        return inner + (" | null" if len(args) < len(get_args(annotation)) else "")
    if name == "Literal":
        return " | ".join(json.dumps(a) for a in get_args(annotation))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]"


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
        return json.dumps(value)
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, BaseModel):
        return "see below"
    return json.dumps(field.default)


def _nested(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models inside an annotation (``X``, ``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for a in get_args(annotation):
        out.extend(_nested(a))
    return out


def render(model: type[BaseModel] = AppArgs) -> str:
    lines = [
        "# Configuration reference",
        "",
        "The `args` of the application in `serve_config.yaml` (`import_path: deployments.app:build_app`).",
        "Generated from the pydantic models in `deployments/config.py` by `python -m deployments.docs`;",
        "unknown keys are rejected when the app is deployed.",
        "",
    ]
    seen: set[type[BaseModel]] = set()
    queue: list[tuple[str, type[BaseModel]]] = [("args", model)]
    while queue:
        path, cls = queue.pop(0)
        if cls in seen:
            lines += [f"## `{path}`", "", f"Same fields as `{cls.__name__}` above.", ""]
            continue
        seen.add(cls)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines += [f"## `{path}` ({cls.__name__})", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            desc = (field.description or "").replace("|", "\\|")
            kind = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {desc} |")
            for sub in _nested(field.annotation):
                suffix = "[]" if get_origin(field.annotation) is list else ""
                queue.append((f"{path}.{name}{suffix}", sub))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
