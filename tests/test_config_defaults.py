"""Every default has one owner: the dataclasses of ``prunedlora/config.py`` and the methods' ``config.py``.

A YAML option of ``configs/`` holds its defaults list, comments, and only the values that make it a preset (a
model's hub id, a sparsity preset's schedule); it never restates a schema default, so the two cannot drift. A method
option and every ``default`` option compose to exactly their dataclass's defaults, so a test that builds
``LoraPruneConfig()`` exercises what ``method=loraprune`` runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from prunedlora.compose import compose_config
from prunedlora.config import RootConfig
from prunedlora.methods.registry import method_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("method", "train", "eval", "export", "data", "logging", "sparsity", "model", "task", "distributed")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONFIGS / group).glob("*.yaml"))]
EXTRA = {("model", "hf"): ["model.name_or_path=/models/x"]}


def _schema_default(group: str, option: str) -> Any:
    if group == "method":
        return method_spec(option).schema()
    field = {f.name: f for f in dataclasses.fields(RootConfig)}[group]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _restated(values: dict[str, Any], default: Any, prefix: str) -> list[str]:
    """Keys of ``values`` equal to the schema default (interpolations such as ``${oc.env:...}`` and the mandatory
    marker ``???``, which a preset uses to say "you must set this", excepted)."""
    found = []
    for key, value in values.items():
        if key == "defaults" or (isinstance(value, str) and (value.startswith("${") or value == "???")):
            continue
        current = getattr(default, key)
        if dataclasses.is_dataclass(current):
            found += _restated(value, current, f"{prefix}{key}.")
        elif value == current:
            found.append(f"{prefix}{key}={value}")
    return found


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_no_option_restates_a_schema_default(group: str, option: str) -> None:
    path = CONFIGS / group / f"{option}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    sections = raw if "@package _global_" in path.read_text() else {group: raw}
    for section, values in sections.items():
        default = _schema_default(section, option if section == group else "")
        assert not _restated(values, default, f"{section}."), f"{path.name} restates the dataclass defaults"


@pytest.mark.parametrize("group, option", [(g, o) for g, o in OPTIONS if g == "method" or o == "default"])
def test_a_method_or_default_option_composes_to_its_dataclass_defaults(group: str, option: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNEDLORA_DATA_ROOT", raising=False)
    composed = getattr(compose_config([f"{group}={option}", *EXTRA.get((group, option), [])]), group)
    assert composed == _schema_default(group, option)
