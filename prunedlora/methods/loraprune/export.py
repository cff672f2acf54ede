"""LoRAPrune's export: masks removed, projections physically sliced (base and LoRA factors), LoRA merged, and
``model/`` written as a ``pruned_llama`` checkpoint (``structure=per_layer``) or a plain checkpoint of the base's
architecture (``structure=uniform``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import lora_modules, merge_lora
from prunedlora.export import count_parameters, describe
from prunedlora.export.hf import CLIENT as HF_CLIENT
from prunedlora.export.pruned_llama import CLIENT as PRUNED_LLAMA_CLIENT
from prunedlora.export.pruned_llama import model_layout, save_pruned_llama
from prunedlora.export.uniform_llama import save_uniform_llama
from prunedlora.models.surgery import dequantize_linears, projection
from prunedlora.pruning.structure import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    LayerPlan,
    compact_model,
    decoder_layers,
    detach_structure_masks,
    plan_layer,
)
from prunedlora.pruning.structured_criteria import base_linear

log = logging.getLogger(__name__)


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


def cut_sparsity(plans: dict[int, LayerPlan], model: nn.Module) -> dict[str, float]:
    """``sparsity_figures`` of a one-shot cut: the fraction of the pruned layers' query heads and channels removed
    (the model's config still has the unpruned counts)."""
    config = model.config
    heads = config.num_attention_heads * len(plans)
    channels = config.intermediate_size * len(plans)
    heads_removed = heads - sum(p.num_heads for p in plans.values())
    channels_removed = channels - sum(p.num_channels for p in plans.values())
    total = heads + channels
    return {"sparsity": (heads_removed + channels_removed) / total if total else 0.0,
            "sparsity_heads": heads_removed / heads if heads else 0.0,
            "sparsity_channels": channels_removed / channels if channels else 0.0}


def export_loraprune(model: nn.Module, tokenizer: Any, out_dir: Path, structure: str = "per_layer",
                     cut: dict[int, LayerPlan] | None = None, params_before: int | None = None) -> dict[str, Any]:
    """Compact, merge and save ``out_dir/model``; returns the parameter figures for ``summary.json``.

    ``cut``: the plans of layers a one-shot cut already compacted (their manifest keeps the original indices), and
    ``params_before`` the model's parameter count before it.
    """
    lora_params = sum(p.numel() for m in lora_modules(model).values()
                      for p in (*m.lora_A.parameters(), *m.lora_B.parameters()))
    before = count_parameters(model)[0] - lora_params if params_before is None else params_before
    plans = compact_and_merge(model)
    if cut:
        plans = [cut.get(i, plan) for i, plan in enumerate(plans)]
    after = count_parameters(model)[0]
    non_embedding_after = _non_embedding(model)
    non_embedding_before = non_embedding_after + (before - after)  # embeddings are never pruned
    if structure == "uniform":
        save_uniform_llama(model, tokenizer, out_dir / "model", plans)
        described = describe(out_dir / "model", "hf", "every layer pruned alike, LoRA merged: a plain checkpoint of "
                             "the base's architecture", HF_CLIENT)
    else:
        save_pruned_llama(model, tokenizer, out_dir / "model", plans)
        described = describe(out_dir / "model", "hf", "the per-layer pruned LLaMA, LoRA merged, with its modelling "
                             "file", PRUNED_LLAMA_CLIENT)
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
        "exports": {"model": described},
    }
