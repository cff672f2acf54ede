"""SALR's base criteria: prune every target linear's weight once, before training.

docs/methods.md §6, Decisions item 0.

Each function is the record of ``prunedlora.pruning.criteria.BASE_CRITERIA`` with its name and yields
``(name, W_s)`` for every target, one matrix at a time: the float32 pruned weight (zeros in place). ``stats``
(``calibration.collect_input_stats``) holds what the record ``needs``: input norms (wanda) or Gram matrices
(sparsegpt); magnitude reads the weights alone and is the one that supports ``scope=global``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from prunedlora.pruning.activation_aware import sparsegpt_factor, sparsegpt_prune, wanda_mask
from prunedlora.pruning.calibration import InputStats
from prunedlora.pruning.criteria import BASE_CRITERIA, CALIBRATION_NEEDS
from prunedlora.pruning.magnitude import mask_function

PrunedWeights = Iterator[tuple[str, torch.Tensor]]


def magnitude_weights(targets: dict[str, nn.Linear], sparsity: float, scope: str, pattern: str,
                      stats: dict[str, InputStats] | None = None) -> PrunedWeights:
    """The largest ``|W_ij|`` kept, per matrix or under one threshold over all of them (``scope=global``)."""
    mask_of = mask_function((m.weight for m in targets.values()), sparsity, scope, pattern)
    for name, linear in targets.items():
        yield name, linear.weight.detach().float().masked_fill(~mask_of(linear.weight), 0.0)


def wanda_weights(targets: dict[str, nn.Linear], sparsity: float, scope: str, pattern: str,
                  stats: dict[str, InputStats] | None = None) -> PrunedWeights:
    """The largest ``|W_ij| ‖X_j‖`` kept within each output row (``activation_aware.wanda_mask``)."""
    for name, linear in targets.items():
        mask = wanda_mask(linear.weight, stats[name].sq_norm, sparsity, pattern)
        yield name, linear.weight.detach().float().masked_fill(~mask, 0.0)


def sparsegpt_weights(targets: dict[str, nn.Linear], sparsity: float, scope: str, pattern: str,
                      stats: dict[str, InputStats] | None = None) -> PrunedWeights:
    """SparseGPT's OBS pruning with weight updates; q/k/v (one input) share one factorisation of the Gram."""
    shared: tuple[InputStats, tuple[torch.Tensor, torch.Tensor]] | None = None
    for name, linear in targets.items():
        if shared is None or shared[0] is not stats[name]:
            shared = stats[name], sparsegpt_factor(stats[name].gram)
        yield name, sparsegpt_prune(linear.weight, None, sparsity, pattern, factor=shared[1])


def pruned_weights(targets: dict[str, nn.Linear], criterion: str, sparsity: float, scope: str, pattern: str,
                   stats: dict[str, InputStats] | None = None) -> PrunedWeights:
    """``(name, W_s)`` for every target by base criterion ``criterion`` (its record's function).

    Raises:
        ValueError: the criterion needs calibration statistics and ``stats`` is None.
    """
    if BASE_CRITERIA[criterion].needs & CALIBRATION_NEEDS and stats is None:
        raise ValueError(f"base_criterion={criterion} needs calibration statistics")
    return BASE_CRITERIA.function(criterion)(targets, sparsity, scope, pattern, stats)
