"""The SALR linear: a sparse frozen base plus two adapters run as one concatenated GEMM pair (docs/methods.md §6).

``h = W_s x + B_cat (c ⊙ (A_cat x))`` (docs/methods.md §6.2 item 5, §6.4 item 4) with

- ``W_s`` the magnitude-pruned frozen base behind ``base_layer`` (a masked dense ``nn.Linear``, the
  training reference, or a ``BitmapLinear``/``SemiStructuredLinear`` from ``prunedlora.pruning.bitmap``);
- ``A_cat = [A_res; A_task]`` ``((r_res + r) x d_in)`` and ``B_cat = [B_res  B_task]`` ``(d_out x (r_res + r))``;
  the residual adapter ``B_res A_res`` starts as the rank-``r_res`` truncated SVD of the pruning residual
  ``E = W0 - W_s`` with ``√Σ`` on each side (§6.2 item 3, §8 item 21), the task LoRA as usual (A
  Kaiming-uniform, B = 0, §6.4 item 3);
- ``c`` the per-rank scale buffer ``rank_scale``: 1 on the residual slice, ``alpha / r`` on the task slice.

The four factors stay separate ``nn.Parameter``s (own optimizer groups: no weight decay on the residual,
§6.4 item 4); the forward concatenates them, so autograd hands each its own slice of the gradient.
Names follow ``LoRALinear``: ``base_layer``, ``lora_A``/``lora_B`` (task, PEFT's names),
``residual_A``/``residual_B``, and a ``bottleneck`` hook on ``c ⊙ (A_cat x)`` of shape ``(..., r_res + r)``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# Full SVD up to this min(d_out, d_in); above it torch.svd_lowrank (randomised), which is ~20x faster on
# CPU for SmolLM2's 576x1536 matrices and keeps > 98% of the optimal rank-8/64 energy of their residuals.
FULL_SVD_MAX_DIM = 256
LOWRANK_OVERSAMPLE = 16
LOWRANK_NITER = 8
# Seed of the randomised SVD's own RNG stream: fixed, so attaching twice (a resume) gives the same factors
# and the global RNG (task LoRA init, data order) is left untouched.
LOWRANK_SEED = 0
SVD_METHODS = ("auto", "full", "lowrank")


def truncated_svd(e: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``e`` in float32 (docs/methods.md §6.4 item 2).

    Args:
        e: ``(d_out, d_in)``, any float dtype (computed in float32).
        rank: number of components kept, at most ``min(d_out, d_in)``.
        method: ``full`` (``torch.linalg.svd``), ``lowrank`` (``torch.svd_lowrank`` with ``rank +
            LOWRANK_OVERSAMPLE`` columns and ``LOWRANK_NITER`` power iterations) or ``auto`` (full up to
            ``FULL_SVD_MAX_DIM``).

    Returns:
        ``U_r (d_out, r)``, ``S_r (r,)`` descending, ``V_r (d_in, r)``.
    """
    e = e.detach().float()
    n = min(e.shape)
    if not 0 <= rank <= n or method not in SVD_METHODS:
        raise ValueError(f"rank {rank} must be in [0, min(d_out, d_in)={n}] and method {method!r} in {SVD_METHODS}")
    q = rank + LOWRANK_OVERSAMPLE
    if method == "full" or (method == "auto" and n <= FULL_SVD_MAX_DIM) or q >= n:
        u, s, vh = torch.linalg.svd(e, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].T
    with torch.random.fork_rng(devices=[e.device] if e.is_cuda else []):
        torch.manual_seed(LOWRANK_SEED)
        u, s, v = torch.svd_lowrank(e, q=q, niter=LOWRANK_NITER)
    return u[:, :rank], s[:rank], v[:, :rank]


def residual_factors(e: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``B_res = U_r √Σ_r`` ``(d_out, r)`` and ``A_res = √Σ_r V_rᵀ`` ``(r, d_in)``, float32 (§6.2 item 3).

    A randomised SVD that misses the guarantee ``‖E - E_r‖_F² <= (1 - r/n) ‖E‖_F²`` (docs/methods.md §6.2 item
    3; the exact SVD always meets it) is redone with the full SVD, so the bound holds for every method.
    """
    u, s, v = truncated_svd(e, rank, method)
    root = s.sqrt()
    b, a = u * root, root[:, None] * v.T
    if method != "full" and rank:
        e32, n = e.detach().float(), min(e.shape)
        if (e32 - b @ a).square().sum() > (1 - rank / n) * e32.square().sum():
            return residual_factors(e, rank, "full")
    return b, a


def _linear(in_features: int, out_features: int, random_init: bool) -> nn.Linear:
    """A bias-free linear; PyTorch's random init only when asked and non-empty (an empty one warns)."""
    if random_init and in_features and out_features:
        return nn.Linear(in_features, out_features, bias=False)
    with warnings.catch_warnings():  # nn.Linear's constructor inits even on meta; empty weights warn
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)


