"""The PEFT adapter directory (``adapter/``): ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, "adapter")`` loads it into a model with the same logits as ours.

- LoRA-family methods: only active rank components are written. Our scaling stays fixed at creation (alpha / r0
  for methods that prune ranks), so the exported ``lora_alpha`` is rescaled to keep ``lora_alpha / r_final`` equal
  to it (``lora_alpha / sqrt(r_final)`` with rsLoRA); per-module ranks and alphas go to ``rank_pattern`` and
  ``alpha_pattern`` when they differ.
- SALR: the residual and task adapters of every ``SalrLinear`` fused into one LoRA of rank ``r_res + r`` with
  ``c`` folded into B and ``lora_alpha = r`` (scaling 1): PEFT's ``base(x) + (alpha / r) B A x`` then equals
  ``W_s x + B_cat (c ⊙ A_cat x)``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunedlora.adapters.lora import LoRALinear, lora_modules
from prunedlora.adapters.salr import salr_modules

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


def write_lora_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int],
                       alphas: dict[str, float], base_model_name_or_path: str, use_rslora: bool = False) -> None:
    """Write ``adapter_config.json`` (most common rank and alpha, the rest as patterns) and the tensors."""
    from peft import LoraConfig  # lazy: importing peft costs seconds

    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    default_alpha = Counter(alphas.values()).most_common(1)[0][0]
    # Full module names as target_modules / pattern keys: PEFT matches them as suffixes, exactly.
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=sorted(ranks),
        rank_pattern={n: r for n, r in ranks.items() if r != default_rank},
        alpha_pattern={n: a for n, a in alphas.items() if a != default_alpha},
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def export_peft_adapter(model: nn.Module, out_dir: Path, base_model_name_or_path: str) -> dict[str, int]:
    """Write ``model``'s adapters to ``out_dir`` in PEFT format and return the exported rank per module.

    Raises:
        ValueError: when the model has no active adapter component to export.
    """
    tensors, ranks, alphas = peft_adapter_tensors(model)
    if not ranks:
        raise ValueError("the model has no active LoRA component to export")
    rslora = any(m.use_rslora for m in lora_modules(model).values())
    write_lora_adapter(out_dir, tensors, ranks, alphas, base_model_name_or_path, use_rslora=rslora)
    return ranks


# ------------------------------------------------------------------------------- fused SALR adapter
def fused_adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every ``SalrLinear``'s fused adapter ``(A_cat, B_cat diag(c))``, keyed as PEFT saves a LoRA.

    Returns:
        ``(tensors, ranks)``: the state dict and each module's fused rank ``r_res + r``.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, module in salr_modules(model).items():
        a, b = module.fused_factors()  # (r_res + r, d_in), (d_out, r_res + r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = module.total_rank
    return tensors, ranks


def save_fused_adapter(model: nn.Module, out_dir: Path, base_model_name_or_path: str) -> dict[str, int]:
    """Write the fused SALR adapters as one PEFT LoRA (scaling 1: ``lora_alpha = r``) into ``out_dir``.

    Returns the fused rank per module.
    """
    tensors, ranks = fused_adapter_tensors(model)
    if not ranks:
        raise ValueError("the model has no SALR adapter to export")
    write_lora_adapter(out_dir, tensors, ranks, dict(ranks), base_model_name_or_path)
    return ranks


def load_fused_adapter(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read a PEFT LoRA written by ``save_fused_adapter`` (or any plain one): ``{module: (A, s * B)}``.

    The PEFT scaling ``s`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is folded into B, so each
    pair is a scaling-1 adapter. Pattern keys are matched as full module names (as we write them).
    """
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    factors = {}
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        name = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]  # (r, d_in), (d_out, r)
        r = config.get("rank_pattern", {}).get(name, config["r"])
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        factors[name] = (a, b * scaling)
    return factors
