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
``M = G_kk + λ I = L Lᵀ``, which also yields both output errors from ``G`` alone: ``err_prune = tr(W_p G_pp W_pᵀ)``
and ``err_refit = err_prune - 2 tr(Δ (W_p G_pk)ᵀ) + ‖Δ L‖² - λ ‖Δ‖²``, the output error *of the Δ computed* (not
of the exact solution), so rounding in the solve can cost optimality but never the comparison. The re-fit is kept
only when its error is not above prune-only's (so "never worse than dropping the columns, on the calibration data"
holds for both anchors); both errors come back in ``RefitResult``.

Order, precision and memory. Two passes over blocks of output rows. The first forms ``W_p G`` block by block in
``G``'s dtype (``W_b`` with its kept columns zeroed, times ``G``: no copy of ``G``), keeps ``W_p G_pk`` (``d_out x
|k|``) and the prune-only error; after it ``G`` is needed only for ``G_kk``. The factor is then built: with
``consume=True`` (the caller gives ``G`` up) ``G_kk`` is gathered into the first ``|k|²`` entries of ``G``'s own
storage and factorised there in place, so the factor costs no memory at all; otherwise into a new ``|k| x |k|``
matrix. The second pass solves each block (two triangular solves) and writes ``W_k + Δ`` over its rows of
``W_p G_pk``, which becomes the result. ``G`` is accumulated in float32 by ``calibration.py`` (as SparseGPT's
reference does: the accumulated rounding, ~1e-6 of the diagonal, is four orders below the 1% damping). The factor
is float32 when that is safe and float64 otherwise (``factor_dtype``): the damped system's condition number is at
most ``1 + |k| / rel_damping`` (its largest eigenvalue is at most its trace, ``|k| · mean(diag G_kk)``, its
smallest at least λ), and float32's Cholesky keeps a small backward error up to ~1e6 (``FLOAT32_CONDITION``);
beyond, or with a float64 ``G``, float64. At LLaMA-7B's ``down_proj`` at 50% (``G`` 462 MiB): ``W_p G_pk`` 86 MiB,
the result in place of it, blocks of 8 MiB, and with ``consume=True`` no factor: measured on CPU with
``python -m scripts.bench_refit_memory``.

Features with no calibration signal: a kept feature with ``G_jj = 0`` never fired (its row and column of ``G``
are zero), so the data says nothing about its weights: they are kept unchanged (the ``anchor="zero"`` formula
would zero them, which the data cannot justify). A pruned one contributes nothing to either error. The bias,
if any, is not touched: it does not depend on the removed columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFIT_DAMPING = 0.01
"""λ relative to ``mean(diag G_kk)``: the prototype's and SparseGPT's value (``method.refit_damping``)."""
ANCHORS = ("zero", "kept")
"""``method.refit_anchor``."""
FLOAT32_CONDITION = 1e6
"""Largest bound ``1 + |k| / rel_damping`` on the damped system's condition number factorised in float32."""
_BLOCK_ELEMENTS = 1 << 21
"""Elements of one ``block x d_in`` temporary (8 MiB in float32): bounds the row blocks."""


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
           "calibration row: method.calibration_sequences >= 1 and training data to cut them from)")
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


def _gather_kept(gram: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype, in_place: bool) -> torch.Tensor:
    """``G_kk`` as a contiguous ``|k| x |k|`` matrix of ``dtype``: in the first ``|k|²`` entries of ``G``'s storage
    when ``in_place`` (``G`` is then destroyed), else in a new matrix; a block of rows at a time.

    In place is safe in ascending order: rows ``s..e`` of ``G_kk`` are read (into a block) before they are written to
    entries ``[s |k|, e |k|)``, which end before row ``keep[e] >= e`` of ``G`` starts (``|k| <= d_in``).
    """
    k = keep.numel()
    out = gram.view(-1)[: k * k].view(k, k) if in_place else torch.empty(k, k, dtype=dtype, device=gram.device)
    step = max(1, _BLOCK_ELEMENTS // max(gram.shape[0], 1))
    for start in range(0, k, step):
        block = gram.index_select(0, keep[start:start + step]).index_select(1, keep)
        out[start:start + step] = block
    return out


def _factor(gram: torch.Tensor, keep: torch.Tensor, dead: torch.Tensor, damping: float, dtype: torch.dtype,
            in_place: bool) -> torch.Tensor:
    """Lower Cholesky factor of ``G_kk + λ I`` (``dtype``), dead features' diagonal set to 1, factorised where
    ``_gather_kept`` put ``G_kk``."""
    m = _gather_kept(gram, keep, dtype, in_place)
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
            "calibration data, e.g. fewer calibration tokens than kept columns); use a positive method.refit_damping "
            f"(default {REFIT_DAMPING}) or more calibration rows (method.calibration_sequences)")
    return lower.tril_()


