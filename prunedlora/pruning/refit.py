"""Structured least-squares re-fit: re-solve the kept input columns of a linear after some were pruned.

When structured pruning removes heads or MLP channels it drops input columns of ``o_proj`` / ``down_proj``.
With ``X`` the linear's calibration inputs (``d_in x N``), ``G = X Xᵀ``, ``k`` the kept and ``p`` the pruned
columns, the kept weights can absorb part of what the removed columns computed:

    W' = argmin ‖W X - W' X_k‖² + λ ‖W' - A‖²,    λ = rel_damping · mean(diag G_kk)

closed form ``W' = (W G[:, k] + λ A)(G_kk + λ I)⁻¹`` per output row, the structured counterpart of
SparseGPT's update. The ridge anchor ``A`` is selectable:

- ``anchor="zero"`` (default, the formula the prototype measured): ``A = 0``, so
  ``W' = W G[:, k] (G_kk + λ I)⁻¹``, the augmented least squares ``[X_kᵀ; √λ I] W'ᵀ ≈ [(W X)ᵀ; 0]``.
- ``anchor="kept"``: ``A = W[:, k]``, SparseGPT's own damping (its OBS update with ``H + λ I`` minimises exactly
  this). Then the re-fit provably never raises the output error above prune-only's, and ``G = I`` gives
  ``W[:, k]`` back at any damping.

It is computed as a correction of prune-only, ``W' = W_k + Δ`` with ``Δ = (W_p G_pk + λ(A - W_k)) M⁻¹`` and
``M = G_kk + λ I = L Lᵀ``, which also yields both output errors from ``G`` alone, at no extra product:
``err_prune = tr(W_p G_pp W_pᵀ)`` and, with ``Y = R L⁻ᵀ``,
``err_refit = err_prune - 2 tr(Δ (W_p G_pk)ᵀ) + ‖Y‖² - λ ‖Δ‖²``. The re-fit is kept only when its error is not
above prune-only's (so "never worse than dropping the columns, on the calibration data" holds for both
anchors); both errors come back in ``RefitResult``.

Precision and memory. ``G`` is accumulated in float32 by ``calibration.py`` (as SparseGPT's reference does:
the accumulated rounding, ~1e-6 of the diagonal, is four orders below the 1% damping, and float64 Gram
accumulation is 32-64x slower on most GPUs). The products with ``G`` run in ``G``'s dtype, one block of output
rows at a time (``W_b`` with its kept columns zeroed, times ``G``: no copy of ``G`` is made); the Cholesky
factor and the triangular solves run in float64, where the damped system's condition number (up to
``max eig / λ``, 1e5 and more with LLM outlier features) would cost float32 most of its digits. Peak extra
memory: one ``|k| x |k|`` float64 matrix (filled by blocks and factorised in place), a few ``block x d_in`` float64
blocks (16 MB each), and the result in the weight's dtype. At LLaMA-7B's ``down_proj`` at 50%: 242 MB + ~100 MB +
90 MB (measured on CPU: 540 MB peak above the 462 MB Gram matrix, allocator slack included).

Features with no calibration signal: a kept feature with ``G_jj = 0`` never fired (its row and column of ``G``
are zero), so the data says nothing about its weights: they are kept unchanged (the ``anchor="zero"`` formula
would zero them, which the data cannot justify). A pruned one contributes nothing to either error. The bias,
if any, is not touched: it does not depend on the removed columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFIT_DAMPING = 0.01
"""λ relative to ``mean(diag G_kk)``: the prototype's and SparseGPT's value."""
ANCHORS = ("zero", "kept")
_BLOCK_ELEMENTS = 1 << 21
"""Elements of one ``block x d_in`` float64 temporary (16 MB): bounds the row blocks."""


@dataclass
class RefitResult:
    """What ``refit_columns`` decided for one linear."""

    weight: torch.Tensor
    """The new ``(d_out, |k|)`` weight of the kept columns, in the input weight's dtype and device: the re-fit,
    or ``W[:, k]`` when the re-fit was not better."""
    refit_error: float
    """``‖W X - W'_refit X_k‖²`` summed over the calibration tokens (from ``G``), whether or not it was used."""
    prune_error: float
    """``‖W X - W[:, k] X_k‖²`` (dropping the columns), the same way."""
    used_refit: bool
    """False when the re-fit's error was above prune-only's (then ``weight`` is ``W[:, k]``)."""

    @property
    def error_ratio(self) -> float:
        """Error of the returned weight over prune-only's (1.0 when prune-only's is 0)."""
        kept = self.refit_error if self.used_refit else self.prune_error
        return kept / self.prune_error if self.prune_error > 0 else 1.0


