"""Activation-aware one-shot pruning of a frozen linear: Wanda and SparseGPT (docs/methods.md Decisions item 0).

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
    """Upper Cholesky factor ``U`` of ``(H + λ mean(diag H) I)⁻¹`` (``Uᵀ U = H⁻¹``), float64.

    One factorisation and one triangular inverse instead of factor, invert, factor again: with ``J`` the
    reversal permutation and ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular
    with a positive diagonal, so it is that factor.
    """
    h = gram.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)


@torch.no_grad()
def sparsegpt_factor(gram: torch.Tensor, damp: float = SPARSEGPT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """What SparseGPT needs of ``H``: the float32 upper factor ``U`` of the damped ``H⁻¹`` and the mask of dead
    input features (``H_jj = 0``: never active, so their weights are pruned first). Linears that read the same
    input (q/k/v) share it: compute it once and pass it to :func:`sparsegpt_prune` as ``factor``."""
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    return _inverse_cholesky(h, damp).float(), dead


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor | None, sparsity: float, pattern: str,
                    damp: float = SPARSEGPT_DAMP, block: int = SPARSEGPT_BLOCK,
                    factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """SparseGPT's pruned weight (see the module docstring), float32 ``(d_out, d_in)``.

    Args:
        weight: ``W`` ``(d_out, d_in)``, any float dtype.
        gram: ``H = Σ x xᵀ`` over the calibration tokens, ``(d_in, d_in)`` (unused when ``factor`` is given).
        sparsity: fraction pruned (unstructured; ``2:4`` always prunes half).
        pattern: ``unstructured`` or ``2:4``.
        damp: relative damping λ (``H + λ mean(diag H) I``).
        block: columns per lazy-update block (a multiple of 4 for ``2:4``).
        factor: ``sparsegpt_factor(gram, damp)``, when already computed for another linear of the same input.
    """
    d_out, d_in = weight.shape
    if pattern == "2:4" and (d_in % 4 or block % 4):
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got a {d_out}x{d_in} weight; "
                         "use method.pattern=unstructured for this model")
    # Transposed, (d_in, d_out): the column loop below reads and updates contiguous rows.
    wt = weight.detach().float().t().contiguous()
    u, dead = factor if factor is not None else sparsegpt_factor(gram, damp)  # (d_in, d_in) upper; (d_in,)
    u, dead = u.to(wt.device), dead.to(wt.device)
    wt[dead] = 0.0
    keep = torch.ones_like(wt, dtype=torch.bool)
    counts = _block_counts(d_out, d_in, block, sparsity)
    for b, start in enumerate(range(0, d_in, block)):
        end = min(start + block, d_in)
        w1, u1, keep1 = wt[start:end], u[start:end, start:end], keep[start:end]  # views: updated in place
        diag = u1.diagonal()
        if pattern != "2:4":
            scores = w1.square() / diag.square()[:, None]  # OBS error of removing each weight
            keep1.copy_(_lowest_out(scores.t(), counts[b]).t())
        # err_i = w_i / U_ii on the pruned entries of column i, 0 on the kept ones; the rank-1 update
        # w_{i:} -= err_i U_{i,i:} then zeroes the pruned entries of w_i itself and pushes their error onto
        # the later columns of their rows (one fused op per column: the loop is the pass's cost).
        err_scale = (~keep1).float() / diag[:, None]
        err1 = torch.empty_like(w1)
        for i in range(end - start):
            if pattern == "2:4" and i % 4 == 0:
                scores = w1[i:i + 4].square() / diag[i:i + 4].square()[:, None]
                keep1[i:i + 4] = _two_four(scores.t()).t()
                err_scale[i:i + 4] = (~keep1[i:i + 4]).float() / diag[i:i + 4, None]
            torch.mul(w1[i], err_scale[i], out=err1[i])
            w1[i:].addr_(u1[i, i:], err1[i], alpha=-1.0)
        wt[end:].addmm_(u[start:end, end:].t(), err1, alpha=-1.0)  # lazy update of every column right of it
    return wt.masked_fill_(~keep, 0.0).t().contiguous()


def _lowest_out(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``n_prune`` lowest ``scores`` of the whole block (ties by position).

    A selection, not a sort (a stable argsort of the block was a fifth of SparseGPT's time): everything below
    the ``n_prune``-th smallest value goes, then the first entries equal to it make up the count.
    """
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        threshold = torch.kthvalue(flat, n_prune).values
        below = flat < threshold
        keep[below] = False
        ties = (flat == threshold).nonzero().flatten()
        keep[ties[: n_prune - int(below.sum())]] = False
    return keep.view_as(scores)