def factor_dtype(gram: torch.Tensor, kept: int, rel_damping: float) -> torch.dtype:
    """float32 when ``G`` is float32 and the condition bound ``1 + kept / rel_damping`` is at most
    ``FLOAT32_CONDITION``; float64 otherwise (module docstring)."""
    safe = gram.dtype == torch.float32 and rel_damping > 0 and 1 + kept / rel_damping <= FLOAT32_CONDITION
    return torch.float32 if safe else torch.float64


@torch.no_grad()
def refit_columns(weight: torch.Tensor, gram: torch.Tensor | None, keep: torch.Tensor,
                  rel_damping: float = REFIT_DAMPING, anchor: str = "zero", block_rows: int | None = None,
                  consume: bool = False) -> RefitResult:
    """Re-solve the kept input columns of ``weight`` against its calibration Gram matrix (module docstring).

    Args:
        weight: ``W`` ``(d_out, d_in)``, any float dtype (a dequantized or effective weight is fine); only read.
        gram: ``G = Σ x xᵀ`` over the calibration tokens, ``(d_in, d_in)``, float32 or float64, collected on the
            linear's input with every column still present.
        keep: ascending indices of the kept input columns (``kept_columns`` builds them from a unit mask).
        rel_damping: λ as a fraction of ``mean(diag G_kk)`` over the features that fired; >= 0.
        anchor: ``zero`` (``W G[:, k] (G_kk + λ I)⁻¹``) or ``kept`` (ridge towards ``W[:, k]``).
        block_rows: output rows per block (default: an 8 MiB float32 block).
        consume: the caller gives ``gram`` up: its storage holds the factor afterwards (no ``|k|²`` allocation),
            so it must not be read again. Ignored when the factor needs another dtype than ``gram``'s.

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
        raise ValueError(f"re-fit: rel_damping (method.refit_damping) must be >= 0, got {rel_damping}")
    if anchor not in ANCHORS:
        raise ValueError(f"re-fit: anchor (method.refit_anchor) must be one of {ANCHORS}, got {anchor!r}")
    gram = gram.to(weight.device)
    kept_mask = torch.zeros(d_in, dtype=torch.bool, device=weight.device)
    kept_mask[keep] = True
    diag = gram.diagonal()[keep]
    dead = diag <= 0  # never fired: row and column of G are zero
    damping = rel_damping * float(diag[~dead].double().mean()) if bool((~dead).any()) else 0.0
    dtype = factor_dtype(gram, keep.numel(), rel_damping)
    rows = block_rows or max(1, _BLOCK_ELEMENTS // d_in)

    # Pass 1: W_p G_pk and tr(W_p G_pp W_pᵀ), a block of rows at a time; G itself is read, never copied.
    cross = torch.empty(d_out, keep.numel(), dtype=dtype, device=weight.device)
    prune_error = 0.0
    for start in range(0, d_out, rows):
        w_pruned = weight[start:start + rows].to(gram.dtype).masked_fill(kept_mask, 0.0)  # W_p, zeros on k
        t = w_pruned @ gram  # (b, d_in): W_p G[p, :]
        prune_error += float((t * w_pruned).sum(dtype=torch.float64))
        cross[start:start + rows] = t[:, keep]
        del t, w_pruned
    lower = _factor(gram, keep, dead, damping, dtype, in_place=consume and dtype == gram.dtype)
    del gram

    # Pass 2: Δ = R M⁻¹ per block, its output error, and W_k + Δ written over the block's rows of W_p G_pk.
    refit_error = 0.0
    for start in range(0, d_out, rows):
        w_kept = weight[start:start + rows].index_select(1, keep).to(dtype)
        a = cross[start:start + rows]  # a view: overwritten below by the result
        r = a - damping * w_kept if anchor == "zero" else a.clone()
        r[:, dead] = 0.0  # dead features keep their weights: Δ_dead = 0
        y = torch.linalg.solve_triangular(lower.mT, r, upper=True, left=False)  # Y Lᵀ = R
        delta = torch.linalg.solve_triangular(lower, y, upper=False, left=False)  # Δ L = Y: Δ = R M⁻¹
        del r, y
        refit_error += _error_change(a, delta, lower, damping)
        a.copy_(w_kept + delta)
    refit_error += prune_error
    used = refit_error <= prune_error
    if not used:
        return RefitResult(weight[:, keep].clone(), max(refit_error, 0.0), prune_error, False)
    return RefitResult(cross.to(weight.dtype), max(refit_error, 0.0), prune_error, True)


def _error_change(a: torch.Tensor, delta: torch.Tensor, lower: torch.Tensor, damping: float) -> float:
    """One block's ``-2 tr(Δ aᵀ) + ‖Δ L‖² - λ ‖Δ‖²``: the change of the output error from prune-only's."""
    return (-2 * float((delta * a).sum(dtype=torch.float64)) + float((delta @ lower).square().sum(dtype=torch.float64))
            - damping * float(delta.square().sum(dtype=torch.float64)))
