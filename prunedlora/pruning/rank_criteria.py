"""Rank-component saliency, OBS recovery and rank allocation, on plain tensors (docs/methods.md §3.2, §3.6, §8).

One adapted linear with active component set S, ``r' = |S|``. Component j is the pair (column ``b_j`` of
B, row ``a_jᵀ`` of A). Every criterion takes the active slices

    B (d_out, r'), A (r', d_in), G_B = ∂L/∂B (d_out, r'), G_A = ∂L/∂A (r', d_in)

plus keyword statistics, and returns a saliency ``(r',)``; the lowest is pruned first. Criteria ignore
the keywords they do not use, so a caller can pass the same ``**stats`` to all of them. Each criterion is a record
of ``prunedlora.pruning.criteria.RANK_CRITERIA`` naming its function here (and its recovery update, if any).

``obs`` (default) is OBS on the adapter's own output (docs/methods.md, Decisions item 0, the erratum): the
column OBS of OBC/SparseGPT applied to the rank dimension. The adapter computes ``y = s B z`` with
``z = m ⊙ (A x)``; with ``H = E[z zᵀ]`` over the tokens since the last event (relatively damped,
``H + λ·mean(diag H)·I``), removing j and re-fitting B to keep ``E‖s(B'z − Bz)‖²`` minimal costs
``s² ‖b_j‖² / [H⁻¹]_jj``, and the re-fit is ``B ← B − (B e_j / [H⁻¹]_jj)(H⁻¹ e_j)ᵀ`` on B alone (A is
fixed, its row j only masked).

``obs_grad`` is the paper's variant (docs/methods.md §3.2, Decisions item 1), kept for reproduction: the
second-order saliency with gradient-Gram "Hessians" ``H_B = G_BᵀG_B`` and ``H_A = G_A G_Aᵀ`` damped by an
absolute ε. The erratum measured two flaws: from one step's mean gradient the Gram is of order ‖g‖², not
curvature, so ``S_j`` is a constant plus a signed first-order term (rank correlation with the true removal
cost 0.04-0.26 on a toy regression, magnitude 0.81-0.95), and its recovery built for each factor replaces
the whole term ``s b_j a_jᵀ``, so correcting both factors adds it back about twice. Its recovery therefore
corrects one factor by default (``factors="b"``); ``factors="both"`` is the paper's two-sided update.

All inverses are float64 through Cholesky (LU ``inv`` if Cholesky fails), never ``pinv``.
Nothing here knows about modules, masks or optimizers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prunedlora.pruning.criteria import RECOVERY_FACTORS


# ------------------------------------------------------------------------------------------ Hessians
def damped_inverse(gram: Tensor, damping: float) -> Tensor:
    """``(gram + εI)⁻¹`` in float64; ``gram`` is (..., r', r') and positive semi-definite.

    ``gram + εI`` is positive definite, so Cholesky succeeds unless rounding breaks it; then LU ``inv``
    is used. Batched over leading dimensions.
    """
    h = gram.double()
    h = h + damping * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info == 0).all()):  # host sync, once per pruning event
        return torch.cholesky_inverse(chol)
    return torch.linalg.inv(h)


def gram_inverses(G_B: Tensor, G_A: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``Hb⁻ = (G_BᵀG_B + εI)⁻¹`` and ``Ha⁻ = (G_A G_Aᵀ + εI)⁻¹``, both (r', r') float64 (§3.2)."""
    gb, ga = G_B.double(), G_A.double()
    return damped_inverse(gb.mT @ gb, damping), damped_inverse(ga @ ga.mT, damping)


# ------------------------------------------------------------------------------------------ criteria
def output_hessian_inverse(gram: Tensor, rel_damping: float) -> Tensor:
    """``(H + λ·mean(diag H)·I)⁻¹`` in float64 for the bottleneck Gram ``H = E[z zᵀ]`` (r', r').

    The damping is relative (SparseGPT's percdamp), so the ranking does not depend on the activations'
    scale. An all-zero H (no signal at all) falls back to ``λ·I``.
    """
    h = gram.double()
    mean_diag = float(h.diagonal().mean()) if h.numel() else 0.0
    return damped_inverse(h, rel_damping * (mean_diag if mean_diag > 0 else 1.0))


