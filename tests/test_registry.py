"""The registries: methods (``prunedlora.methods.registry``) and criteria (``prunedlora.pruning.criteria``).

Everything that lists methods or criteria reads them (``--help``, Hydra's schemas, the config's allowed values, the
contract tests), composing and validating a config imports no torch, and every record names a function that exists.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from prunedlora.cli_help import help_text
from prunedlora.compose import compose_config
from prunedlora.config import ConfigError, MethodConfig, SparsityConfig
from prunedlora.methods import METHODS, build_method, method_specs, register, unregister
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.prunedlora.config import PrunedLoraConfig
from prunedlora.methods.salr.config import SalrConfig
from prunedlora.pruning.criteria import (
    BASE_CRITERIA,
    NEEDS,
    RANK_CRITERIA,
    STRUCTURED_CRITERIA,
    RankCriterion,
)
from prunedlora.validation import validate

FAMILIES = {"rank": RANK_CRITERIA, "structured": STRUCTURED_CRITERIA, "base": BASE_CRITERIA}


# ------------------------------------------------------------------------------------------- methods
def test_methods_come_from_their_folders_and_feed_help() -> None:
    assert list(METHODS) == ["adalora", "droplora", "lora", "loraprune", "prunedlora", "salr"]
    about = help_text("prunedlora-train").split("\n")[0]
    assert "(adalora, droplora, lora, loraprune, prunedlora, salr)" in about
    for name, spec in method_specs().items():
        assert spec.schema.__module__ == f"prunedlora.methods.{name}.config"


def test_register_refuses_a_taken_name_and_a_schema_named_otherwise() -> None:
    @dataclass
    class Other(MethodConfig):
        name: str = "other"

    with pytest.raises(ValueError, match="registered twice"):
        register("lora", schema=Other, factory="x:y")
    with pytest.raises(ValueError, match="must agree"):
        register("renamed", schema=Other, factory="x:y")
    register("other", schema=Other, factory=lambda cfg, sparsity: ("built", cfg.name))
    try:
        assert build_method(Other(), SparsityConfig()) == ("built", "other")
    finally:
        unregister("other")
    with pytest.raises(ConfigError, match="method=other is not implemented; available methods: adalora"):
        build_method(Other(), SparsityConfig())


def test_composing_and_validating_every_method_imports_no_torch() -> None:
    code = ("import sys\n"
            "from prunedlora.compose import compose_config\n"
            "from prunedlora.validation import validate\n"
            "for m in ('lora', 'droplora', 'adalora', 'prunedlora', 'loraprune', 'salr'):\n"
            "    validate(compose_config(['model=tiny', f'method={m}']))\n"
            "print(sorted(k for k in ('torch', 'transformers', 'peft') if k in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ criteria
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_criterion_names_a_function_that_exists_and_needs_what_is_described(family: str) -> None:
    registry = FAMILIES[family]
    for record in registry:
        assert callable(registry.function(record.name)), record
        assert record.needs <= NEEDS.keys() and record.summary, record
        recovery = getattr(record, "recovery", None)
        assert recovery is None or callable(registry.resolve(recovery)), record


def test_the_config_allows_exactly_the_registered_criteria() -> None:
    # LoRAPrune's progressive schedule: its default one-shot cut refuses the criteria that need training gradients
    for schema, key, registry, sparsity in ((PrunedLoraConfig, "criterion", RANK_CRITERIA, SparsityConfig()),
                                            (LoraPruneConfig, "criterion", STRUCTURED_CRITERIA,
                                             SparsityConfig(schedule="cubic")),
                                            (SalrConfig, "base_criterion", BASE_CRITERIA, SparsityConfig())):
        for name in registry.names():
            problems = schema(**{key: name}).validate(sparsity)
            assert not any(f"method.{key}=" in p for p in problems), (name, problems)
        (problem,) = [p for p in schema(**{key: "nope"}).validate(sparsity) if f"method.{key}=nope" in p]
        assert problem.endswith(", ".join(registry.names()))


def test_a_criterion_added_to_a_registry_is_allowed_and_its_needs_are_checked() -> None:
    with pytest.raises(ValueError, match="needs \\['telepathy'\\]"):
        RANK_CRITERIA.add(RankCriterion("psychic", "magnitude_saliency", frozenset({"telepathy"})))
    with pytest.raises(ValueError, match="registered twice"):
        RANK_CRITERIA.add(RankCriterion("obs", "magnitude_saliency"))
    RANK_CRITERIA.add(RankCriterion("norm_b", "magnitude_saliency", summary="a test's criterion"))
    try:
        assert PrunedLoraConfig(criterion="norm_b").validate(SparsityConfig()) == []
        cfg = compose_config(["model=tiny", "method=prunedlora", "method.criterion=norm_b"])
        validate(cfg)
    finally:
        RANK_CRITERIA.remove("norm_b")
    with pytest.raises(ConfigError, match="method.criterion=norm_b is not one of obs"):
        validate(cfg)


def test_needs_reach_the_generic_validation() -> None:
    """A criterion needing the base weights' gradients is refused under ZeRO-3, whichever method asks."""
    cfg = compose_config(["model=tiny", "method=loraprune", "method.criterion=true_gradient", "method.refit=false",
                          "sparsity=cubic", "distributed=deepspeed_zero3"])
    assert LoraPruneConfig(criterion="true_gradient", refit=False).needs() == {
        "base_gradients": "method.criterion=true_gradient"}
    with pytest.raises(ConfigError, match="method.criterion=true_gradient with distributed=deepspeed_zero3"):
        validate(cfg)