def kept_columns(unit_keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Input-column indices kept by a per-unit keep-mask: heads (``group_size = head_dim``) or channels (1).

    Args:
        unit_keep: ``(n_units,)`` keep-mask (``StructureMask.head_mask`` / ``channel_mask``: > 0 kept).
        group_size: consecutive columns per unit.

    Returns:
        Ascending int64 indices into the ``n_units * group_size`` columns.
    """
    units = torch.nonzero(unit_keep > 0).flatten()
    offsets = torch.arange(group_size, device=units.device)
    return (units[:, None] * group_size + offsets).flatten()


def _check_gram(gram: torch.Tensor | None, d_in: int) -> torch.Tensor:
    fix = ("collect the Gram matrix of this linear's input first (calibration with gram=True over at least one "
           "calibration row: a positive method.calibration_sequences)")
    if gram is None or gram.numel() == 0:
        raise ValueError(f"re-fit: no calibration Gram matrix (Σ x xᵀ of the linear's input) was given; {fix}")
    if gram.shape != (d_in, d_in):
        raise ValueError(f"re-fit: the Gram matrix is {tuple(gram.shape)}, the weight has {d_in} input columns; "
                         "pass the Gram of this linear's own input, collected before any column was removed")
    # The diagonal is enough: a NaN or inf input makes its Σ x_j² non-finite, and a finite diagonal bounds every
    # entry (|G_ij| <= sqrt(G_ii G_jj)); isfinite over the whole matrix would cost 1.7x its size in temporaries.
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise ValueError("re-fit: the calibration Gram matrix holds NaN or inf (the calibration forward overflowed; "
                         "calibrate in float32 or bfloat16 rather than float16)")
    if not bool((gram.diagonal() > 0).any()):
        raise ValueError(f"re-fit: the calibration Gram matrix is zero (0 calibration tokens reached this linear); "
                         f"{fix}")
    return gram


def _check_keep(keep: torch.Tensor, d_in: int) -> torch.Tensor:
    keep = keep.flatten().long()
    if keep.numel() and (keep.min() < 0 or keep.max() >= d_in or bool((keep[1:] <= keep[:-1]).any())):
        raise ValueError(f"re-fit: kept columns must be ascending, distinct indices below {d_in}")
    return keep


def _factor(gram: torch.Tensor, keep: torch.Tensor, dead: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor of ``G_kk + λ I`` (float64), dead features' diagonal set to 1: one ``|k|²`` float64
    matrix in all, filled a block of rows at a time and factorised in place."""
    k = keep.numel()
    m = torch.empty(k, k, dtype=torch.float64, device=gram.device)
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, k, step):
        m[start:start + step] = gram[keep[start:start + step, None], keep]
    m.diagonal()[dead] = 1.0
    m.diagonal()[~dead] += damping
    # LAPACK factorises column-major storage in place; the transposed view of the symmetric m is that layout, so
    # torch writes the factor into m's own storage instead of a copy (measured: no extra memory on CPU).
    lower = m.mT
    info = torch.empty((), dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info):
        raise ValueError(
            f"re-fit: the damped Gram matrix of the kept columns is not positive definite (λ = {damping:.3g}; "
            "with method.refit_damping=0 it is singular when the kept features are linearly dependent on the "
            "calibration data, e.g. fewer calibration tokens than kept columns); use a positive damping "
            f"(default {REFIT_DAMPING}) or more calibration rows")
    return lower.tril_()


