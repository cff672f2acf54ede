"""Plain LoRA (Hu et al., 2021): the baseline every other method is compared with.

Also home of the LoRA-style attach/report/export steps that DropLoRA and PrunedLoRA reuse: they differ
from LoRA only in what happens during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import LoRALinear, inject_lora, lora_modules, mark_only_lora_as_trainable
from prunedlora.config import LoraConfig, SparsityConfig
from prunedlora.export import count_parameters, save_merged_model
from prunedlora.export.peft_adapter import export_peft_adapter
from prunedlora.methods.base import Callback, default_parameter_groups


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


def export_lora(model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str) -> dict[str, Any]:
    """``adapter/`` in PEFT format (active ranks only), then ``model/`` with the adapters merged."""
    export_peft_adapter(model, out_dir / "adapter", base_model_id)
    save_merged_model(model, tokenizer, out_dir / "model")
    return {"params_after_export": count_parameters(model)[0]}


class LoraMethod:
    """``method=lora``."""

    name = "lora"

    def __init__(self, cfg: LoraConfig, sparsity: SparsityConfig) -> None:
        self.cfg = cfg

    def attach(self, model: nn.Module) -> list[str]:
        return attach_lora(model, self.cfg, self.cfg.rank)

    def callbacks(self) -> list[Callback]:
        return []

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return default_parameter_groups(model, weight_decay)

    def report(self, model: nn.Module) -> dict[str, Any]:
        return rank_report(model)

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str) -> dict[str, Any]:
        return export_lora(model, tokenizer, out_dir, base_model_id)
