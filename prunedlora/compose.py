"""Hydra's side of the config: the schemas in Hydra's ConfigStore, and a config composed from overrides.

The root schema comes from ``prunedlora.config``, each method's from the method registry
(``prunedlora.methods.registry``), so a method registered anywhere is composable as ``method=<name>`` once its YAML
option (or a ConfigStore node in group ``method``) exists.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from prunedlora.config import RootConfig
from prunedlora.methods.registry import method_specs


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent).

    Schemas live under ``schema/<group>`` so they do not show up as selectable options of the group
    itself; each YAML option pulls its schema in with ``- /schema/<group>/<name>@_here_``.
    """
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for name, spec in method_specs().items():
        cs.store(group="schema/method", name=name, node=spec.schema)


def compose_config(overrides: list[str]) -> RootConfig:
    """The typed config that ``prunedlora-train <overrides>`` runs with (Hydra's compose API: scripts, tests)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        return OmegaConf.to_object(compose("config", overrides=overrides))
