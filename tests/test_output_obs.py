"""Output-OBS, PrunedLoRA's default criterion (docs/methods.md Decisions item 0): brute force, closed form, a toy
regression.

The toy is the erratum's: a 48x48 linear regression ``y = W* x``, a frozen ``W0`` plus an adapter ``s B A``
(rank 16, s = 2) trained with Adam, then one event removes 4 of the 16 components.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from prunedlora.pruning.criteria import RANK_CRITERIA
from prunedlora.pruning.rank_criteria import (
    lowest,
    output_hessian_inverse,
    output_obs_prune,
    output_obs_saliency,
    select_global,
)


def problem(seed: int, d_out: int = 9, r: int = 6, tokens: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """B (d_out, r) and bottleneck activations Z (tokens, r) with correlated components, float64."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(r, r, generator=gen, dtype=torch.float64)
    Z = torch.randn(tokens, r, generator=gen, dtype=torch.float64) @ mix
    return torch.randn(d_out, r, generator=gen, dtype=torch.float64), Z


def output_error(B: torch.Tensor, B_new: torch.Tensor, Z: torch.Tensor) -> float:
    """``E‖B'z − Bz‖²`` over the rows of Z."""
    return float(((Z @ (B_new - B).T) ** 2).sum(1).mean())


def best_refit(B: torch.Tensor, Z: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """Brute force: least squares of Bz on the surviving components, by lstsq on the samples themselves."""
    keep = [j for j in range(B.shape[1]) if j not in removed]
    sol = torch.linalg.lstsq(Z[:, keep], Z @ B.T).solution  # (r_keep, d_out)
    out = torch.zeros_like(B)
    out[:, keep] = sol.T
    return out


TINY = 1e-12  # relative damping small enough that the damped H is the sample Gram to ~1e-12


@pytest.mark.parametrize("seed", range(4))
def test_k1_choice_matches_the_best_single_removal_by_brute_force(seed: int) -> None:
    B, Z = problem(seed)
    gram = Z.T @ Z / Z.shape[0]
    saliency = output_obs_saliency(B, None, None, None, gram=gram, rel_damping=TINY)
    j = lowest(saliency, 1)[0]
    B_new = output_obs_prune(B, output_hessian_inverse(gram, TINY), [j])
    errors = [output_error(B, best_refit(B, Z, [i]), Z) for i in range(B.shape[1])]
    assert output_error(B, B_new, Z) == pytest.approx(min(errors), abs=1e-9)
    assert torch.all(B_new[:, j] == 0)
    # the saliency IS the error after the re-fit (closed form), for every component
    for i in range(B.shape[1]):
        refit = output_obs_prune(B, output_hessian_inverse(gram, TINY), [i])
        assert output_error(B, refit, Z) == pytest.approx(float(saliency[i]), rel=1e-8)
        torch.testing.assert_close(refit, best_refit(B, Z, [i]), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("lam", [TINY, 0.01, 0.3])
def test_sequential_removal_is_the_closed_form_least_squares_fit_in_any_order(lam: float) -> None:
    """k = 3 one at a time with the downdated inverse == the closed form on the damped H, for every order."""
    B, Z = problem(7)
    gram = Z.T @ Z / Z.shape[0]
    H = gram + lam * gram.diagonal().mean() * torch.eye(B.shape[1], dtype=torch.float64)
    removed, keep = [4, 0, 2], [1, 3, 5]
    # closed form: B'_R = B_R + B_S H_SR H_RR⁻¹, error tr(B_S (H_SS − H_SR H_RR⁻¹ H_RS) B_Sᵀ)
    B_S, B_R = B[:, removed], B[:, keep]
    H_RR, H_SR, H_SS = H[keep][:, keep], H[removed][:, keep], H[removed][:, removed]
    closed = torch.zeros_like(B)
    closed[:, keep] = B_R + B_S @ H_SR @ torch.linalg.inv(H_RR)
    schur = H_SS - H_SR @ torch.linalg.inv(H_RR) @ H_SR.T
    for order in itertools.permutations(removed):
        B_new = output_obs_prune(B, output_hessian_inverse(gram, lam), list(order))
        torch.testing.assert_close(B_new, closed, rtol=1e-8, atol=1e-10)
        assert torch.all(B_new[:, removed] == 0)
        err = float(torch.trace((B_new - B) @ H @ (B_new - B).T))  # E‖ΔB z‖² under the damped H
        assert err == pytest.approx(float(torch.trace(B_S @ schur @ B_S.T)), rel=1e-8)


def test_relative_damping_makes_the_ranking_scale_free() -> None:
    B, Z = problem(3)
    gram = Z.T @ Z / Z.shape[0]
    s1 = output_obs_saliency(B, None, None, None, gram=gram, rel_damping=0.01)
    s2 = output_obs_saliency(B, None, None, None, gram=1e-6 * gram, rel_damping=0.01)
    torch.testing.assert_close(s2, 1e-6 * s1)  # same order, values in the new output units
    with pytest.raises(ValueError, match="gram="):
        output_obs_saliency(B, None, None, None)


def test_global_budget_compares_output_errors_raw() -> None:
    """A module whose components all cost little loses them all; the relative normalisation would not do that."""
    sal = {"quiet": torch.tensor([1e-4, 2e-4, 3e-4]), "loud": torch.tensor([1.0, 2.0, 3.0])}
    assert select_global(sal, {"quiet": 3, "loud": 3}, budget=3, relative=False) == {"quiet": [0, 1, 2]}
    assert select_global(sal, {"quiet": 3, "loud": 3}, budget=3) != {"quiet": [0, 1, 2]}


# ================================================================================ the toy regression
D, R0, S = 48, 16, 2.0


def toy(seed: int) -> dict[str, torch.Tensor]:
    """Train ``s B A`` (rank 16) on a 48x48 regression with Adam; return the weights and data."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, D, dtype=torch.float64)  # anisotropic inputs: activations matter
    W0 = torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
    delta = (torch.randn(D, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, D, generator=gen,
                                                                                 dtype=torch.float64)) / D**0.5
    W_star = W0 + delta + 0.05 * torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, D, generator=gen, dtype=torch.float64) * scales
        return x, x @ W_star.T

    A = torch.nn.Parameter(torch.randn(R0, D, generator=gen, dtype=torch.float64) / D**0.5)
    B = torch.nn.Parameter(torch.zeros(D, R0, dtype=torch.float64))
    opt = torch.optim.Adam([A, B], lr=1e-2)
    recent = []
    for step in range(300):
        x, y = batch(64)
        loss = ((x @ W0.T + S * (x @ A.T) @ B.T - y) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 290:  # the tokens "since the last event"
            recent.append(x)
    x_eval, y_eval = batch(8192)
    return {"A": A.detach(), "B": B.detach(), "W0": W0, "x_recent": torch.cat(recent), "x": x_eval, "y": y_eval}


def loss(t: dict[str, torch.Tensor], B: torch.Tensor, A: torch.Tensor) -> float:
    return float(((t["x"] @ t["W0"].T + S * (t["x"] @ A.T) @ B.T - t["y"]) ** 2).sum(1).mean())


def obs_removal(t: dict[str, torch.Tensor], order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-OBS: H from the recent tokens, B re-fit, A's rows masked."""
    z = t["x_recent"] @ t["A"].T
    h_inv = output_hessian_inverse(z.T @ z / z.shape[0], 0.01)
    A = t["A"].clone()
    A[order] = 0.0
    return output_obs_prune(t["B"], h_inv, order), A


def zeroing(t: dict[str, torch.Tensor], order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    B, A = t["B"].clone(), t["A"].clone()
    B[:, order], A[order] = 0.0, 0.0
    return B, A


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def toy_figures(seed: int) -> dict[str, float]:
    """One event of 4: loss increases of output-OBS and of magnitude + plain zeroing; Spearman of each criterion."""
    t = toy(seed)
    base = loss(t, t["B"], t["A"])
    z = t["x_recent"] @ t["A"].T
    stats = {"gram": z.T @ z / z.shape[0], "rel_damping": 0.01}
    s_obs = RANK_CRITERIA.function("obs")(t["B"], t["A"], None, None, **stats)
    s_mag = RANK_CRITERIA.function("magnitude")(t["B"], t["A"], None, None)
    k = 4  # one event: 16 -> 12
    out = {"obs_event": loss(t, *obs_removal(t, lowest(s_obs, k))) - base,
           "zero_event": loss(t, *zeroing(t, lowest(s_mag, k))) - base,
           "zero_same_set": loss(t, *zeroing(t, lowest(s_obs, k))) - base}
    true_obs = torch.tensor([loss(t, *obs_removal(t, [j])) - base for j in range(R0)])
    true_zero = torch.tensor([loss(t, *zeroing(t, [j])) - base for j in range(R0)])
    out["spearman_obs"] = spearman(s_obs, true_obs)
    out["spearman_magnitude"] = spearman(s_mag, true_zero)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_toy_regression_output_obs_beats_plain_zeroing_and_ranks_the_true_cost(seed: int) -> None:
    f = toy_figures(seed)
    assert f["obs_event"] <= f["zero_event"]  # magnitude's choice, plainly zeroed
    assert f["obs_event"] <= f["zero_same_set"]  # the same components without the re-fit
    assert f["spearman_obs"] >= 0.8
