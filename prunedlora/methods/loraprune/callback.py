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
from prunedlora.methods.loraprune.events import EventPass
from prunedlora.methods.loraprune.selection import Selector, unit_keep
from prunedlora.methods.loraprune.uniform import UniformPlan
from prunedlora.models.surgery import projection
from prunedlora.pruning.calibration import InputStats
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA, StructuredCriterion
from prunedlora.pruning.schedules import is_event, target_fraction
from prunedlora.pruning.structure import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, StructureMask, decoder_layers
from prunedlora.pruning.structured_criteria import (
    GroupEma,
    base_linear,
    channel_scores,
    combine_scores,
    head_scores,
)


class LoraPruneCallback(Callback):
    """Scores, EMA and cumulative masking of one model's prunable layers.

    Args:
        model: the model the masks were attached to (read for scores; base grads for ``true_gradient``).
        masks: ``StructureMask`` by decoder-layer index (only prunable layers).
        cfg: the method config; ``sparsity``: the schedule (target fraction, cadence).
        plan: ``structure=uniform``'s final counts (every layer masked); None for ``per_layer``.
        rows: calibration rows (``(n, seq_len)`` token ids) for a calibrated criterion or ``method.refit``; their
            event passes run layer by layer (``events.py``).
    """

    def __init__(self, model: nn.Module, masks: dict[int, StructureMask], cfg: LoraPruneConfig,
                 sparsity: SparsityConfig, plan: UniformPlan | None = None, rows: torch.Tensor | None = None) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.masks = masks
        self.cfg = cfg
        self.sparsity = sparsity
        self.ema = GroupEma(cfg.ema)
        self.selector = Selector(cfg, plan, sparsity.final)
        self.max_steps = 0
        self.skipped = 0
        self.criterion = STRUCTURED_CRITERIA[cfg.criterion]
        self.parts = [STRUCTURED_CRITERIA[name] for name in self.criterion.parts]
        self.capture = None  # a criterion that scores whole groups captures them (channel_taylor: TaylorCapture)
        for part in self.parts:
            if part.scores_groups:
                self.capture = STRUCTURED_CRITERIA.function(part.name)({i: self.layers[i] for i in masks})
        self.events = EventPass(model, masks, cfg, rows) if self.criterion.calibrated or cfg.refit else None
        self.optimizer: torch.optim.Optimizer | None = None

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.max_steps = max_steps
        self.optimizer = optimizer
        if "base_gradients" in self.criterion.needs:
            self._enable_base_grads(optimizer)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        skipped = self._update_scores()
        self.skipped += skipped
        target = target_fraction(self.sparsity, step, self.max_steps, default=self.cfg.schedule(self.sparsity))
        figures = {}
        if is_event(self.sparsity, step) and target > 0:
            figures = self._prune(target)
        if "base_gradients" in self.criterion.needs:
            self._clear_base_grads()  # not in the optimizer, so zero_grad() would never clear them
        return {"prune_target": target, "ema_skipped": skipped, **sparsity_figures(self.masks), **figures}

    def state_dict(self) -> dict[str, Any]:
        # The masks themselves are buffers of our StructureMask modules: the checkpoint's adapter part. The base
        # weights a re-fit rewrote are not (the checkpoint never holds the base): they are kept here.
        state = {"ema": self.ema.state_dict(), "skipped": self.skipped}
        if self.events is not None and self.events.rewritten:
            state["refit_weights"] = self.events.rewritten_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.masks.values())).head_mask.device if self.masks else None
        self.ema.load_state_dict(state["ema"], device)
        self.skipped = int(state["skipped"])
        if state.get("refit_weights"):
            if self.events is None:
                raise RuntimeError("the checkpoint holds re-fitted base weights, but method.refit=false")
            self.events.load_rewritten(state["refit_weights"])

    # ---------------------------------------------------------------- scoring and pruning
    def _ema_key(self, part: str, i: int, kind: str) -> str:
        return f"{i}.{kind}" if len(self.parts) == 1 else f"{part}.{i}.{kind}"

    def _update_scores(self) -> int:
        """Average this step's group scores of the per-step criteria into the EMA; returns the vectors skipped."""
        skipped = 0
        captured = self.capture.take() if self.capture is not None else None
        with torch.no_grad():
            for part in self.parts:
                if part.calibrated:
                    continue  # scored from the event's calibration pass
                for i in self.masks:
                    for kind, score in self._step_scores(part, i, captured).items():
                        if score is None or not self.ema.update(self._ema_key(part.name, i, kind), score):
                            skipped += 1
        return skipped

    def _step_scores(self, part: StructuredCriterion, i: int, captured: dict | None) -> dict[str, torch.Tensor | None]:
        layer, shape, cfg = self.layers[i], self.masks[i].shape, self.cfg
        if part.scores_groups:
            return self.capture.layer_scores(captured, i, shape, cfg) if captured is not None else {}
        scores = {}
        if cfg.prune_heads:
            scores["heads"] = head_scores(layer.self_attn, shape, part.name, cfg.score_power, cfg.gqa_policy)
        if cfg.prune_channels:
            scores["channels"] = channel_scores(layer.mlp, part.name, cfg.score_power)
        return scores

    def event_scores(self, i: int, layer: nn.Module, stats: dict[str, InputStats] | None
                     ) -> dict[str, torch.Tensor | None]:
        """Layer ``i``'s vectors at an event: the EMA of each per-step criterion (zeros before any update), the
        calibration pass's scores of a calibrated one, averaged by ``combine_scores`` for a combination."""
        mask, cfg = self.masks[i], self.cfg
        kinds = {"heads": unit_keep(mask, cfg.gqa_policy), "channels": mask.channel_mask}
        vectors: dict[str, list] = {kind: [] for kind in kinds}
        for part in self.parts:
            if part.calibrated:
                scores = STRUCTURED_CRITERIA.function(part.name)(
                    layer, stats or {}, heads=cfg.prune_heads, channels=cfg.prune_channels, power=cfg.score_power,
                    policy=cfg.gqa_policy)
            else:
                scores = {kind: self.ema.get(self._ema_key(part.name, i, kind), like) for kind, like in kinds.items()}
            for kind in kinds:
                vectors[kind].append(scores.get(kind))
        if len(self.parts) == 1:
            return {kind: found[0] for kind, found in vectors.items()}
        return {kind: combine_scores(found) for kind, found in vectors.items()}

    def _prune(self, target: float) -> dict[str, Any]:
        """Cut each layer to ``selector.counts(target)`` by its event scores (with a calibration pass, layer by layer,
        when the criterion or the re-fit needs one); returns the event's re-fit figures."""
        if not self.masks:
            return {}
        head_units, channels = self.selector.counts(target, next(iter(self.masks.values())))
        if not any(self.selector.grows(mask, head_units, channels) for mask in self.masks.values()):
            return {}  # the scheduled counts did not rise: nothing to cut, no calibration pass
        if self.events is not None:
            return self.events.run(self, head_units, channels, self.optimizer)
        for i, mask in self.masks.items():
            self.selector.select(mask, self.event_scores(i, self.layers[i], None), head_units, channels)
        return {}

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
