"""LoRAPrune's re-fit at a cut (``method.refit``): ``pruning/refit.py``'s least squares applied to the model.

A cut removes input columns of ``o_proj`` (heads) and ``down_proj`` (channels). Their kept columns are re-solved so
that the projection's output on the calibration rows stays what it was just before the cut:
``W' = argmin ‖W̃ X - W' X_k‖² + λ‖W' - anchor‖²`` with ``X`` the projection's input on those rows (its previous cuts
already masked), ``k`` the columns kept by this cut and ``W̃ = W0 + s B A`` the effective weight: the adapter is
part of what the layer computed, so it is part of what is re-fitted.

What happens to the adapter of a re-fitted projection (``method.refit_lora``):

- ``keep`` (default): the base absorbs the re-fit, ``W0[:, k] <- W'[:, k] - s (B A)[:, k]``, so ``W0 + s B A`` on the
  kept columns is the re-fit and A, B and their optimizer state are untouched. A's columns for the removed inputs
  stay but read zeros (the mask), and B is on the output side, whose rows all stay: nothing of the adapter is
  dropped until the export slices A with the base.
- ``merge``: the adapter is merged into the base before the re-fit, ``W0[:, k] <- W'[:, k]``, B is zeroed and the
  step's gradients of A and B are dropped, so the adapter restarts from the LoRA initialisation's state (A as
  trained, B = 0) on top of the re-fitted base. Adam's first moments of A and B are cleared (their old direction
  refers to the merged adapter); the second moments are kept: cleared under a step count in the hundreds, Adam's
  bias correction would no longer undo their zero start and the next updates would be 3-6x sign steps.

Both give the same model right after the event; they differ in what the adapter learns next. The base is written in
place (never replaced: DeepSpeed and the optimizer hold references), and only in float: the config refuses the
re-fit with a quantized base or under DeepSpeed while training (``config._validate_base_rewrite``); a one-shot cut
runs before either exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunedlora.adapters.lora import LoRALinear
from prunedlora.distributed import full_grad, optimizer_state, set_full_grad, set_full_param, set_optimizer_state
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.pruning.refit import RefitResult, refit_columns
from prunedlora.pruning.structured_criteria import base_linear, effective_weight


@dataclass(frozen=True)
class RefitOptions:
    """``method.refit_damping``, ``method.refit_anchor``, ``method.refit_lora``."""

    damping: float
    anchor: str
    lora: str = "keep"

    @classmethod
    def of(cls, cfg: LoraPruneConfig) -> RefitOptions:
        return cls(cfg.refit_damping, cfg.refit_anchor, cfg.refit_lora)


@torch.no_grad()
def refit_projection(module: nn.Module, gram: torch.Tensor | None, keep: torch.Tensor, options: RefitOptions,
                     optimizer: torch.optim.Optimizer | None = None) -> RefitResult:
    """Re-fit the kept input columns ``keep`` of one projection (a ``LoRALinear`` or a plain linear) in place.

    Args:
        module: ``o_proj`` or ``down_proj`` of a decoder layer.
        gram: ``Σ x xᵀ`` of its input on the calibration rows, collected before this cut (consumed: freed or
            overwritten by the solve).
        keep: ascending input columns kept by this cut (``pruning.refit.kept_columns``).
        options: damping, anchor, and what happens to the adapter.
        optimizer: the training optimizer, whose first moments of A and B ``merge`` clears (None: before training).

    Returns:
        The re-fit's figures (``RefitResult``); its weight has been written into the base.
    """
    linear = base_linear(module)
    weight = linear.weight
    if type(linear) is not nn.Linear or not weight.is_floating_point():
        raise TypeError(f"re-fit: {type(linear).__name__} is not a float nn.Linear; method.refit rewrites the base "
                        "weights, which needs model.quantization=none (or sparsity.schedule=one_shot)")
    lora = isinstance(module, LoRALinear) and not module.merged
    # A plain float32 weight is only read by the solve: no copy (one-shot cuts, before any adapter exists).
    source = weight if not lora and weight.dtype == torch.float32 else effective_weight(module)
    result = refit_columns(source, gram, keep, options.damping, options.anchor, consume=True)
    del source
    new = result.weight  # (d_out, |k|) float32: the effective weight of the kept columns
    keep = keep.to(weight.device)
    if lora and options.lora == "keep":
        b = module.lora_B.weight.float() * module.rank_mask.float()  # (d_out, r)
        new = new - (b @ module.lora_A.weight.float()[:, keep]) * module.scaling  # W0[:, k] = W'[:, k] - s (BA)[:, k]
    weight.index_copy_(1, keep, new.to(weight.dtype))
    if lora and options.lora == "merge":
        _restart_adapter(module, optimizer)
    return result


def _restart_adapter(module: LoRALinear, optimizer: torch.optim.Optimizer | None) -> None:
    """B = 0, this step's gradients of A and B dropped, their first moments cleared (module docstring)."""
    set_full_param(module.lora_B.weight, torch.zeros_like(module.lora_B.weight, dtype=torch.float32))
    for param in (module.lora_A.weight, module.lora_B.weight):
        grad = full_grad(param)
        if grad is not None:
            set_full_grad(param, torch.zeros_like(grad))
        moment = optimizer_state(optimizer, param, "exp_avg") if optimizer is not None else None
        if moment is not None:
            set_optimizer_state(optimizer, param, "exp_avg", torch.zeros_like(moment))


@dataclass
class RefitFigures:
    """What an event's re-fits did, for ``metrics.jsonl`` and ``summary.json``."""

    refits: int = 0
    used: int = 0
    error_ratio_sum: float = 0.0

    def add(self, result: RefitResult) -> None:
        self.refits += 1
        self.used += int(result.used_refit)
        self.error_ratio_sum += result.error_ratio

    def to_dict(self) -> dict[str, float]:
        """``refit_error_ratio``: the mean over the event's re-fits of (output error after / prune-only's)."""
        if not self.refits:
            return {}
        return {"refits": self.refits, "refits_used": self.used,
                "refit_error_ratio": self.error_ratio_sum / self.refits}
