"""LoRAPrune (Zhang et al., ACL Findings 2024; methods.md §5): prune base heads and MLP channels while LoRA trains.

Attach: LoRA on the seven projections, then a ``StructureMask`` with masking hooks on every prunable
decoder layer (all but the first ``exempt_first_frac`` of the layers and the last ``exempt_last``).

Every optimizer step (``on_before_optimizer_step``, complete unscaled gradients), per prunable layer:
head and channel importance (``structured_criteria``: ``channel_taylor`` by default, captured by hooks on the
inputs of o_proj/down_proj during the step's backward passes; the paper's ``lora_guided``, ``magnitude``, or
``true_gradient``) is averaged into an EMA (0.9). At pruning events (every ``sparsity.every`` steps) the
target fraction ``sparsity.final`` follows the cubic schedule (``sparsity.schedule: auto``) with the
group's warm-up/cool-down, and each layer independently masks its lowest-EMA fraction of query heads
(or KV groups) and of MLP channels. Masks are cumulative: masked units rank lowest and are never
restored. Pruning fires whenever the scheduled count rises, so the final fraction is reached (the
authors' ``init < ratio < final`` condition would stop one event short).

``structure=uniform`` (``prunedlora.pruning.uniform``): every decoder layer is masked, and every event removes
the same counts from each (the plan's final counts scaled by the schedule's progress), sized so the export has
per_layer's parameter count; each layer still picks its own units by its own EMA.

GQA policy (methods.md §5.6): see ``prunedlora.pruning.structure``. In short: the query head is the
unit, scored as q(h) + o(h) + (k + v) of its KV head; a KV head's k/v rows go only when all its query
heads are gone; ``gqa_policy=kv_group`` removes whole KV groups instead; ``gqa_balanced=true`` removes
``floor(target * G)`` query heads from every group. At export, layers whose KV groups kept unequal
numbers of query heads get k/v expanded to one KV head per query head (exact).

Quantized bases: masks act on module outputs, so a bitsandbytes 4/8-bit base trains unchanged (packed
weights are never edited; ``lora_guided`` and ``magnitude`` dequantize ``W0`` one module at a time to
score it). At export its linears are dequantized exactly (float32) before compaction, so ``model/`` is a
float model, like the other methods' merged exports.

Export: masks removed, projections physically sliced (base and LoRA factors), LoRA merged, and
``model/`` written as a ``pruned_llama`` checkpoint (``config.json`` with per-layer head counts and MLP
widths, ``auto_map`` to ``modeling_pruned_llama.py``), loadable with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, plus ``pruning_manifest.json``
(kept head, KV-head and channel indices per layer). Under ``structure=uniform`` ``model/`` is instead a plain
checkpoint of the base's architecture, loadable without remote code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.lora import lora_modules, merge_lora
from prunedlora.config import LoraPruneConfig, SparsityConfig
from prunedlora.export import count_parameters
from prunedlora.export.pruned_llama import model_layout, save_pruned_llama
from prunedlora.export.uniform_llama import save_uniform_llama
from prunedlora.methods.base import Callback
from prunedlora.methods.lora import attach_lora
from prunedlora.models.surgery import dequantize_linears, projection
from prunedlora.pruning.schedules import is_event, target_fraction
from prunedlora.pruning.structure import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    LayerPlan,
    StructureMask,
    attach_structure_masks,
    compact_model,
    decoder_layers,
    detach_structure_masks,
    plan_layer,
    prunable_layer_indices,
    select_pruned,
)
from prunedlora.pruning.structured_criteria import (
    GroupEma,
    TaylorCapture,
    base_linear,
    channel_scores,
    head_scores,
)
from prunedlora.pruning.uniform import ModelShape, UniformPlan, removed_count, uniform_plan

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = "cubic"


# ------------------------------------------------------------------------------------------ callback
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
        self.taylor = TaylorCapture({i: self.layers[i] for i in masks}) if cfg.criterion == "channel_taylor" else None

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.max_steps = max_steps
        if self.cfg.criterion == "true_gradient":
            self._enable_base_grads(optimizer)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        skipped = self._update_scores()
        self.skipped += skipped
        target = target_fraction(self.sparsity, step, self.max_steps, default=DEFAULT_SCHEDULE)
        if is_event(self.sparsity, step) and target > 0:
            self._prune(target)
        if self.cfg.criterion == "true_gradient":
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
        taylor = self.taylor.take() if self.taylor is not None else None
        with torch.no_grad():
            for i in self.masks:
                layer = self.layers[i]
                scores = {}
                if taylor is not None:
                    scores = TaylorCapture.layer_scores(taylor, i, self.masks[i].shape, self.cfg)
                if taylor is None and self.cfg.prune_heads:
                    shape = self.masks[i].shape
                    scores["heads"] = head_scores(layer.self_attn, shape, self.cfg.criterion, self.cfg.score_power,
                                                  self.cfg.gqa_policy)
                if taylor is None and self.cfg.prune_channels:
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

    # ---------------------------------------------------------------- true_gradient plumbing
    def _base_weights(self) -> list[nn.Parameter]:
        names = (ATTENTION_PROJECTIONS if self.cfg.prune_heads else ()) + (
            MLP_PROJECTIONS if self.cfg.prune_channels else ())
        weights = []
        for i in self.masks:
            for name in names:
                linear = base_linear(projection(self.layers[i], name))
                if type(linear) is not nn.Linear or not linear.weight.is_floating_point():
                    raise ValueError(
                        f"method.criterion=true_gradient needs float base weights, but layer {i} {name} is "
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


# ------------------------------------------------------------------------------------------- export
def _check_exportable(model: nn.Module) -> None:
    """Physical compaction slices float ``nn.Linear`` weights (after ``dequantize_linears``)."""
    for i, layer in enumerate(decoder_layers(model)):
        for proj in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            linear = base_linear(projection(layer, proj))
            if type(linear) is not nn.Linear:
                raise NotImplementedError(
                    f"loraprune export: layer {i} {proj} is a {type(linear).__name__}. Physical compaction slices "
                    "float nn.Linear weights; bitsandbytes 4/8-bit bases are dequantized automatically, other "
                    "quantized or fused layers are not supported. The run's last checkpoint holds the adapter and "
                    "the structure masks."
                )


def _non_embedding(model: nn.Module) -> int:
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def compact_and_merge(model: nn.Module) -> list[LayerPlan]:
    """Detach the masks, dequantize a bitsandbytes base, slice every pruned layer (base and LoRA factors),
    merge LoRA; returns the plan of every layer."""
    masks = detach_structure_masks(model)
    dequantize_linears(model)
    _check_exportable(model)
    plans = {i: plan_layer(m.shape, m.head_mask, m.channel_mask) for i, m in masks.items()}
    all_plans = compact_model(model, plans)
    merge_lora(model)
    return all_plans


def export_loraprune(model: nn.Module, tokenizer: Any, out_dir: Path, structure: str = "per_layer") -> dict[str, Any]:
    """Compact, merge and save ``out_dir/model``; returns the parameter figures for ``summary.json``."""
    lora_params = sum(p.numel() for m in lora_modules(model).values()
                      for p in (*m.lora_A.parameters(), *m.lora_B.parameters()))
    before = count_parameters(model)[0] - lora_params
    plans = compact_and_merge(model)
    after = count_parameters(model)[0]
    non_embedding_after = _non_embedding(model)
    non_embedding_before = non_embedding_after + (before - after)  # embeddings are never pruned
    save = save_uniform_llama if structure == "uniform" else save_pruned_llama
    save(model, tokenizer, out_dir / "model", plans)
    expanded = [i for i, p in enumerate(plans) if p.expanded]
    log.info("loraprune export: %d -> %d parameters (%.1f%% fewer); GQA expanded in layers %s",
             before, after, 100 * (1 - after / before), expanded or "none")
    return {
        "params_before_export": before,
        "params_after_export": after,
        "params_reduction": 1 - after / before,
        "params_non_embedding_before": non_embedding_before,
        "params_non_embedding_after": non_embedding_after,
        "params_non_embedding_reduction": 1 - non_embedding_after / non_embedding_before,
        "gqa_expanded_layers": expanded,
        **{f"exported_{k}": v for k, v in model_layout(plans).items()},
    }


# ------------------------------------------------------------------------------------------- method
class LoraPruneMethod:
    """``method=loraprune``."""

    name = "loraprune"

    def __init__(self, cfg: LoraPruneConfig, sparsity: SparsityConfig) -> None:
        self.cfg = cfg
        self.sparsity = sparsity
        self.model: nn.Module | None = None
        self.masks: dict[int, StructureMask] = {}
        self.plan: UniformPlan | None = None
        """``structure=uniform``'s final counts (set by ``attach``)."""
        self._callbacks: list[LoraPruneCallback] = []

    def attach(self, model: nn.Module) -> list[str]:
        layers = decoder_layers(model)
        names = attach_lora(model, self.cfg, self.cfg.rank)
        if self.cfg.structure == "uniform":
            prunable = list(range(len(layers)))  # one LlamaConfig: every layer gets the same shape
            self.plan = uniform_plan(ModelShape.from_config(model.config), self.cfg, self.sparsity.final)
            log.info("loraprune uniform: every layer keeps %s at sparsity.final=%s: %d parameters, per_layer's %d "
                     "(%+.2f%%)", self.plan.kept, self.sparsity.final, self.plan.parameters,
                     self.plan.reference_parameters, 100 * (self.plan.parameters / self.plan.reference_parameters - 1))
        else:
            prunable = prunable_layer_indices(len(layers), self.cfg.exempt_first_frac, self.cfg.exempt_last)
        self.masks = attach_structure_masks(model, prunable)
        self.model = model
        if not prunable:
            log.warning("loraprune: no prunable layer among %d (exempt_first_frac=%s, exempt_last=%d); nothing will "
                        "be pruned", len(layers), self.cfg.exempt_first_frac, self.cfg.exempt_last)
        log.info("loraprune: structure %s, criterion %s, GQA policy %s, pruned layers %s", self.cfg.structure,
                 self.cfg.criterion, self.cfg.gqa_policy, prunable)
        return names

    def callbacks(self) -> list[Callback]:
        if self.model is None:
            raise RuntimeError("call attach(model) before callbacks()")
        self._callbacks.append(LoraPruneCallback(self.model, self.masks, self.cfg, self.sparsity, self.plan))
        return self._callbacks[-1:]

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The LoRA factors only: base weights (trainable-looking under ``true_gradient``) never join."""
        params = [p for m in lora_modules(model).values() for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
        return [{"params": params, "weight_decay": weight_decay}]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Sparsity figures and per-layer kept query heads, KV heads and channels (before export)."""
        layers = decoder_layers(model)
        kept_heads, kept_kv, kept_channels = [], [], []
        for i, layer in enumerate(layers):
            mask = self.masks.get(i)
            if mask is None:
                attn = layer.self_attn
                kept_heads.append(attn.q_proj.out_features // attn.head_dim)
                kept_kv.append(attn.k_proj.out_features // attn.head_dim)
                kept_channels.append(layer.mlp.gate_proj.out_features)
            else:
                kept_heads.append(int(mask.head_mask.sum()))
                kept_kv.append(int(mask.kv_mask().sum()))
                kept_channels.append(int(mask.channel_mask.sum()))
        return {
            **sparsity_figures(self.masks),
            "criterion": self.cfg.criterion,
            "gqa_policy": self.cfg.gqa_policy,
            "structure": self.cfg.structure,
            **({"uniform_plan": self.plan.to_dict()} if self.plan is not None else {}),
            "prunable_layers": sorted(self.masks),
            "kept_heads_per_layer": kept_heads,
            "kept_kv_heads_per_layer": kept_kv,
            "kept_channels_per_layer": kept_channels,
        }

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str) -> dict[str, Any]:
        for callback in self._callbacks:  # channel_taylor's capture hooks go before the model is compacted
            if callback.taylor is not None:
                callback.taylor.remove()
        return export_loraprune(model, tokenizer, out_dir, self.cfg.structure)
