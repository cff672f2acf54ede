"""Which heads and channels a LoRAPrune cut removes: the counts at a target fraction, and each layer's choice.

The same rules serve the progressive schedule (``callback.py``: every event, on the attached ``StructureMask``) and
the one-shot cut (``one_shot.py``: once, on masks that are never attached). A head unit is what
``Selector.head_unit`` says: whole KV groups (``kv_group``), the same number of query heads from every group
(``per_group``: ``gqa_balanced`` and ``structure=uniform``), or single query heads (``query_head``). Removed units
rank below every kept one, so a cut is cumulative and never undone (``select_pruned``).
"""

from __future__ import annotations

import torch

from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.uniform import UniformPlan, removed_count
from prunedlora.pruning.structure import StructureMask, select_pruned


def unit_keep(mask: StructureMask, policy: str) -> torch.Tensor:
    """Keep-mask over the scored units: query heads, or KV groups for ``kv_group``."""
    return mask.kv_mask() if policy == "kv_group" else mask.head_mask


class Selector:
    """Counts and choices of one run's cuts.

    Args:
        cfg: the method config (what is pruned, the GQA policy).
        plan: ``structure=uniform``'s final counts; None for ``per_layer``.
        final: ``sparsity.final``, what ``plan`` is sized for.
    """

    def __init__(self, cfg: LoraPruneConfig, plan: UniformPlan | None, final: float) -> None:
        self.cfg, self.plan, self.final = cfg, plan, final

    def head_unit(self) -> str:
        """kv_group: whole KV groups; per_group: the same number of query heads from every group; query_head."""
        if self.plan is not None:
            return self.plan.head_unit
        if self.cfg.gqa_policy == "kv_group":
            return "kv_group"
        return "per_group" if self.cfg.gqa_balanced else "query_head"

    def counts(self, target: float, mask: StructureMask) -> tuple[int, int]:
        """(head units, channels) every masked layer loses at ``target``.

        per_layer: the target fraction of each kind (of ``mask``'s shape: every prunable layer has the base's);
        uniform: the plan's final counts scaled by the progress ``target / final``.
        """
        if self.plan is not None:
            return self.plan.removed_at(target / self.final)
        shape = mask.shape
        units = {"kv_group": shape.num_kv_heads, "per_group": shape.group_size, "query_head": shape.num_heads}
        return removed_count(target, units[self.head_unit()]), removed_count(target, mask.channel_mask.numel())

    def removed(self, mask: StructureMask) -> tuple[int, int]:
        """(head units, channels) ``mask`` has already removed, counted as ``counts`` counts them."""
        unit = self.head_unit()
        if unit == "kv_group":
            heads = int((mask.kv_mask() <= 0).sum())
        elif unit == "per_group":
            shape = mask.shape
            heads = int((mask.head_mask.view(shape.num_kv_heads, shape.group_size) <= 0).sum(dim=1).min())
        else:
            heads = int((mask.head_mask <= 0).sum())
        return heads, int((mask.channel_mask <= 0).sum())

    def grows(self, mask: StructureMask, head_units: int, channels: int) -> bool:
        """Whether a cut to these counts removes anything more from ``mask``."""
        heads_now, channels_now = self.removed(mask)
        return bool((self.cfg.prune_heads and head_units > heads_now)
                    or (self.cfg.prune_channels and channels > channels_now))

    def select(self, mask: StructureMask, scores: dict[str, torch.Tensor | None], head_units: int,
               channels: int) -> tuple[bool, bool]:
        """Cut ``mask`` in place to the counts by ``scores`` (``heads``: per unit, ``channels``); a kind whose vector
        is None keeps its mask. Returns whether the heads and the channels changed."""
        changed = [False, False]
        if self.cfg.prune_heads and scores.get("heads") is not None:
            new = self._select_heads(mask, scores["heads"], head_units)
            changed[0] = not torch.equal(new, mask.head_mask)
            mask.head_mask.copy_(new)
        if self.cfg.prune_channels and scores.get("channels") is not None:
            new = select_pruned(scores["channels"], mask.channel_mask, channels)
            changed[1] = not torch.equal(new, mask.channel_mask)
            mask.channel_mask.copy_(new)
        return changed[0], changed[1]

    def _select_heads(self, mask: StructureMask, scores: torch.Tensor, units: int) -> torch.Tensor:
        """New per-query-head keep-mask of one layer with ``units`` head units removed in total."""
        shape = mask.shape
        unit = self.head_unit()
        if unit == "kv_group":
            return select_pruned(scores, mask.kv_mask(), units).repeat_interleave(shape.group_size)
        if unit == "per_group":  # the same number from every group: standard GQA survives compaction
            keep = mask.head_mask.view(shape.num_kv_heads, shape.group_size)
            per_group = scores.view(shape.num_kv_heads, shape.group_size)
            return torch.cat([select_pruned(per_group[g], keep[g], units) for g in range(shape.num_kv_heads)])
        return select_pruned(scores, mask.head_mask, units)
