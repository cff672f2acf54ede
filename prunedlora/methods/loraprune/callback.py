"""LoRAPrune's callback (docs/methods.md §5.2-5.3): group scores, their moving average, and cumulative masking.

Every optimizer step (``on_before_optimizer_step``, complete unscaled gradients), per prunable layer: head and
channel importance by ``method.criterion`` (its ``STRUCTURED_CRITERIA`` record: a weight-level score summed over each
group, or, for ``channel_taylor``, a capture object scoring groups from the inputs of o_proj/down_proj during the
step's backward passes) is averaged into an EMA. At pruning events (every ``sparsity.every`` steps) each layer masks
its lowest-EMA heads and channels, as many as the schedule's target fraction says (``structure=uniform``: the plan's
counts scaled by its progress). Masks are cumulative: masked units rank lowest and are never restored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunedlora.config import SparsityConfig
from prunedlora.methods.base import Callback
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.uniform import UniformPlan, removed_count
from prunedlora.models.surgery import projection
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.schedules import is_event, target_fraction
from prunedlora.pruning.structure import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    StructureMask,
    decoder_layers,
    select_pruned,
)
from prunedlora.pruning.structured_criteria import GroupEma, base_linear, channel_scores, head_scores

DEFAULT_SCHEDULE = "cubic"
"""What ``sparsity.schedule=auto`` means for LoRAPrune (the paper's)."""


class LoraPruneCallback(Callback):
    """Scores, EMA and cumulative masking of one model's prunable layers.

    Args:
        model: the model the masks were attached to (read for scores; base grads for ``true_gradient``).
        masks: ``StructureMask`` by decoder-layer index (only prunable layers).
        cfg: the method config; ``sparsity``: the schedule (target fraction, cadence).
        plan: ``structure=uniform``'s final counts (every layer masked); None for ``per_layer``.
    """

    def __init__(self, model: nn.Module, masks: dict[int, StructureMask], cfg: LoraPruneConfig,
                 sparsity: SparsityConfig, plan: UniformPlan | None = None) -> None:
        self.layers = decoder_layers(model)
        self.masks = masks
        self.cfg = cfg
        self.sparsity = sparsity
        self.ema = GroupEma(cfg.ema)
        self.plan = plan
        self.max_steps = 0
        self.skipped = 0
        self.criterion = STRUCTURED_CRITERIA[cfg.criterion]
        self.capture = None  # a criterion that scores whole groups captures them (channel_taylor: TaylorCapture)
        if self.criterion.scores_groups:
            self.capture = STRUCTURED_CRITERIA.function(cfg.criterion)({i: self.layers[i] for i in masks})

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.max_steps = max_steps
        if "base_gradients" in self.criterion.needs:
            self._enable_base_grads(optimizer)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        skipped = self._update_scores()
        self.skipped += skipped
        target = target_fraction(self.sparsity, step, self.max_steps, default=DEFAULT_SCHEDULE)
        if is_event(self.sparsity, step) and target > 0:
            self._prune(target)
        if "base_gradients" in self.criterion.needs:
            self._clear_base_grads()  # not in the optimizer, so zero_grad() would never clear them
        return {"prune_target": target, "ema_skipped": skipped, **sparsity_figures(self.masks)}

    def state_dict(self) -> dict[str, Any]:
        # The masks themselves are buffers of our StructureMask modules: the checkpoint's adapter part.
        return {"ema": self.ema.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.masks.values())).head_mask.device if self.masks else None
        self.ema.load_state_dict(state["ema"], device)
        self.skipped = int(state["skipped"])

    # ---------------------------------------------------------------- scoring and pruning
    def _update_scores(self) -> int:
        """Average this step's group scores into the EMA; returns how many vectors were skipped."""
        skipped = 0
        captured = self.capture.take() if self.capture is not None else None
        with torch.no_grad():
            for i in self.masks:
                layer = self.layers[i]
                scores = {}
                if captured is not None:
                    scores = self.capture.layer_scores(captured, i, self.masks[i].shape, self.cfg)
                if captured is None and self.cfg.prune_heads:
                    shape = self.masks[i].shape
                    scores["heads"] = head_scores(layer.self_attn, shape, self.cfg.criterion, self.cfg.score_power,
                                                  self.cfg.gqa_policy)
                if captured is None and self.cfg.prune_channels:
                    scores["channels"] = channel_scores(layer.mlp, self.cfg.criterion, self.cfg.score_power)
                for kind, score in scores.items():
                    if score is None or not self.ema.update(f"{i}.{kind}", score):
                        skipped += 1
        return skipped

    def _prune(self, target: float) -> None:
        """Mask each layer's lowest-EMA heads and channels, as many as ``_counts(target)`` says."""
        if not self.masks:
            return
        head_units, channels = self._counts(target)
        for i, mask in self.masks.items():
            if self.cfg.prune_heads:
                scores = self.ema.get(f"{i}.heads", _unit_keep(mask, self.cfg.gqa_policy))
                mask.head_mask.copy_(self._select_heads(mask, scores, head_units))
            if self.cfg.prune_channels:
                keep = mask.channel_mask
                mask.channel_mask.copy_(select_pruned(self.ema.get(f"{i}.channels", keep), keep, channels))

    def _counts(self, target: float) -> tuple[int, int]:
        """(head units, channels) every masked layer loses at ``target``; a head unit is what ``_head_unit`` says.

        per_layer: the target fraction of each kind; uniform: the plan's final counts scaled by the progress.
        """
        if self.plan is not None:
            return self.plan.removed_at(target / self.sparsity.final)
        mask = next(iter(self.masks.values()))  # prunable layers all have the base's shape
        shape = mask.shape
        units = {"kv_group": shape.num_kv_heads, "per_group": shape.group_size, "query_head": shape.num_heads}
        return removed_count(target, units[self._head_unit()]), removed_count(target, mask.channel_mask.numel())

    def _head_unit(self) -> str:
        """kv_group: whole KV groups; per_group: the same number of query heads from every group; query_head."""
        if self.plan is not None:
            return self.plan.head_unit
        if self.cfg.gqa_policy == "kv_group":
            return "kv_group"
        return "per_group" if self.cfg.gqa_balanced else "query_head"

    def _select_heads(self, mask: StructureMask, scores: torch.Tensor, units: int) -> torch.Tensor:
        """New per-query-head keep-mask of one layer with ``units`` head units removed in total."""
        shape = mask.shape
        unit = self._head_unit()
        if unit == "kv_group":
            return select_pruned(scores, mask.kv_mask(), units).repeat_interleave(shape.group_size)
        if unit == "per_group":  # the same number from every group: standard GQA survives compaction
            keep = mask.head_mask.view(shape.num_kv_heads, shape.group_size)
            per_group = scores.view(shape.num_kv_heads, shape.group_size)
            return torch.cat([select_pruned(per_group[g], keep[g], units) for g in range(shape.num_kv_heads)])
        return select_pruned(scores, mask.head_mask, units)

    # ---------------------------------------------------------------- base-gradient plumbing (true_gradient)
    def _base_weights(self) -> list[nn.Parameter]:
        names = (ATTENTION_PROJECTIONS if self.cfg.prune_heads else ()) + (
            MLP_PROJECTIONS if self.cfg.prune_channels else ())
        weights = []
        for i in self.masks:
            for name in names:
                linear = base_linear(projection(self.layers[i], name))
                if type(linear) is not nn.Linear or not linear.weight.is_floating_point():
                    raise ValueError(
                        f"method.criterion={self.cfg.criterion} needs float base weights, but layer {i} {name} is "
                        f"{type(linear).__name__}: gradients of quantized weights do not exist. Use "
                        "method.criterion=lora_guided (the point of LoRAPrune) or model.quantization=none."
                    )
                weights.append(linear.weight)
        return weights

    def _enable_base_grads(self, optimizer: torch.optim.Optimizer) -> None:
        """Let autograd compute dL/dW0 of the prunable projections, which stay out of the optimizer."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for weight in self._base_weights():
            assert id(weight) not in in_optimizer, "a base weight is in the optimizer"
            weight.requires_grad_(True)

    def _clear_base_grads(self) -> None:
        for weight in self._base_weights():
            weight.grad = None


def _unit_keep(mask: StructureMask, policy: str) -> torch.Tensor:
    """Keep-mask over the pruning units: query heads, or KV groups for ``kv_group``."""
    return mask.kv_mask() if policy == "kv_group" else mask.head_mask


def sparsity_figures(masks: dict[int, StructureMask]) -> dict[str, float]:
    """``sparsity``: fraction of the prunable layers' groups (query heads + channels) removed; also per kind."""
    heads = sum(m.head_mask.numel() for m in masks.values())
    channels = sum(m.channel_mask.numel() for m in masks.values())
    heads_removed = sum(int((m.head_mask <= 0).sum()) for m in masks.values())
    channels_removed = sum(int((m.channel_mask <= 0).sum()) for m in masks.values())
    total = heads + channels
    return {
        "sparsity": (heads_removed + channels_removed) / total if total else 0.0,
        "sparsity_heads": heads_removed / heads if heads else 0.0,
        "sparsity_channels": channels_removed / channels if channels else 0.0,
    }
