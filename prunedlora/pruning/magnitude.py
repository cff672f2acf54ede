"""Magnitude masks for static pruning of frozen weights (SALR, docs/methods.md §6.2 item 2, §6.4 item 1).

A mask is a bool tensor of the weight's shape, ``True`` where the weight is kept. Three patterns:

- ``per_matrix`` (default): every matrix keeps exactly ``numel - round(p * numel)`` entries, the largest
  ``|w|``; ties at the threshold are pruned in index order, so the mask is deterministic.
- ``global``: one threshold over every matrix at once (docs/methods.md §8 item 22), found by bisection on the
  float32 bit patterns, so no concatenation of all weights is ever built; ties at the threshold are pruned.
- ``2:4``: in every group of 4 consecutive input columns of a row, the 2 largest ``|w|`` are kept
  (semi-structured, 50% whatever ``p`` says).

``prune_`` zeroes the pruned entries in place with ``masked_fill`` (a product ``w * mask`` would leave
``-0.0`` behind, which the bitmap format of ``prunedlora.pruning.bitmap`` would then have to store).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

MaskFn = Callable[[torch.Tensor], torch.Tensor]
SCOPES = ("per_matrix", "global")
PATTERNS = ("unstructured", "2:4")
# Bit pattern of +inf in float32: |w| of any finite weight is below it, as an int32 view.
_FLOAT32_INF_BITS = 0x7F800000


def per_matrix_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep exactly the ``numel - round(sparsity * numel)`` largest ``|w|`` of ``weight``.

    Args:
        weight: ``(d_out, d_in)`` (any shape works).
        sparsity: fraction pruned, in ``[0, 1)``.

    Returns:
        bool mask of ``weight``'s shape, ``True`` = kept.
    """
    flat = weight.detach().abs().flatten().float()
    n_prune = round(sparsity * flat.numel())
    if n_prune == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n_prune).values  # O(n), unlike a sort
    mask = flat > threshold
    # Entries equal to the threshold: prune the first ones by position until exactly n_prune are gone.
    ties = torch.nonzero(flat == threshold).flatten()
    n_ties_pruned = n_prune - int((flat < threshold).sum())
    mask[ties[n_ties_pruned:]] = True
    return mask.view_as(weight)


def _abs_bits(weight: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32 viewed as int32: for non-negative floats the bit pattern orders like the value."""
    return weight.detach().abs().float().contiguous().view(torch.int32)


def global_threshold(weights: Iterable[torch.Tensor], sparsity: float) -> float:
    """The magnitude ``t`` such that pruning ``|w| <= t`` over all ``weights`` prunes ``round(p * N)`` of them.

    Exact (up to ties): a bisection over the int32 views of ``|w|`` in float32, at most 31 counting passes,
    one matrix at a time, so memory stays at one matrix whatever the model size.

    Returns:
        The threshold, or ``-1.0`` when nothing is to be pruned (``|w| <= -1`` is never true).
    """
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    n_prune = round(sparsity * total)
    if n_prune == 0:
        return -1.0
    lo, hi = 0, _FLOAT32_INF_BITS  # invariant: count(bits <= hi) >= n_prune; answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        count = sum(int((_abs_bits(w) <= mid).sum()) for w in weights)
        if count >= n_prune:
            hi = mid
        else:
            lo = mid + 1
    return torch.tensor([lo], dtype=torch.int32).view(torch.float32).item()


def threshold_mask(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep ``|w| > threshold`` (the rule paired with ``global_threshold``)."""
    return weight.detach().abs().float() > threshold


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest ``|w|`` of every 4 consecutive input columns of each row (2:4 semi-structured).

    Raises:
        ValueError: when ``d_in`` is not a multiple of 4.
    """
    d_out, d_in = weight.shape
    if d_in % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got a {d_out}x{d_in} weight; "
                         "use method.pattern=unstructured for this model")
    groups = weight.detach().abs().float().reshape(d_out, d_in // 4, 4)  # (d_out, d_in/4, 4)
    keep = torch.topk(groups, 2, dim=-1).indices  # (d_out, d_in/4, 2)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(d_out, d_in)


def mask_function(weights: Iterable[torch.Tensor], sparsity: float, scope: str, pattern: str) -> MaskFn:
    """The mask rule for one pruning call: a function ``weight -> mask`` applied matrix by matrix.

    ``global`` needs every weight to find its threshold first; the others look at one matrix only.

    Raises:
        ValueError: for an unknown ``scope`` or ``pattern``, or ``2:4`` with ``scope=global``.
    """
    if pattern not in PATTERNS or scope not in SCOPES:
        raise ValueError(f"pattern={pattern!r}, scope={scope!r}: accepted patterns {PATTERNS}, scopes {SCOPES}")
    if pattern == "2:4":
        if scope != "per_matrix":
            raise ValueError("2:4 pruning is defined per group of 4 columns; it has no global scope")
        return two_four_mask
    if scope == "global":
        threshold = global_threshold(weights, sparsity)
        return lambda w: threshold_mask(w, threshold)
    return lambda w: per_matrix_mask(w, sparsity)


@torch.no_grad()
def prune_(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the pruned entries of ``weight`` in place (``+0.0``, never ``-0.0``); returns ``weight``."""
    return weight.masked_fill_(~mask, 0.0)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero."""
    return float((weight == 0).sum()) / weight.numel()