@torch.no_grad()
def refit_columns(weight: torch.Tensor, gram: torch.Tensor | None, keep: torch.Tensor,
                  rel_damping: float = REFIT_DAMPING, anchor: str = "zero",
                  block_rows: int | None = None) -> RefitResult:
    """Re-solve the kept input columns of ``weight`` against its calibration Gram matrix (module docstring).

    Args:
        weight: ``W`` ``(d_out, d_in)``, any float dtype (a dequantized or effective weight is fine).
        gram: ``G = Σ x xᵀ`` over the calibration tokens, ``(d_in, d_in)``, float32 or float64, collected on the
            linear's input with every column still present.
        keep: ascending indices of the kept input columns (``kept_columns`` builds them from a unit mask).
        rel_damping: λ as a fraction of ``mean(diag G_kk)`` over the features that fired; >= 0.
        anchor: ``zero`` (``W G[:, k] (G_kk + λ I)⁻¹``) or ``kept`` (ridge towards ``W[:, k]``).
        block_rows: output rows per block (default: a 16 MB float64 block).

    Returns:
        The kept-column weight and both output errors (``RefitResult``).

    Raises:
        ValueError: no or an empty/zero/non-finite Gram matrix, bad indices, a negative damping, an unknown
            anchor, or a damped system that is not positive definite; each message names the fix.
    """
    d_out, d_in = weight.shape
    gram = _check_gram(gram, d_in)
    keep = _check_keep(keep, d_in).to(weight.device)
    if rel_damping < 0:
        raise ValueError(f"re-fit: rel_damping must be >= 0, got {rel_damping}")
    if anchor not in ANCHORS:
        raise ValueError(f"re-fit: anchor must be one of {ANCHORS}, got {anchor!r}")
    gram = gram.to(weight.device)
    kept_mask = torch.zeros(d_in, dtype=torch.bool, device=weight.device)
    kept_mask[keep] = True
    diag = gram.diagonal()[keep]
    dead = diag <= 0  # never fired: row and column of G are zero
    damping = rel_damping * float(diag[~dead].double().mean()) if bool((~dead).any()) else 0.0
    lower = _factor(gram, keep, dead, damping)

    new = torch.empty(d_out, keep.numel(), dtype=weight.dtype, device=weight.device)
    refit_error = prune_error = 0.0
    rows = block_rows or max(1, _BLOCK_ELEMENTS // d_in)
    for start in range(0, d_out, rows):
        w = weight[start:start + rows].double()  # (b, d_in)
        w_kept = w[:, keep]
        w_pruned = w.masked_fill(kept_mask, 0.0)  # W_p in place, zeros on the kept columns
        t = (w_pruned.to(gram.dtype) @ gram).double()  # (b, d_in): W_p G[p, :], in G's dtype
        a = t[:, keep]  # W_p G_pk
        block_prune = float((t * w_pruned).sum())  # tr(W_p G_pp W_pᵀ)
        r = a - damping * w_kept if anchor == "zero" else a.clone()
        r[:, dead] = 0.0  # dead features keep their weights: Δ_dead = 0
        y = torch.linalg.solve_triangular(lower, r.T, upper=False).T  # R L⁻ᵀ
        delta = torch.linalg.solve_triangular(lower.T, y.T, upper=True).T  # R M⁻¹
        block_refit = block_prune - 2 * float((delta * a).sum()) + float(y.square().sum()) \
            - damping * float(delta.square().sum())
        new[start:start + rows] = w_kept + delta  # cast to the weight's dtype here
        prune_error += block_prune
        refit_error += block_refit
    used = refit_error <= prune_error
    return RefitResult(new if used else weight[:, keep].clone(), max(refit_error, 0.0), prune_error, used)
