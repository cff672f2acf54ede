"""Calibrated structured scores (LoRAPrune's ``activation`` criterion): a unit's output energy, from one pass.

An input column ``j`` of ``down_proj`` (an MLP channel) or of ``o_proj`` (one of a query head's ``head_dim``
features) feeds the layer's output through ``W[:, j]``, with calibration inputs ``X_j``. Its score is the
structured form of Wanda's ``|W_ij| ‖X_j‖₂``, taken over the whole column:

    s_j = ‖X_j‖₂ · ‖W[:, j]‖₂

(``‖X_j‖₂²`` is ``InputStats.sq_norm``, ``calibration.py``). A channel scores ``s_j^power``; a query head the sum
of ``s_j^power`` over its columns; a KV group (``gqa_policy=kv_group``) the sum over its query heads (its k/v
rows go with them and have no column of their own). ``power`` 2 squares each column's score first, like the
weight-level criteria's ``score_power``. Each vector is then L2-normalised, as every LoRAPrune criterion's is,
so it can replace them (one registry entry next to ``channel_taylor``'s ``layer_scores``) or be added to them.

``W`` is the effective weight ``W0 + s B A`` (``structured_criteria.effective_weight``): at a later pruning event
the adapter is part of what the column computes. Columns a structure mask already removed see zero inputs (the
mask's pre-hook runs before the calibration hook), so they score 0 and stay removed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from prunedlora.distributed import gathered
from prunedlora.models.surgery import projection
from prunedlora.pruning.calibration import InputStats
from prunedlora.pruning.structure import AttentionShape
from prunedlora.pruning.structured_criteria import effective_weight, group_sum, l2_normalise

ACTIVATION_INPUTS = ("o_proj", "down_proj")
"""The projections whose input statistics (norms only, no Gram) the ``activation`` criterion reads."""


def column_scores(weight: torch.Tensor, sq_norm: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``(‖X_j‖₂ · ‖W[:, j]‖₂)^power`` per input column, float32 ``(d_in,)``.

    Args:
        weight: ``(d_out, d_in)``.
        sq_norm: ``‖X_j‖₂²`` per input column, ``(d_in,)``.
        power: 1 or 2.
    """
    if sq_norm.shape != weight.shape[1:]:
        raise ValueError(f"activation scores: {sq_norm.numel()} input norms for a weight with {weight.shape[1]} "
                         "input columns; pass the statistics of this projection's own input")
    scores = weight.detach().float().norm(dim=0) * sq_norm.float().clamp_min(0).sqrt()
    return scores if power == 1 else scores.pow(power)


def activation_channel_scores(down_weight: torch.Tensor, down_sq_norm: torch.Tensor, power: int = 1
                              ) -> torch.Tensor:
    """Normalised score per MLP channel ``(m,)`` from ``down_proj``'s weight and input norms."""
    return l2_normalise(column_scores(down_weight, down_sq_norm, power))


def activation_head_scores(o_weight: torch.Tensor, o_sq_norm: torch.Tensor, shape: AttentionShape, power: int = 1,
                           policy: str = "query_head") -> torch.Tensor:
    """Normalised score per query head ``(n_q,)``, or per KV group ``(n_kv,)`` for ``kv_group``, from ``o_proj``."""
    per_head = group_sum(column_scores(o_weight, o_sq_norm, power), shape.head_dim)  # (n_q,)
    if policy == "kv_group":
        per_head = per_head.view(shape.num_kv_heads, shape.group_size).sum(dim=1)
    return l2_normalise(per_head)


def activation_layer_scores(layer: nn.Module, stats: Mapping[str, InputStats], *, heads: bool, channels: bool,
                            power: int = 1, policy: str = "query_head") -> dict[str, torch.Tensor | None]:
    """One decoder layer's normalised ``heads`` / ``channels`` vectors (the keys ``TaylorCapture.layer_scores``
    returns), from that layer's ``o_proj`` / ``down_proj`` input statistics keyed by projection name.

    A vector is None when its statistics are missing (as a criterion without a gradient yet).
    """
    scores: dict[str, torch.Tensor | None] = {}
    for key, wanted, name in (("heads", heads, "o_proj"), ("channels", channels, "down_proj")):
        if not wanted:
            continue
        stat = stats.get(name)
        if stat is None or stat.tokens == 0:
            scores[key] = None
            continue
        module = projection(layer, name)
        with gathered(module.parameters()):  # ZeRO-3: the whole weight for the duration of the score
            weight = effective_weight(module)
        if key == "heads":
            scores[key] = activation_head_scores(weight, stat.sq_norm, AttentionShape.of(layer.self_attn), power,
                                                 policy)
        else:
            scores[key] = activation_channel_scores(weight, stat.sq_norm, power)
    return scores
