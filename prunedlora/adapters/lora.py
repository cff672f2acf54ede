"""The LoRA adapter: one self-contained wrapper around any base linear.

``h = base(x) + s * B (m * A dropout(x))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), ``A``
Kaiming-uniform, ``B = 0`` (so the wrapped model equals the base at step 0) and ``m`` a rank mask buffer
(all ones for plain LoRA; PrunedLoRA clears bits as it prunes).

The wrapper keeps the original module as ``base_layer`` and never changes its class, so bitsandbytes
4/8-bit layers keep working (PEFT's ``LoraLayer`` convention). It uses PEFT's parameter names
(``lora_A``, ``lora_B``), so the PEFT-format export is a key prefix away.

Hook points for methods:
- ``bottleneck``: a module applied to the masked bottleneck ``m * A x`` (shape ``(..., r)``). Identity
  by default; DropLoRA puts its random mask here, and activation-based criteria register forward hooks
  on it to read ``A x``.
- ``rank_mask``: a float buffer of shape ``(r,)``; masked components contribute nothing in the forward,
  whatever values their weights hold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from prunedlora.models.surgery import replace_module, target_module_names


class LoRALinear(nn.Module):
    """A base linear plus a rank-``r`` low-rank update with a rank mask.

    Args:
        base_layer: the frozen linear to adapt (``nn.Linear`` or a bitsandbytes linear).
        rank: adapter rank r (the starting rank r0 for methods that prune ranks).
        alpha: scaling numerator; the scaling is fixed here, at creation, for the whole run.
        dropout: dropout on the input of the LoRA branch (PEFT's ``lora_dropout``).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    def __init__(
        self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Creating both nn.Linear layers before re-initialising A consumes the RNG exactly as PEFT does,
        # so the same seed gives the same A as `peft.LoraConfig` (the parity test relies on it).
        self.lora_A = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False)
        self.bottleneck: nn.Module = nn.Identity()
        self.register_buffer("rank_mask", torch.ones(rank))
        self.merged = False
        self.reset_parameters()
        weight = getattr(base_layer, "weight", None)
        if weight is not None and weight.is_floating_point():
            self.to(device=weight.device)

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (as PEFT), B zero: the adapter starts as the identity update."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lora_dtype = self.lora_A.weight.dtype
        z = self.lora_A(self.lora_dropout(x.to(lora_dtype)))  # (..., r)
        z = self.bottleneck(z * self.rank_mask.to(z.dtype))
        return result + (self.lora_B(z) * self.scaling).to(result.dtype)

    # ------------------------------------------------------------------------------------------ ranks
    def active_indices(self) -> torch.Tensor:
        """Indices of the rank components whose mask bit is set."""
        return torch.nonzero(self.rank_mask > 0, as_tuple=False).flatten()

    @property
    def active_rank(self) -> int:
        return int((self.rank_mask > 0).sum().item())

    def delta_weight(self) -> torch.Tensor:
        """``s * B diag(m) A`` in float32, shape ``(out_features, in_features)``."""
        b = self.lora_B.weight.float() * self.rank_mask.float()  # (out, r)
        return (b @ self.lora_A.weight.float()) * self.scaling

    # ------------------------------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Add the update into the base weight (idempotent). Only plain float linears can absorb it."""
        if self.merged:
            return
        weight = self._mergeable_weight()
        with torch.no_grad():
            weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (no-op when not merged)."""
        if not self.merged:
            return
        weight = self._mergeable_weight()
        with torch.no_grad():
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def _mergeable_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        if type(self.base_layer) is not nn.Linear or weight is None:
            raise TypeError(
                f"cannot merge LoRA into {type(self.base_layer).__name__}: only float nn.Linear bases are "
                "merged in place (export a quantized base as adapter + base instead)"
            )
        return weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}, active_rank={self.active_rank}, scaling={self.scaling:.4g}, merged={self.merged}"


# ------------------------------------------------------------------------------------- model helpers
def _is_wrappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)


def inject_lora(
    model: nn.Module,
    target_modules: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    layer_cls: type[LoRALinear] = LoRALinear,
) -> list[str]:
    """Wrap every targeted linear of ``model`` in ``layer_cls`` and return the wrapped module names.

    Modules are visited in ``named_modules`` order (as PEFT does), so seeded initialisation matches.

    Raises:
        ConfigError: when no module matches ``target_modules`` (names and the fix in the message).
    """
    names = target_module_names(model, target_modules, _is_wrappable)
    for name in names:
        replace_module(model, name, layer_cls(model.get_submodule(name), rank, alpha, dropout, use_rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRA wrappers of ``model`` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the ``lora_*`` parameters."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or name.startswith("lora_"))


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base linear and put the plain base layers back in place.

    Returns the same model object, now free of LoRA wrappers (what ``model/`` holds after export).
    """
    for name, module in list(lora_modules(model).items()):
        module.merge()
        replace_module(model, name, module.base_layer)
    return model

