"""Plain LoRA (Hu et al., 2021): the baseline every other method is compared with.

Also home of the LoRA-style attach/report/export steps that DropLoRA and PrunedLoRA reuse: they differ
from LoRA only in what happens during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import LoRALinear, inject_lora, lora_modules, mark_only_lora_as_trainable
from prunedlora.export import count_parameters, describe, save_merged_model
from prunedlora.export.hf import CLIENT as HF_CLIENT
from prunedlora.export.peft_adapter import CLIENT as ADAPTER_CLIENT
from prunedlora.export.peft_adapter import export_peft_adapter
from prunedlora.methods.base import Method
from prunedlora.methods.lora.config import LoraConfig


def attach_lora(
    model: nn.Module, cfg: LoraConfig, rank: int, layer_cls: type[LoRALinear] = LoRALinear
) -> list[str]:
    """Wrap the target linears at ``rank`` and freeze everything else."""
    names = inject_lora(model, cfg.target_modules, rank, cfg.alpha, cfg.dropout, cfg.use_rslora, layer_cls)
    mark_only_lora_as_trainable(model)
    return names


def rank_report(model: nn.Module) -> dict[str, Any]:
    """Final active rank per adapted module, and the adapter's effective (active) parameter count."""
    modules = lora_modules(model)
    ranks = {name: m.active_rank for name, m in modules.items()}
    effective = sum(r * (m.in_features + m.out_features) for r, m in zip(ranks.values(), modules.values()))
    return {"ranks": ranks, "params_adapter_effective": effective}


LORA_FORMATS = ("hf", "adapter")


def export_lora(model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
                formats: Sequence[str] | None = None) -> dict[str, Any]:
    """``adapter/`` in PEFT format (active ranks only), then ``model/`` with the adapters merged (``formats``:
    which of the two, default both). ``params_after_export`` counts the merged model either way."""
    formats = LORA_FORMATS if formats is None else formats
    exports = {}
    params_merged = count_parameters(model)[0] - sum(p.numel() for m in lora_modules(model).values()
                                                     for p in (*m.lora_A.parameters(), *m.lora_B.parameters()))
    if "adapter" in formats:
        ranks = export_peft_adapter(model, out_dir / "adapter", base_model_id)
        exports["adapter"] = describe(out_dir / "adapter", "adapter", "the LoRA adapter (active ranks)",
                                      ADAPTER_CLIENT, base=base_model_id, rank=max(ranks.values()))
    if "hf" in formats:
        save_merged_model(model, tokenizer, out_dir / "model")
        exports["model"] = describe(out_dir / "model", "hf", "the base with the adapter merged", HF_CLIENT)
    return {"params_after_export": params_merged, "exports": exports}


class LoraMethod(Method):
    """``method=lora``: nothing happens between steps, so no callbacks."""

    cfg: LoraConfig

    def attach(self, model: nn.Module) -> list[str]:
        return attach_lora(model, self.cfg, self.cfg.rank)

    def report(self, model: nn.Module) -> dict[str, Any]:
        return rank_report(model)

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        return export_lora(model, tokenizer, out_dir, base_model_id, formats)
