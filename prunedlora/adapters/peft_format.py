"""Export our adapters in Hugging Face PEFT format.

``adapter/`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, adapter_dir)`` loads into a model with the same logits as ours.
Only active rank components are written. Our scaling stays fixed at creation (alpha / r0 for methods
that prune ranks), so the exported ``lora_alpha`` is rescaled to keep ``lora_alpha / r_final`` equal to
it (``lora_alpha / sqrt(r_final)`` with rsLoRA); per-module ranks and alphas go to ``rank_pattern`` and
``alpha_pattern`` when they differ.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from prunedlora.adapters.lora import LoRALinear, lora_modules

PEFT_PREFIX = "base_model.model."


def _exported_alpha(module: LoRALinear, rank: int) -> float:
    """The ``lora_alpha`` that gives PEFT the same scaling as ``module`` at ``rank``."""
    return module.scaling * (math.sqrt(rank) if module.use_rslora else rank)


def peft_adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """Active-rank slices of every adapter, keyed as PEFT saves them.

    Returns:
        (tensors, ranks, alphas): the state dict, and the exported rank and alpha of each module.
        Modules whose every component is pruned are left out (PEFT has no rank-0 adapter).
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, module in lora_modules(model).items():
        active = module.active_indices()
        if active.numel() == 0:
            continue
        a = module.lora_A.weight.detach()[active]  # (r_final, in)
        b = module.lora_B.weight.detach()[:, active]  # (out, r_final)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = int(active.numel())
        alphas[name] = _exported_alpha(module, ranks[name])
    return tensors, ranks, alphas


def export_peft_adapter(model: nn.Module, out_dir: Path, base_model_name_or_path: str) -> dict[str, int]:
    """Write ``model``'s adapters to ``out_dir`` in PEFT format and return the exported rank per module.

    Raises:
        ValueError: when the model has no active adapter component to export.
    """
    from peft import LoraConfig  # lazy: importing peft costs seconds

    tensors, ranks, alphas = peft_adapter_tensors(model)
    if not ranks:
        raise ValueError("the model has no active LoRA component to export")
    modules = lora_modules(model)
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    # Full module names as target_modules / pattern keys: PEFT matches them as suffixes, exactly.
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=sorted(ranks),
        rank_pattern={n: r for n, r in ranks.items() if r != default_rank},
        alpha_pattern={n: a for n, a in alphas.items() if a != default_alpha},
        use_rslora=any(m.use_rslora for m in modules.values()),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return ranks
