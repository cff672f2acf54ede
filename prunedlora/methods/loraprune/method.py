"""LoRAPrune (Zhang et al., ACL Findings 2024; docs/methods.md §5, §5.8): prune the base's heads and channels.

The default (``sparsity.schedule=auto`` = one_shot, ``one_shot.py``): before the first step, one calibration pass
scores every prunable layer (``method.criterion=activation``), cuts it to ``sparsity.final``, re-fits the kept
columns of o_proj/down_proj (``method.refit``) and compacts it, layer by layer; LoRA then attaches to the smaller
model and nothing happens between steps. The teacher of ``recovery=mix`` is a held copy of the base.

A progressive schedule (``cubic``, the paper's; ``linear``): LoRA on the seven projections, then a ``StructureMask``
with masking hooks on every prunable decoder layer (all but the first ``exempt_first_frac`` of the layers and the
last ``exempt_last``). Every optimizer step (``on_before_optimizer_step``, complete unscaled gradients), per
prunable layer: head and channel importance (the ``method.criterion`` record of
``prunedlora.pruning.criteria.STRUCTURED_CRITERIA``: ``channel_taylor``, captured by hooks on the inputs of
o_proj/down_proj during the step's backward passes; the paper's ``lora_guided``; ``magnitude``; ``true_gradient``;
or the calibrated ``activation`` / ``activation_taylor``) is averaged into an EMA (0.9). At pruning events (every
``sparsity.every`` steps) the target fraction follows the schedule with the group's warm-up/cool-down, and each
layer independently masks its lowest-EMA fraction of query heads (or KV groups) and of MLP channels, re-fitting
at each event with ``method.refit``. Masks are cumulative: masked units rank lowest and are never restored. Pruning
fires whenever the scheduled count rises, so the final fraction is reached (the authors' ``init < ratio < final``
condition would stop one event short).

This folder: ``config.py`` (options, registration), ``one_shot.py`` (the cut before training), ``callback.py``
(scores, EMA, masking), ``events.py`` (an event's calibration pass), ``export.py`` (compaction), ``method.py``
(attach, teacher, report).

``structure=uniform`` (``uniform.py``): every decoder layer is masked, and every event removes
the same counts from each (the plan's final counts scaled by the schedule's progress), sized so the export has
per_layer's parameter count; each layer still picks its own units by its own EMA.

GQA policy (docs/methods.md §5.6): see ``prunedlora.pruning.structure``. In short: the query head is the
unit, scored as q(h) + o(h) + (k + v) of its KV head; a KV head's k/v rows go only when all its query
heads are gone; ``gqa_policy=kv_group`` removes whole KV groups instead; ``gqa_balanced=true`` (default) removes
``floor(target * G)`` query heads from every group. With ``gqa_balanced=false``, layers whose KV groups kept unequal
numbers of query heads get k/v expanded at export to one KV head per query head (exact).

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.lora import lora_modules
from prunedlora.config import SparsityConfig
from prunedlora.methods.base import AttachContext, Callback, Method
from prunedlora.methods.lora.method import attach_lora
from prunedlora.methods.loraprune.callback import LoraPruneCallback, sparsity_figures
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.events import missing_calibration
from prunedlora.methods.loraprune.export import cut_sparsity, export_loraprune
from prunedlora.methods.loraprune.one_shot import (
    OneShotCut,
    PrunedBase,
    fingerprint,
    needs_rows,
    one_shot_cut,
    quantize_decoder,
)
from prunedlora.methods.loraprune.uniform import ModelShape, UniformPlan, uniform_plan
from prunedlora.pruning.calibration import calibration_rows
from prunedlora.pruning.schedules import ONE_SHOT
from prunedlora.pruning.structure import StructureMask, attach_structure_masks, decoder_layers, prunable_layer_indices

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- method
class LoraPruneMethod(Method):
    """``method=loraprune``."""

    cfg: LoraPruneConfig

    def __init__(self, cfg: LoraPruneConfig, sparsity: SparsityConfig) -> None:
        super().__init__(cfg, sparsity)
        self.model: nn.Module | None = None
        self.masks: dict[int, StructureMask] = {}
        self.plan: UniformPlan | None = None
        """``structure=uniform``'s final counts (set by ``attach``)."""
        self.cut: OneShotCut | None = None
        """``sparsity.schedule=one_shot``'s cut (set by ``attach``)."""
        self.params_before_cut: int | None = None
        self.context = AttachContext()
        self._event_rows: torch.Tensor | None = None
        self._callbacks: list[LoraPruneCallback] = []

    @property
    def one_shot(self) -> bool:
        return self.cfg.schedule(self.sparsity) == ONE_SHOT

    @property
    def quantizes_base(self) -> bool:
        """One-shot: the base is cut (and re-fitted) in float, then quantized (``one_shot.quantize_decoder``)."""
        return self.one_shot

    def prepare(self, context: AttachContext) -> None:
        """The training rows (calibration), ``model.quantization`` (one-shot) and the run directory (one-shot)."""
        self.context = context

    def _rows(self) -> torch.Tensor | None:
        """The calibration rows, or None when nothing needs them; refused when they are needed and missing."""
        if not needs_rows(self.cfg, self.one_shot):
            return None
        ctx = self.context
        if not ctx.train_examples:
            raise missing_calibration(self.cfg, self.one_shot)
        return calibration_rows(ctx.train_examples, self.cfg.calibration_sequences, ctx.seq_len)

    def _prunable(self, model: nn.Module) -> list[int]:
        layers = decoder_layers(model)
        if self.cfg.structure == "uniform":
            self.plan = uniform_plan(ModelShape.from_config(model.config), self.cfg, self.sparsity.final)
            log.info("loraprune uniform: every layer keeps %s at sparsity.final=%s: %d parameters, per_layer's %d "
                     "(%+.2f%%)", self.plan.kept, self.sparsity.final, self.plan.parameters,
                     self.plan.reference_parameters, 100 * (self.plan.parameters / self.plan.reference_parameters - 1))
            return list(range(len(layers)))  # one LlamaConfig: every layer gets the same shape
        prunable = prunable_layer_indices(len(layers), self.cfg.exempt_first_frac, self.cfg.exempt_last)
        if not prunable:
            log.warning("loraprune: no prunable layer among %d (exempt_first_frac=%s, exempt_last=%d); nothing will "
                        "be pruned", len(layers), self.cfg.exempt_first_frac, self.cfg.exempt_last)
        return prunable

    def attach(self, model: nn.Module) -> list[str]:
        prunable = self._prunable(model)
        self.model = model
        if self.one_shot:
            self._cut_before_training(model, prunable)
            names = attach_lora(model, self.cfg, self.cfg.rank)
        else:
            rows = self._rows()  # before anything changes: a missing calibration set fails here, not at an event
            names = attach_lora(model, self.cfg, self.cfg.rank)
            self.masks = attach_structure_masks(model, prunable)
            self._event_rows = rows
        log.info("loraprune: structure %s, criterion %s, GQA policy %s, %s, pruned layers %s", self.cfg.structure,
                 self.cfg.criterion, self.cfg.gqa_policy, "one-shot" if self.one_shot else "progressive", prunable)
        return names

    def _cut_before_training(self, model: nn.Module, prunable: list[int]) -> None:
        """The one-shot cut, or its saved result (``one_shot.py``); then ``model.quantization``."""
        ctx = self.context
        self.params_before_cut = sum(p.numel() for p in model.parameters())
        rows = self._rows()
        store = PrunedBase(ctx.run_dir) if ctx.run_dir is not None else None
        digest = fingerprint(self.cfg, self.sparsity, rows, model)
        if store is None or (ctx.is_main and not store.exists()):
            self.cut = one_shot_cut(model, rows, self.cfg, self.plan, self.sparsity.final, prunable)
            if store is not None:
                store.save(model, self.cut, digest)
        ctx.barrier()  # every rank, always: what rank 0 saved is complete for the others
        if self.cut is None:
            self.cut = store.load(model, digest)
        if ctx.quantization != "none":
            quantize_decoder(model, ctx.quantization)

    def callbacks(self) -> list[Callback]:
        if self.model is None:
            raise RuntimeError("call attach(model) before callbacks()")
        if self.one_shot:
            return []  # cut before the first step: nothing happens between steps
        self._callbacks.append(LoraPruneCallback(self.model, self.masks, self.cfg, self.sparsity, self.plan,
                                                 self._event_rows))
        return self._callbacks[-1:]

    @property
    def teacher_source(self) -> str:
        """``copy`` where the training model no longer holds the unpruned weights: a one-shot run compacts it before
        the first step, ``method.refit`` rewrites the kept columns of o_proj/down_proj at every event. Otherwise the
        switched-off model (``teacher``) is the base."""
        return "copy" if self.one_shot or self.cfg.refit else "self"

    @contextmanager
    def teacher(self, model: nn.Module) -> Iterator[None]:
        """The unpruned model: adapters off (``Method.teacher``) and every head and channel kept, the masks put back
        on exit. Used without a re-fit only (``teacher_source``): then the base weights are never edited, so this is
        the base."""
        saved = {i: (mask.head_mask.clone(), mask.channel_mask.clone()) for i, mask in self.masks.items()}
        try:
            with torch.no_grad():
                for mask in self.masks.values():
                    mask.head_mask.fill_(1.0)
                    mask.channel_mask.fill_(1.0)
            with super().teacher(model):
                yield
        finally:
            with torch.no_grad():
                for i, (heads, channels) in saved.items():
                    self.masks[i].head_mask.copy_(heads)
                    self.masks[i].channel_mask.copy_(channels)

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The LoRA factors only: base weights (trainable-looking under ``true_gradient``) never join."""
        params = [p for m in lora_modules(model).values() for p in (*m.lora_A.parameters(), *m.lora_B.parameters())]
        return [{"params": params, "weight_decay": weight_decay}]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Sparsity figures and per-layer kept query heads, KV heads and channels (before export)."""
        layers = decoder_layers(model)
        sparsity = sparsity_figures(self.masks) if self.cut is None else cut_sparsity(self.cut.plans, model)
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
            **sparsity,
            "criterion": self.cfg.criterion,
            "schedule": "one_shot" if self.one_shot else "progressive",
            "refit": self.cfg.refit,
            **({"one_shot": self.cut.figures} if self.cut is not None else {}),
            "gqa_policy": self.cfg.gqa_policy,
            "structure": self.cfg.structure,
            **({"uniform_plan": self.plan.to_dict()} if self.plan is not None else {}),
            "prunable_layers": sorted(self.masks) if self.cut is None else sorted(self.cut.plans),
            "kept_heads_per_layer": kept_heads,
            "kept_kv_heads_per_layer": kept_kv,
            "kept_channels_per_layer": kept_channels,
        }

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        """``model/`` (``formats`` can only be ``hf``: config validation rejects the rest)."""
        for callback in self._callbacks:  # channel_taylor's capture hooks go before the model is compacted
            if callback.capture is not None:
                callback.capture.remove()
        if self.cut is None:
            return export_loraprune(model, tokenizer, out_dir, self.cfg.structure)
        return export_loraprune(model, tokenizer, out_dir, self.cfg.structure, cut=self.cut.plans,
                                params_before=self.params_before_cut)