def output_obs_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, *, gram: Tensor | None = None,
                        rel_damping: float = 0.01, **_: object) -> Tensor:
    """Output-OBS (Decisions item 0): ``S_j = ‖b_j‖² / [H⁻¹]_jj`` with ``H`` the damped bottleneck Gram.

    ``S_j`` is the least output error ``E‖B'z − Bz‖²`` of any B' with column j zero (the error after
    ``output_obs_prune``'s re-fit), per unit of ``s²``. ``s = alpha / r0`` is the same for every module
    of a run, so these values are on one scale across modules: ``allocation=global`` compares them
    directly (its record is ``absolute``).

    Args:
        gram: (r', r') ``E[z zᵀ]`` over the active components, tokens since the last event.
        rel_damping: λ of ``H + λ·mean(diag H)·I``.

    Returns:
        (r',) float64.
    """
    if gram is None:
        raise ValueError("the obs criterion needs gram= (bottleneck statistics E[z z^T]); none were collected")
    h_inv = output_hessian_inverse(gram, rel_damping)
    return B.double().square().sum(0) / h_inv.diagonal()


def output_obs_prune(B: Tensor, h_inv: Tensor, order: list[int]) -> Tensor:
    """Remove the components ``order`` one at a time with the output-OBS re-fit of B (Decisions item 0).

    For each j: ``B ← B − (B e_j / [H⁻¹]_jj)(H⁻¹ e_j)ᵀ`` (column j becomes exactly zero), then ``H⁻¹``
    is downdated to the shrunken set. The sequence is exact, so the result is the least-squares B' with
    all the columns in ``order`` zero, whatever their order. A is not touched: its rows are only masked.

    Args:
        B: (d_out, r') active columns. h_inv: (r', r') ``output_hessian_inverse`` of the same set.

    Returns:
        B' (d_out, r') float64.
    """
    b = B.double().clone()
    for j in order:
        b = b - torch.outer(b[:, j] / h_inv[j, j], h_inv[:, j])
        b[:, j] = 0.0  # zero up to rounding already; make it exact
        h_inv = _downdate(h_inv, j)
    return b


def obs_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, *, damping: float = 1e-6, **_: object) -> Tensor:
    """The paper's saliency (``criterion=obs_grad``, docs/methods.md §3.2), over the rows of B and columns of A.

    ``S_j = ½ Σ_i (B_ij − [G_B Hb⁻]_ij)² / (Hb⁻)_jj + ½ Σ_c (A_jc − [Ha⁻ G_A]_jc)² / (Ha⁻)_jj``: the
    j-dependent part of the minimum of ``gᵀδ + ½δᵀHδ`` subject to ``δ_j = −w_j`` for each row vector w.

    Returns:
        (r',) float64.
    """
    hb_inv, ha_inv = gram_inverses(G_B, G_A, damping)
    b_res = B.double() - G_B.double() @ hb_inv  # (d_out, r'): B_ij − (Hb⁻ g_i)_j, Hb⁻ symmetric
    a_res = A.double() - ha_inv @ G_A.double()  # (r', d_in): A_jc − (Ha⁻ g_c)_j
    return 0.5 * b_res.square().sum(0) / hb_inv.diagonal() + 0.5 * a_res.square().sum(1) / ha_inv.diagonal()


def magnitude_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, **_: object) -> Tensor:
    """``‖b_j‖·‖a_j‖``: the Frobenius norm of the rank-one term ``b_j a_jᵀ`` (scaling aside)."""
    return B.norm(dim=0) * A.norm(dim=1)


def taylor_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, **_: object) -> Tensor:
    """First-order Taylor (LLM-Pruner style, §3.6): ``Σ |w ⊙ g|`` over ``b_j`` and ``a_j``."""
    return (B * G_B).abs().sum(0) + (A * G_A).abs().sum(1)


def activation_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, *, act_rms: Tensor | None = None,
                        **_: object) -> Tensor:
    """Wanda-style (§3.6): token-averaged size of the bottleneck ``(A x)_j`` times ``‖b_j‖``.

    Args:
        act_rms: (r',) root-mean-square of ``(A x)_j`` over the tokens seen since the last event, i.e.
            Wanda's per-feature ``‖X_j‖₂`` divided by √tokens (the same ranking within a module, and
            independent of how many tokens were seen).
    """
    if act_rms is None:
        raise ValueError("the activation criterion needs act_rms= (bottleneck statistics); none were collected")
    return act_rms.to(B.dtype) * B.norm(dim=0)


