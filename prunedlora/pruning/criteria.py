"""Every pruning criterion, one record each, in one registry per family.

- ``RANK_CRITERIA`` (PrunedLoRA, ``method.criterion``): score the rank components of one adapter; functions in
  ``rank_criteria.py``.
- ``STRUCTURED_CRITERIA`` (LoRAPrune, ``method.criterion``): score the attention heads and MLP channels of the base;
  functions in ``structured_criteria.py``.
- ``BASE_CRITERIA`` (SALR, ``method.base_criterion``): prune the base's weights once, before training; functions in
  ``base_criteria.py``.

A record says what its criterion needs from the run (``NEEDS``) and names its function in the family's module. The
methods read the record (``RANK_CRITERIA[name].needs``, ``RANK_CRITERIA.function(name)``), never the name itself,
and the config's allowed values are ``<REGISTRY>.names()``. This module imports no torch: a function is imported
on its first use, so validating a config stays fast. Adding a criterion is its function and one record here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

NEEDS = {
    "gradients": "the step's gradients of the LoRA factors (complete, unclipped)",
    "bottleneck_gram": "E[z zᵀ] of the adapter's bottleneck z = m ⊙ A x over the tokens since the last event "
                       "(forward hooks, collected for these criteria only)",
    "lora_gradients": "the LoRA gradients of every projection of a group (LoRA on all seven projections)",
    "base_gradients": "the frozen base weights' own gradients dL/dW0: one more copy of every scored projection",
    "output_gradients": "Σ_t g ⊙ h at the inputs of o_proj and down_proj, captured during backward",
    "input_norms": "‖X_j‖² of every input feature of the pruned linears, from a calibration pass",
    "input_gram": "XᵀX of the inputs of the pruned linears, from a calibration pass",
    "base_rewrite": "frozen base weights rewritten while training (LoRAPrune's re-fit at each event): a float base "
                    "held whole by one process",
}
"""What a criterion may need, and what each need means for a run."""
CALIBRATION_NEEDS = frozenset({"input_norms", "input_gram"})
"""Needs met by a calibration pass over rows of the training data before pruning."""
RECOVERY_FACTORS = ("b", "a", "both")
"""``method.recovery_factor``: which factor the obs_grad recovery moves."""


@dataclass(frozen=True)
class Criterion:
    """One criterion of a family."""

    name: str
    """The config value that selects it."""
    function: str
    """Its function (or class) in the family's module, imported on first use."""
    needs: frozenset[str] = frozenset()
    """What it reads beyond the weights (keys of ``NEEDS``)."""
    summary: str = ""


@dataclass(frozen=True)
class RankCriterion(Criterion):
    """A rank-component saliency: ``f(B, A, G_B, G_A, **stats) -> (r',)``, lowest pruned first."""

    absolute: bool = False
    """Its saliencies share one scale across modules (output errors): ``allocation=global`` compares them raw."""
    recovery: str | None = None
    """Its closed-form update of the surviving components (``method.recovery=true``), in the family's module:
    ``f(B, A, G_B, G_A, order, **options) -> (B' or None, A' or None)`` over the active slices."""
    options: tuple[str, ...] = ()
    """The ``method.*`` keys it reads (damping, recovery knobs)."""


@dataclass(frozen=True)
class StructuredCriterion(Criterion):
    """A head/channel score: a weight-level score ``f(module) -> (d_out, d_in)`` summed over each group; with
    ``scores_groups``, a capture object scoring whole groups (``TaylorCapture``); with a calibration need, a
    function of one layer's calibration statistics (``activation_layer_scores``), scored at the pruning events; or,
    with ``combines``, a combination of other criteria's vectors."""

    scores_groups: bool = False
    combines: tuple[str, ...] = ()
    """The criteria whose L2-normalised group vectors this one averages (its function does the averaging)."""

    @property
    def calibrated(self) -> bool:
        """Scored from a calibration pass over training rows (at each event, or once before a one-shot cut)."""
        return bool(self.needs & CALIBRATION_NEEDS)

    @property
    def parts(self) -> tuple[str, ...]:
        """The criteria that produce vectors: ``combines``, or this one alone."""
        return self.combines or (self.name,)


@dataclass(frozen=True)
class BaseCriterion(Criterion):
    """A one-shot pruning of the base: ``f(targets, sparsity, scope, pattern, stats) -> ((name, W_s), ...)``."""

    scopes: tuple[str, ...] = ("per_matrix",)
    """The ``method.scope`` values it supports (global: one threshold over every matrix)."""


C = TypeVar("C", bound=Criterion)


