"""DropLoRA's bottleneck mask (docs/methods.md §4): inverted dropout on ``z = m * A x`` between A and B.

Each module here is set as ``LoRALinear.bottleneck`` and sees ``z`` of shape ``(..., r)``. In training
mode it multiplies ``z`` by a Bernoulli(1 - p) mask rescaled by ``1 / (1 - p)`` (p = drop probability,
§8 items 8-9), so the expectation of the LoRA update is unchanged; in eval mode it is the identity, so
the trained adapter is plain LoRA and merges as ``W0 + s B A`` (§4.1, §4.4).

Two mask granularities (Decisions item 2, §8 item 7):

- ``element`` (the authors' code, §4.2): independent per sample, token and rank component, redrawn at
  every forward from the global RNG (``F.dropout`` on CUDA, a uniform threshold on CPU). Gradient
  checkpointing restores the RNG state before recomputation, so the recomputed forward sees the same
  mask.
- ``rank`` (the paper's wording): one r-vector per module per optimizer step, held in a buffer and shared
  by every micro-batch and any recomputation. ``RankDropout.resample_`` redraws it from a dedicated
  generator; ``prunedlora.methods.droplora`` calls it once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ElementDropout(nn.Module):
    """Per-element inverted dropout on the bottleneck (``mask_mode=element``).

    Args:
        rank: adapter rank r (unused; kept so every mask module has the same constructor).
        p: drop probability in [0, 1).
    """

    def __init__(self, rank: int, p: float) -> None:
        super().__init__()
        _check_p(p)
        self.p = p

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return z
        if z.is_cuda:  # one fused kernel (mask + scale + multiply)
            return F.dropout(z, self.p, training=True)
        # CPU: bernoulli_ (inside F.dropout) costs ~20 ns per element, 2-3x a float32 uniform draw plus a
        # compare; u ~ U[0, 1) is kept with probability P(u >= p) = 1 - p, the same Bernoulli(1 - p) mask.
        # The uniform is drawn in float32 so that bf16 rounding cannot shift the keep probability.
        keep = torch.rand(z.shape, device=z.device).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # (..., r)
        return z * keep.to(z.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, mask_mode=element"


class RankDropout(nn.Module):
    """One rank mask per optimizer step, shared by all micro-batches (``mask_mode=rank``).

    The ``keep`` buffer (r,) holds the already rescaled mask: entries are 0 (dropped) or
    ``1 / (1 - p)`` (kept), so the forward is one broadcast multiply. It holds ones (the identity) until
    the first ``resample_``. Being a buffer of a prunedlora module, it is saved in checkpoints with the
    adapter, so a resumed run continues with the mask already drawn for its next step.

    Args:
        rank: adapter rank r.
        p: drop probability in [0, 1).
    """

    def __init__(self, rank: int, p: float) -> None:
        super().__init__()
        _check_p(p)
        self.p = p
        self.register_buffer("keep", torch.ones(rank))  # (r,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return z
        return z * self.keep.to(z.dtype)  # (..., r) * (r,): broadcast over batch and tokens

    @torch.no_grad()
    def resample_(self, generator: torch.Generator) -> None:
        """Draw a new mask ``Bernoulli(1 - p) / (1 - p)`` of shape (r,) from ``generator`` (a CPU generator)."""
        kept = torch.rand(self.keep.shape, generator=generator) >= self.p  # (r,) bool, P(kept) = 1 - p
        self.keep.copy_(kept.to(self.keep.dtype) / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"rank={self.keep.numel()}, p={self.p}, mask_mode=rank"


MASK_MODULES: dict[str, type[nn.Module]] = {"element": ElementDropout, "rank": RankDropout}


def bottleneck_dropout(mask_mode: str, rank: int, p: float) -> nn.Module:
    """The bottleneck module for ``mask_mode`` (``element`` or ``rank``).

    Raises:
        ValueError: for an unknown ``mask_mode``.
    """
    try:
        cls = MASK_MODULES[mask_mode]
    except KeyError:
        raise ValueError(f"method.mask_mode={mask_mode} is not one of {', '.join(MASK_MODULES)}") from None
    return cls(rank, p)


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"DropLoRA drop probability p={p} must be in [0, 1)")