# ------------------------------------------------------------------------------------------ recovery
def _compensate(w: Tensor, g: Tensor, h_inv: Tensor, j: int, newton_scale: float) -> Tensor:
    """Recovery of §3.2 for a stack of row vectors over the components; entry j ends exactly at zero.

    ``Δw = −ν H⁻g − λ H⁻e_j`` with ``λ = (w_j − ν(H⁻g)_j) / (H⁻)_jj``, per row.

    Args:
        w: (n, r') weights, one vector per row of B (or column of A).
        g: (n, r') their gradients.
        h_inv: (r', r') damped inverse Hessian; rows/columns of already-pruned components are zero.
    """
    newton = g @ h_inv if newton_scale else torch.zeros_like(w)  # (n, r'): row i is (H⁻ g_i)ᵀ
    lam = (w[:, j] - newton_scale * newton[:, j]) / h_inv[j, j]  # (n,)
    out = w - newton_scale * newton - lam[:, None] * h_inv[j][None, :]
    out[:, j] = 0.0  # zero up to rounding already; make it exact
    return out


def _downdate(h_inv: Tensor, j: int) -> Tensor:
    """Inverse Hessian of the active set without j: ``H⁻ − H⁻e_j e_jᵀH⁻ / (H⁻)_jj`` (§3.2).

    Exact for the damped Gram (Schur complement); row and column j become zero, so the full-size
    matrix acts as the inverse on the shrunken set.
    """
    col = h_inv[:, j]  # (r',)
    out = h_inv - torch.outer(col, col) / h_inv[j, j]
    out[j, :] = 0.0
    out[:, j] = 0.0
    return out


def obs_prune(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, order: list[int], newton_scale: float,
              damping: float, factors: str = "b") -> tuple[Tensor, Tensor]:
    """The paper's pruning (``criterion=obs_grad``): prune ``order`` one after another with §3.2's recovery.

    Before the k-th component (k = 0, 1, ...) the inverse Hessians are downdated to the shrunken set and
    the gradient is ``(1 − ν)^k G``: each earlier update already spent a fraction ν of it (with ν = 0
    reusing G is exact).

    Args:
        factors: which factor the recovery moves: ``"b"`` (default) or ``"a"``; the other factor's
            pruned entries are only zeroed. ``"both"`` is the paper's two-sided update and **double
            counts**: zeroing B's column j or A's row j each already removes the term ``s b_j a_jᵀ``,
            and each side's compensation is built to replace that whole term, so applying both adds it
            back about twice plus a cross term (toy regression, one event: loss +0.9 to +6.9 against
            +0.55 to +0.87 for plain zeroing; docs/methods.md Decisions item 0). Use it only to reproduce
            the paper.

    Returns:
        (B', A') in float64, shapes (d_out, r') and (r', d_in), with the columns / rows in ``order``
        exactly zero and the surviving ones of the chosen factor(s) compensated.
    """
    if factors not in RECOVERY_FACTORS:
        raise ValueError(f"factors={factors!r} is not one of {', '.join(RECOVERY_FACTORS)}")
    hb_inv, ha_inv = gram_inverses(G_B, G_A, damping)
    b, a_t = B.double().clone(), A.double().mT.clone()  # (d_out, r'), (d_in, r'): rows are the vectors
    gb, ga_t = G_B.double(), G_A.double().mT
    for k, j in enumerate(order):
        spent = (1.0 - newton_scale) ** k
        if factors in ("b", "both"):
            b = _compensate(b, spent * gb, hb_inv, j, newton_scale)
        if factors in ("a", "both"):
            a_t = _compensate(a_t, spent * ga_t, ha_inv, j, newton_scale)
        hb_inv, ha_inv = _downdate(hb_inv, j), _downdate(ha_inv, j)
    b[:, order], a_t[:, order] = 0.0, 0.0  # the uncompensated factor's entries: plain zeroing
    return b, a_t.mT


def obs_prune_one(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, j: int, newton_scale: float,
                  damping: float, factors: str = "b") -> tuple[Tensor, Tensor]:
    """Prune component j with the paper's recovery update (§3.2); see ``obs_prune``."""
    return obs_prune(B, A, G_B, G_A, [j], newton_scale, damping, factors)