class SalrLinear(nn.Module):
    """Sparse base + residual adapter + task LoRA, concatenated (see the module docstring).

    Args:
        base_layer: the pruned frozen linear (``in_features``/``out_features`` attributes, ``forward``).
        residual_rank: ``r_res`` (0: no residual adapter).
        rank: task LoRA rank ``r`` (0: no task adapter, e.g. a fused adapter loaded from an export).
        alpha: task scaling numerator, ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout on the task LoRA's input only; the residual adapter reconstructs part of the
            base and sees ``x`` as the base does.
        use_rslora: rsLoRA scaling for the task adapter.
    """

    def __init__(self, base_layer: nn.Module, residual_rank: int, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        if residual_rank < 0 or rank < 0 or residual_rank + rank == 0:
            raise ValueError(f"SALR needs residual_rank >= 0, rank >= 0 and a positive sum; got {residual_rank}, "
                             f"{rank}")
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.residual_rank = residual_rank
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank) if rank else 0.0
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The task adapter consumes the RNG exactly as LoRALinear does (same seed, same A as plain LoRA);
        # the residual factors are filled by set_residual, so they skip the random init.
        self.lora_A = _linear(self.in_features, rank, random_init=True)
        self.lora_B = _linear(rank, self.out_features, random_init=True)
        self.residual_A = _linear(self.in_features, residual_rank, random_init=False)
        self.residual_B = _linear(residual_rank, self.out_features, random_init=False)
        self.bottleneck: nn.Module = nn.Identity()
        scale = torch.cat([torch.ones(residual_rank), torch.full((rank,), self.scaling)])
        self.register_buffer("rank_scale", scale)  # c, (r_res + r,)
        if rank:  # an empty weight would only make init warn
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.zeros_(self.residual_A.weight)
        nn.init.zeros_(self.residual_B.weight)
        device = next((p.device for p in base_layer.parameters()), None)
        if device is not None:
            self.to(device=device)

    @property
    def total_rank(self) -> int:
        return self.residual_rank + self.rank

    @torch.no_grad()
    def set_residual(self, b_res: torch.Tensor, a_res: torch.Tensor) -> None:
        """Load the residual factors ``B_res (d_out, r_res)`` and ``A_res (r_res, d_in)``."""
        self.residual_B.weight.copy_(b_res)
        self.residual_A.weight.copy_(a_res)

    def a_cat(self) -> torch.Tensor:
        """``[A_res; A_task]``, ``(r_res + r, d_in)``."""
        return torch.cat([self.residual_A.weight, self.lora_A.weight], 0)

    def b_cat(self) -> torch.Tensor:
        """``[B_res  B_task]``, ``(d_out, r_res + r)``."""
        return torch.cat([self.residual_B.weight, self.lora_B.weight], 1)

    def _bottleneck_input(self, x: torch.Tensor) -> torch.Tensor:
        """``A_cat x`` (one GEMM), or two GEMMs when dropout must hit the task slice only."""
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            return F.linear(x, self.a_cat())  # (..., r_res + r)
        return torch.cat([self.residual_A(x), self.lora_A(self.lora_dropout(x))], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.rank and type(self.bottleneck) is nn.Identity:
            # A fused adapter loaded from an export: scale 1, no task slice, no dropout, so two plain GEMMs. Each op
            # saved counts in generation, where the adapters of a small model cost as much as its sparse bases.
            a, b = self.residual_A.weight, self.residual_B.weight
            return result + F.linear(F.linear(x.to(a.dtype), a), b).to(result.dtype)
        z = self._bottleneck_input(x.to(self.lora_A.weight.dtype))  # (..., r_res + r)
        z = self.bottleneck(z * self.rank_scale.to(z.dtype))
        return result + F.linear(z, self.b_cat()).to(result.dtype)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_cat, B_cat diag(c))`` in float32: one LoRA of rank ``r_res + r`` and scaling 1 (for export)."""
        a = self.a_cat().detach().float()
        b = self.b_cat().detach().float() * self.rank_scale.float()
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """``B_cat diag(c) A_cat`` in float32, ``(d_out, d_in)`` (tests and analysis; never merged)."""
        a, b = self.fused_factors()
        return b @ a

    def extra_repr(self) -> str:
        return f"residual_rank={self.residual_rank}, rank={self.rank}, scaling={self.scaling:.4g}"


def salr_modules(model: nn.Module) -> dict[str, SalrLinear]:
    """All SALR wrappers of ``model`` by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SalrLinear)}