class CriterionRegistry(Generic[C]):
    """One family's criteria by name.

    Args:
        family: what its criteria prune, for messages.
        module: where their functions live.
        records: the criteria, in the order the docs list them.
    """

    def __init__(self, family: str, module: str, records: Iterable[C]) -> None:
        self.family, self.module = family, module
        self._records: dict[str, C] = {}
        self._resolved: dict[str, Callable[..., Any]] = {}
        for record in records:
            self.add(record)

    def add(self, record: C) -> C:
        """Register one more criterion (a plug-in, a test).

        Raises:
            ValueError: the name is taken, or it needs something ``NEEDS`` does not describe.
        """
        if record.name in self._records:
            raise ValueError(f"{self.family} criterion {record.name!r} is registered twice")
        if unknown := record.needs - NEEDS.keys():
            raise ValueError(f"{self.family} criterion {record.name!r} needs {sorted(unknown)}, not one of "
                             f"{', '.join(NEEDS)}; describe a new need in NEEDS")
        self._records[record.name] = record
        return record

    def remove(self, name: str) -> None:
        """Unregister ``name`` (the reverse of ``add``)."""
        self._records.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The allowed config values."""
        return tuple(self._records)

    def __getitem__(self, name: str) -> C:
        try:
            return self._records[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a {self.family} criterion; one of {', '.join(self._records)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __iter__(self) -> Iterator[C]:
        return iter(self._records.values())

    def resolve(self, function: str) -> Callable[..., Any]:
        """A function of the family's module, by name, or of another module as ``package.module:function`` (the
        module is imported on the first call)."""
        if function not in self._resolved:
            module, _, name = function.rpartition(":")
            self._resolved[function] = getattr(importlib.import_module(module or self.module), name)
        return self._resolved[function]

    def function(self, name: str) -> Callable[..., Any]:
        """The function of criterion ``name``."""
        return self.resolve(self[name].function)


RANK_CRITERIA: CriterionRegistry[RankCriterion] = CriterionRegistry("rank", "prunedlora.pruning.rank_criteria", [
    RankCriterion("obs", "output_obs_saliency", frozenset({"bottleneck_gram"}), absolute=True,
                  recovery="output_obs_recovery", options=("rel_damping",),
                  summary="OBS on the adapter's output: ‖b_j‖² / [H⁻¹]_jj, B re-fit on the output"),
    RankCriterion("obs_grad", "obs_saliency", frozenset({"gradients"}), recovery="obs_grad_recovery",
                  options=("damping", "newton_scale", "recovery_factor"),
                  summary="the paper's OBS with gradient-Gram Hessians, recovery on one factor"),
    RankCriterion("magnitude", "magnitude_saliency", summary="‖b_j‖·‖a_j‖"),
    RankCriterion("taylor", "taylor_saliency", frozenset({"gradients"}), summary="Σ |w ⊙ g| over b_j and a_j"),
    RankCriterion("activation", "activation_saliency", frozenset({"bottleneck_gram"}),
                  summary="Wanda-style: RMS of (A x)_j times ‖b_j‖"),
])

STRUCTURED_CRITERIA: CriterionRegistry[StructuredCriterion] = CriterionRegistry(
    "structured", "prunedlora.pruning.structured_criteria", [
        StructuredCriterion("lora_guided", "lora_guided_score", frozenset({"lora_gradients"}),
                            summary="the paper's |(G_B A + B G_A - G_B G_A) ⊙ (W0 + s BA)|"),
        StructuredCriterion("magnitude", "magnitude_score", summary="|W0 + s BA|"),
        StructuredCriterion("true_gradient", "true_gradient_score", frozenset({"base_gradients"}),
                            summary="LLM-Pruner's |dL/dW0 ⊙ (W0 + s BA)|"),
        StructuredCriterion("channel_taylor", "TaylorCapture", frozenset({"output_gradients"}), scores_groups=True,
                            summary="|Σ_t g ⊙ h| of a group's output (Molchanov et al. 2019)"),
        StructuredCriterion("activation", "prunedlora.pruning.activation_scores:activation_layer_scores",
                            frozenset({"input_norms"}),
                            summary="‖X_j‖·‖W̃[:, j]‖ over a group's o_proj / down_proj input columns, calibrated"),
        StructuredCriterion("activation_taylor", "combine_scores", frozenset({"input_norms", "output_gradients"}),
                            combines=("activation", "channel_taylor"),
                            summary="the mean of activation's and channel_taylor's L2-normalised vectors"),
    ])

BASE_CRITERIA: CriterionRegistry[BaseCriterion] = CriterionRegistry("base", "prunedlora.pruning.base_criteria", [
    BaseCriterion("sparsegpt", "sparsegpt_weights", frozenset({"input_gram"}),
                  summary="OBS with weight updates, column by column (SparseGPT)"),
    BaseCriterion("wanda", "wanda_weights", frozenset({"input_norms"}), summary="|W_ij| ‖X_j‖ within each output row"),
    BaseCriterion("magnitude", "magnitude_weights", scopes=("per_matrix", "global"),
                  summary="|W_ij| (the SALR paper's)"),
])
