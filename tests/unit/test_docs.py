"""The committed configuration reference is generated from the pydantic descriptions and up to date."""

from __future__ import annotations

from pathlib import Path

from deployments.config import AppArgs
from deployments.docs import render

REPO = Path(__file__).resolve().parents[2]


def _all_models(cls, seen=None):
    from deployments.docs import _nested

    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for f in cls.model_fields.values():
        for sub in _nested(f.annotation):
            _all_models(sub, seen)
    return seen


def test_every_config_field_has_a_description():
    for cls in _all_models(AppArgs):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"


def test_every_config_model_forbids_unknown_keys():
    for cls in _all_models(AppArgs):
        assert cls.model_config.get("extra") == "forbid", cls.__name__


def test_committed_reference_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), "run: python -m deployments.docs > docs/configuration.md"
