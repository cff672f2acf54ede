"""Activation-aware one-shot pruning of a frozen linear: Wanda and SparseGPT (methods.md Decisions item 0).

Both read calibration statistics of the linear's input ``X`` (``prunedlora.pruning.calibration``) and
return the pruned weight ``W_s`` (pruned entries exactly ``+0.0``), for the unstructured pattern (exactly
``round(p * numel)`` entries pruned per matrix, as the magnitude criterion) or ``2:4`` (2 of every 4
consecutive input columns of each row).

- **Wanda** (Sun et al. 2023): score ``|W_ij| * ‖X_j‖₂``, compared *within each output row* (the
  paper's finding: per-output comparison beats per-matrix for LLMs). No weight changes.
- **SparseGPT** (Frantar and Alistarh 2023): for every row, the OBS solution of
  ``min ‖(W - W_s) X‖²`` with ``H = X Xᵀ``, damped by ``0.01 * mean(diag H)``. Columns are processed left to
  right in blocks of 128: in each block the mask is chosen from ``w² / [H⁻¹]_jj²`` (the OBS error of removing
  ``w``; with ``H⁻¹`` through the upper Cholesky factor of ``H⁻¹``), each pruned weight's error is pushed onto the
  not-yet-processed columns of its row, and the block's accumulated error updates the columns to its right
  once (lazy batch updates). The surviving weights therefore change; the pruned ones are exactly zero.
"""

from __future__ import annotations

import torch

SPARSEGPT_DAMP = 0.01
SPARSEGPT_BLOCK = 128


def _per_row_counts(d_out: int, n_prune: int) -> torch.Tensor:
    """How many entries each row prunes so that the rows sum to exactly ``n_prune`` (as even as possible)."""
    counts = torch.full((d_out,), n_prune // d_out, dtype=torch.long)
    counts[: n_prune % d_out] += 1
    return counts


def _row_mask(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning the lowest ``scores`` of each row, ``n_prune`` in total (ties broken by position)."""
    d_out, d_in = scores.shape
    counts = _per_row_counts(d_out, n_prune).to(scores.device)
    order = torch.argsort(scores, dim=1, stable=True)  # ascending: the first counts[i] of row i go
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(d_in, device=scores.device).expand(d_out, -1))
    return ranks >= counts[:, None]


def _two_four(scores: torch.Tensor) -> torch.Tensor:
    """Keep-mask of the 2 highest ``scores`` in every 4 consecutive columns of each row."""
    d_out, d_in = scores.shape
    if d_in % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got a {d_out}x{d_in} weight; "
                         "use method.pattern=unstructured for this model")
    groups = scores.reshape(d_out, d_in // 4, 4)
    keep = torch.topk(groups, 2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(d_out, d_in)


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ‖X_j‖₂`` in float32, ``(d_out, d_in)``; ``sq_norm`` is ``‖X_j‖₂²``, ``(d_in,)``."""
    return weight.detach().abs().float() * sq_norm.float().clamp_min(0).sqrt()[None, :]


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """Wanda's keep-mask: per output row (unstructured, ``round(p * numel)`` in all) or ``2:4``."""
    scores = wanda_scores(weight, sq_norm)
    if pattern == "2:4":
        return _two_four(scores)
    return _row_mask(scores, round(sparsity * weight.numel()))


def _block_counts(d_out: int, d_in: int, block: int, sparsity: float) -> list[int]:
    """Entries pruned in each column block, summing to exactly ``round(p * d_out * d_in)``."""
    counts, done = [], 0
    for end in range(block, d_in + block, block):
        target = round(sparsity * d_out * min(end, d_in))
        counts.append(target - done)
        done = target
    return counts


def _inverse_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λ mean(diag H) I)⁻¹`` (float64 for the factorisations)."""
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    lower = torch.linalg.cholesky(h)
    h_inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(h_inv, upper=True)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, sparsity: float, pattern: str,
                    damp: float = SPARSEGPT_DAMP, block: int = SPARSEGPT_BLOCK) -> torch.Tensor:
    """SparseGPT's pruned weight (see the module docstring), float32 ``(d_out, d_in)``.

    Args:
        weight: ``W`` ``(d_out, d_in)``, any float dtype.
        gram: ``H = Σ x xᵀ`` over the calibration tokens, ``(d_in, d_in)``.
        sparsity: fraction pruned (unstructured; ``2:4`` always prunes half).
        pattern: ``unstructured`` or ``2:4``.
        damp: relative damping λ (``H + λ mean(diag H) I``).
        block: columns per lazy-update block (a multiple of 4 for ``2:4``).
    """
    w = weight.detach().float().clone()
    d_out, d_in = w.shape
    if pattern == "2:4" and (d_in % 4 or block % 4):
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got a {d_out}x{d_in} weight; "
                         "use method.pattern=unstructured for this model")
    h = gram.double().clone()
    dead = h.diagonal() == 0  # features never active: their weights cannot matter, prune them first
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_cholesky(h, damp).float().to(w.device)  # (d_in, d_in), upper
    keep = torch.ones_like(w, dtype=torch.bool)
    counts = _block_counts(d_out, d_in, block, sparsity)
    for b, start in enumerate(range(0, d_in, block)):
        end = min(start + block, d_in)
        w1, u1 = w[:, start:end].clone(), u[start:end, start:end]
        err1 = torch.zeros_like(w1)
        diag = u1.diagonal()
        if pattern != "2:4":
            scores = w1.square() / diag.square()[None, :]  # OBS error of removing each weight
            keep1 = _lowest_out(scores, counts[b])
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if pattern == "2:4" and i % 4 == 0:
                scores = w1[:, i:i + 4].square() / diag[i:i + 4].square()[None, :]
                keep1[:, i:i + 4] = _two_four(scores)
            col = w1[:, i]
            q = col.masked_fill(~keep1[:, i], 0.0)
            err = (col - q) / diag[i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]  # OBS update of this row's later columns
            w1[:, i] = q
            err1[:, i] = err
        w[:, start:end] = w1
        keep[:, start:end] = keep1
        w[:, end:] -= err1 @ u[start:end, end:]  # lazy update of everything right of the block
    return w.masked_fill_(~keep, 0.0)


def _lowest_out(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``n_prune`` lowest ``scores`` of the whole block (ties by position)."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.argsort(flat, stable=True)[:n_prune]] = False
    return keep.view_as(scores)
