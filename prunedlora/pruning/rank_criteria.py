"""Rank-component saliency, OBS recovery and rank allocation, on plain tensors (methods.md §3.2, §3.6, §8).

One adapted linear with active component set S, ``r' = |S|``. Component j is the pair (column ``b_j`` of
B, row ``a_jᵀ`` of A). Every criterion takes the active slices

    B (d_out, r'), A (r', d_in), G_B = ∂L/∂B (d_out, r'), G_A = ∂L/∂A (r', d_in)

plus keyword statistics, and returns a saliency ``(r',)``; the lowest is pruned first. Criteria ignore
the keywords they do not use, so a caller can pass the same ``**stats`` to all of them.

``obs`` (default) is the second-order saliency of methods.md §3.2 with gradient-Gram Hessians
``H_B = G_BᵀG_B`` and ``H_A = G_A G_Aᵀ`` (both (r', r')), damped by ε and inverted in float64 through
Cholesky (LU ``inv`` if Cholesky fails), never ``pinv`` (methods.md, Decisions item 1). Its recovery
update (§3.2 "Project choice") moves the surviving components so that the pruned entry is exactly zero.

Nothing here knows about modules, masks or optimizers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prunedlora.config import PRUNEDLORA_CRITERIA

Criterion = Callable[..., Tensor]


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
def obs_saliency(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, *, damping: float = 1e-6, **_: object) -> Tensor:
    """Second-order saliency of methods.md §3.2, summed over the rows of B and the columns of A.

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


CRITERIA: dict[str, Criterion] = {
    "obs": obs_saliency,
    "magnitude": magnitude_saliency,
    "taylor": taylor_saliency,
    "activation": activation_saliency,
}
assert tuple(CRITERIA) == PRUNEDLORA_CRITERIA


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
              damping: float) -> tuple[Tensor, Tensor]:
    """Prune the components ``order`` one after another with OBS recovery (§3.2, Decisions item 1).

    Before the k-th component (k = 0, 1, ...) the inverse Hessians are downdated to the shrunken set and
    the gradient is ``(1 − ν)^k G``: each earlier update already spent a fraction ν of it (with ν = 0
    reusing G is exact).

    Returns:
        (B', A') in float64, shapes (d_out, r') and (r', d_in), with the columns / rows in ``order``
        exactly zero and the surviving ones compensated.
    """
    hb_inv, ha_inv = gram_inverses(G_B, G_A, damping)
    b, a_t = B.double().clone(), A.double().mT.clone()  # (d_out, r'), (d_in, r'): rows are the vectors
    gb, ga_t = G_B.double(), G_A.double().mT
    for k, j in enumerate(order):
        spent = (1.0 - newton_scale) ** k
        b = _compensate(b, spent * gb, hb_inv, j, newton_scale)
        a_t = _compensate(a_t, spent * ga_t, ha_inv, j, newton_scale)
        hb_inv, ha_inv = _downdate(hb_inv, j), _downdate(ha_inv, j)
    return b, a_t.mT


def obs_prune_one(B: Tensor, A: Tensor, G_B: Tensor, G_A: Tensor, j: int, newton_scale: float,
                  damping: float) -> tuple[Tensor, Tensor]:
    """Prune component j with the recovery update of §3.2; see ``obs_prune``."""
    return obs_prune(B, A, G_B, G_A, [j], newton_scale, damping)


# ---------------------------------------------------------------------------------------- allocation
def lowest(saliency: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest saliencies, lowest first (ties: lower index first)."""
    return torch.sort(saliency, stable=True).indices[:count].tolist()


def relative_saliency(saliency: Tensor) -> Tensor:
    """A module's saliencies divided by their mean: the normalisation behind ``allocation=global``.

    Raw saliencies are not on one scale across modules. Magnitude and activation scores carry each
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


def select_global(saliencies: dict[str, Tensor], capacity: dict[str, int], budget: int) -> dict[str, list[int]]:
    """Lowest relative saliency anywhere goes first; module m gives up at most ``capacity[m]`` components.

    Equivalent to popping the globally lowest candidate until ``budget`` are taken, skipping modules at
    their floor: within a module the order is its own ascending order, so each module loses a prefix.

    Args:
        saliencies: module name -> (r'_m,) raw saliencies over its active components.
        capacity: module name -> active rank minus the floor (``min_rank``).
        budget: components to prune this event, over all modules.

    Returns:
        module name -> local indices to prune, lowest saliency first (modules losing nothing omitted).
    """
    names = list(saliencies)
    rel, allowed, owner, local = [], [], [], []
    for m, name in enumerate(names):
        order = torch.sort(saliencies[name], stable=True).indices  # (r'_m,)
        within = torch.empty_like(order)
        within[order] = torch.arange(order.numel(), device=order.device)  # position in the module's order
        rel.append(relative_saliency(saliencies[name].double()).cpu())
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