def output_obs_recovery(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, order: list[int], *, gram: Tensor,
                        rel_damping: float, **_: object) -> tuple[Tensor, None]:
    """``obs``'s recovery: B re-fit on the output (``output_obs_prune``); A is left to its mask. Returns (B', None)."""
    return output_obs_prune(B, output_hessian_inverse(gram, rel_damping), order), None


def obs_grad_recovery(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, order: list[int], *, newton_scale: float,
                      damping: float, recovery_factor: str, **_: object) -> tuple[Tensor, Tensor]:
    """``obs_grad``'s recovery: the paper's update of ``recovery_factor`` (``obs_prune``). Returns (B', A')."""
    return obs_prune(B, A, G_B, G_A, order, newton_scale, damping, recovery_factor)


# ---------------------------------------------------------------------------------------- allocation
def lowest(saliency: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest saliencies, lowest first (ties: lower index first)."""
    return torch.sort(saliency, stable=True).indices[:count].tolist()


def relative_saliency(saliency: Tensor) -> Tensor:
    """A module's saliencies divided by their mean: ``allocation=global``'s normalisation, except for ``obs``.

    Output-OBS saliencies are output errors, on one scale everywhere, and are compared raw. The others'
    raw saliencies are not on one scale across modules. Magnitude and activation scores carry each
    module's weight and input scale. The OBS score with gradient-Gram Hessians is a near-constant offset
    plus a small j-dependent part: each of its B and A terms tends to ½ when ``‖G‖² ≫ ε`` (``G H⁻`` is then
    ``G⁺ᵀ``, whose squared column norms equal ``(H⁻)_jj``) and to less when ``‖G‖²`` is near ε (at B = 0,
    ``G_A ≡ 0``), while the j-dependent part shrinks with the module's ``‖G‖·‖W‖``. Raw values would
    compare those offsets, not pruning costs. Dividing by the module mean makes every module present an
    average of 1, so the global budget removes the components that are weakest *relative to their own
    module*: a module whose importance is concentrated in a few directions loses many ranks, one whose
    components matter evenly keeps them. The mean (not the sum or the L2 norm) keeps the scores
    independent of the module's active rank: after sum-normalisation scores scale like 1/r', so wide
    modules would look cheap just for being wide.
    """
    scale = saliency.mean().abs()
    return saliency / scale if scale > 0 else torch.zeros_like(saliency)


def select_global(saliencies: dict[str, Tensor], capacity: dict[str, int], budget: int,
                  relative: bool = True) -> dict[str, list[int]]:
    """Lowest (relative) saliency anywhere goes first; module m gives up at most ``capacity[m]`` components.

    Equivalent to popping the globally lowest candidate until ``budget`` are taken, skipping modules at
    their floor: within a module the order is its own ascending order, so each module loses a prefix.

    Args:
        saliencies: module name -> (r'_m,) raw saliencies over its active components.
        capacity: module name -> active rank minus the floor (``min_rank``).
        budget: components to prune this event, over all modules.
        relative: divide each module's saliencies by their mean first (False for ``absolute`` criteria,
            whose values are already comparable across modules).

    Returns:
        module name -> local indices to prune, lowest saliency first (modules losing nothing omitted).
    """
    names = list(saliencies)
    rel, allowed, owner, local = [], [], [], []
    for m, name in enumerate(names):
        order = torch.sort(saliencies[name], stable=True).indices  # (r'_m,)
        within = torch.empty_like(order)
        within[order] = torch.arange(order.numel(), device=order.device)  # position in the module's order
        score = saliencies[name].double()
        rel.append((relative_saliency(score) if relative else score).cpu())
        allowed.append((within < capacity[name]).cpu())
        owner.append(torch.full((order.numel(),), m))
        local.append(torch.arange(order.numel()))
    rel_all, allowed_all = torch.cat(rel), torch.cat(allowed)
    rel_all[~allowed_all] = float("inf")
    picked = torch.sort(rel_all, stable=True).indices[: min(budget, int(allowed_all.sum()))]
    owner_all, local_all = torch.cat(owner)[picked], torch.cat(local)[picked]
    chosen: dict[str, list[int]] = {}
    for m, j in zip(owner_all.tolist(), local_all.tolist(), strict=True):  # ascending relative saliency
        chosen.setdefault(names[m], []).append(j)
    return chosen
