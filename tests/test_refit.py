"""The structured least-squares re-fit (``pruning/refit.py``): closed form, errors, guarantees, refusals."""

from __future__ import annotations

import pytest
import torch

from prunedlora.pruning import refit
from prunedlora.pruning.refit import factor_dtype, kept_columns, refit_columns


def problem(seed: int, d_out: int = 6, d_in: int = 16, tokens: int = 200, correlated: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 weight and inputs ``X`` ``(d_in, tokens)``; correlated ones mix the features strongly."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(d_in, tokens, generator=gen, dtype=torch.float64)
    if correlated:  # a few latent factors plus noise, feature scales log-normal (as LLM activations)
        latent = torch.randn(3, tokens, generator=gen, dtype=torch.float64)
        x = torch.randn(d_in, 3, generator=gen, dtype=torch.float64) @ latent + 0.1 * x
        x = x * torch.exp(torch.randn(d_in, 1, generator=gen, dtype=torch.float64))
    return weight, x


def output_error(weight: torch.Tensor, x: torch.Tensor, new: torch.Tensor, keep: torch.Tensor) -> float:
    return float((weight @ x - new.double() @ x[keep]).square().sum())


KEEP = torch.tensor([0, 2, 3, 7, 9, 10, 15])


def test_undamped_refit_is_the_least_squares_solution() -> None:
    weight, x = problem(0)
    result = refit_columns(weight, x @ x.T, KEEP, rel_damping=0.0)
    expected = torch.linalg.lstsq(x[KEEP].T, (weight @ x).T).solution.T
    torch.testing.assert_close(result.weight, expected, rtol=1e-10, atol=1e-10)
    assert result.used_refit


@pytest.mark.parametrize("anchor", ["zero", "kept"])
def test_damped_refit_is_the_augmented_least_squares_solution(anchor: str) -> None:
    weight, x = problem(1, correlated=True)
    gram = x @ x.T
    lam = 0.05 * float(gram.diagonal()[KEEP].mean())
    result = refit_columns(weight, gram, KEEP, rel_damping=0.05, anchor=anchor)
    # min ‖W X - W' X_k‖² + λ‖W' - A‖²  ==  least squares of [X_kᵀ; √λ I] W'ᵀ ≈ [(W X)ᵀ; √λ Aᵀ]
    anchor_weight = torch.zeros(6, KEEP.numel(), dtype=torch.float64) if anchor == "zero" else weight[:, KEEP]
    lhs = torch.cat([x[KEEP].T, lam ** 0.5 * torch.eye(KEEP.numel(), dtype=torch.float64)])
    rhs = torch.cat([(weight @ x).T, lam ** 0.5 * anchor_weight.T])
    expected = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(result.weight, expected, rtol=1e-9, atol=1e-9)


def test_identity_gram_reduces_to_dropping_the_columns() -> None:
    weight, _ = problem(2)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.equal(refit_columns(weight, eye, KEEP, rel_damping=0.0).weight, weight[:, KEEP])
    # Anchored at the kept weights, any damping gives them back too (up to rounding of (1 + λ) / (1 + λ)).
    torch.testing.assert_close(refit_columns(weight, eye, KEEP, rel_damping=0.3, anchor="kept").weight,
                               weight[:, KEEP], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("correlated", [False, True])
def test_reported_errors_are_the_output_errors_and_never_above_prune_only(correlated: bool) -> None:
    ratios = []
    for seed in range(40):
        weight, x = problem(seed, correlated=correlated)
        keep = torch.sort(torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:8]).values
        for anchor in ("zero", "kept"):
            result = refit_columns(weight, x @ x.T, keep, anchor=anchor)
            assert result.prune_error == pytest.approx(output_error(weight, x, weight[:, keep], keep), rel=1e-9)
            if result.used_refit:
                assert result.refit_error == pytest.approx(output_error(weight, x, result.weight, keep), rel=1e-8)
            assert output_error(weight, x, result.weight, keep) <= result.prune_error * (1 + 1e-12)
            ratios.append(result.error_ratio)
    # Independent inputs leave little to recover (sampling correlation only); correlated ones let the kept
    # columns stand in for the removed ones: the error drops by more than an order of magnitude.
    assert max(ratios) <= 1.0 and (sorted(ratios)[len(ratios) // 2] < (0.05 if correlated else 1.0))


def test_a_refit_worse_than_prune_only_is_not_used() -> None:
    weight, x = problem(3)
    # Anchored at zero with a huge damping the re-fit shrinks every kept weight towards 0: worse than dropping.
    result = refit_columns(weight, x @ x.T, KEEP, rel_damping=100.0, anchor="zero")
    assert not result.used_refit and result.refit_error > result.prune_error
    assert torch.equal(result.weight, weight[:, KEEP]) and result.error_ratio == 1.0


def test_float32_gram_and_bf16_weight_write_back_in_the_weights_dtype() -> None:
    weight, x = problem(4, d_out=40, d_in=64, tokens=500, correlated=True)
    keep = torch.arange(0, 64, 2)
    exact = refit_columns(weight, x @ x.T, keep)
    low = refit_columns(weight.to(torch.bfloat16), (x @ x.T).float(), keep, block_rows=7)
    assert low.weight.dtype == torch.bfloat16 and low.weight.shape == (40, 32)
    w_bf16 = weight.to(torch.bfloat16).double()  # the re-fit of the weight it was given
    reference = refit_columns(w_bf16, x @ x.T, keep)
    torch.testing.assert_close(low.weight.double(), reference.weight.to(torch.bfloat16).double(), rtol=2e-2,
                               atol=2e-2)
    assert low.refit_error == pytest.approx(reference.refit_error, rel=1e-4)
    assert exact.refit_error < 0.5 * exact.prune_error


def test_blocks_of_rows_change_nothing() -> None:
    weight, x = problem(5, d_out=13)
    full = refit_columns(weight, x @ x.T, KEEP)
    blocked = refit_columns(weight, x @ x.T, KEEP, block_rows=4)
    torch.testing.assert_close(blocked.weight, full.weight, rtol=1e-12, atol=1e-12)
    assert blocked.refit_error == pytest.approx(full.refit_error, rel=1e-12)


def test_a_kept_feature_that_never_fired_keeps_its_weights() -> None:
    weight, x = problem(6)
    x[3] = 0.0  # feature 3 (kept) is silent on the calibration data
    for anchor in ("zero", "kept"):
        for damping in (0.0, 0.01):
            result = refit_columns(weight, x @ x.T, KEEP, rel_damping=damping, anchor=anchor)
            assert torch.equal(result.weight[:, 2], weight[:, 3])  # KEEP[2] == 3
            assert result.used_refit


def test_heads_map_to_their_columns() -> None:
    assert kept_columns(torch.tensor([1.0, 0.0, 1.0]), 4).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert kept_columns(torch.tensor([0.0, 1.0, 1.0, 0.0]), 1).tolist() == [1, 2]
    weight, x = problem(7, d_in=12)
    keep = kept_columns(torch.tensor([1.0, 0.0, 1.0]), 4)  # o_proj of 3 heads of dim 4, head 1 removed
    result = refit_columns(weight, x @ x.T, keep, rel_damping=0.0)
    torch.testing.assert_close(result.weight, torch.linalg.lstsq(x[keep].T, (weight @ x).T).solution.T)


@pytest.mark.parametrize("gram", [None, torch.empty(0), torch.zeros(16, 16)], ids=["none", "empty", "zero_tokens"])
def test_a_refit_without_calibration_data_is_refused(gram: torch.Tensor | None) -> None:
    weight, _ = problem(8)
    with pytest.raises(ValueError, match="re-fit: .*calibration.*gram=True"):
        refit_columns(weight, gram, KEEP)


def test_bad_inputs_are_refused_with_the_fix() -> None:
    weight, x = problem(9, tokens=4)  # 4 tokens cannot determine 7 kept columns without damping
    gram = x @ x.T
    with pytest.raises(ValueError, match="not positive definite.*positive method.refit_damping"):
        refit_columns(weight, gram, KEEP, rel_damping=0.0)
    assert refit_columns(weight, gram, KEEP).used_refit  # the default damping makes it solvable
    with pytest.raises(ValueError, match="input columns"):
        refit_columns(weight, gram[:8, :8], KEEP)
    with pytest.raises(ValueError, match="NaN or inf"):
        refit_columns(weight, gram.masked_fill(torch.eye(16, dtype=torch.bool), float("nan")), KEEP)
    with pytest.raises(ValueError, match="ascending"):
        refit_columns(weight, gram, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="method.refit_anchor"):
        refit_columns(weight, gram, KEEP, anchor="weights")


def test_float32_factor_where_safe_float64_beyond() -> None:
    gram32 = torch.eye(16)
    assert factor_dtype(gram32, 8, 0.01) == torch.float32  # condition <= 1 + 800
    assert factor_dtype(gram32, 8, 0.0) == torch.float64  # undamped: unbounded
    assert factor_dtype(gram32, 20_000, 0.01) == torch.float64  # 1 + 2e6 > FLOAT32_CONDITION
    assert factor_dtype(gram32.double(), 8, 0.01) == torch.float64  # a float64 Gram keeps float64


@pytest.mark.parametrize("correlated", [False, True])
def test_a_float32_factor_in_the_consumed_gram_gives_the_float64_refit(correlated: bool) -> None:
    """consume=True factorises G_kk in float32 inside G's own storage: the same weights as float64 to float32's
    precision, and reported errors that are the output errors of the weights it returns."""
    weight, x = problem(10, d_out=24, d_in=48, tokens=400, correlated=correlated)
    keep = torch.arange(1, 48, 3)
    reference = refit_columns(weight, x @ x.T, keep)  # float64 Gram: float64 factor
    gram = (x @ x.T).float()
    storage = gram.data_ptr()
    low = refit_columns(weight.float(), gram, keep, consume=True, block_rows=5)
    assert gram.data_ptr() == storage and not torch.equal(gram, (x @ x.T).float())  # its storage held the factor
    torch.testing.assert_close(low.weight.double(), reference.weight, rtol=1e-3, atol=1e-4)
    assert low.refit_error == pytest.approx(output_error(weight.float().double(), x, low.weight, keep), rel=1e-3)
    assert low.prune_error == pytest.approx(reference.prune_error, rel=1e-5)


@pytest.mark.parametrize("rows_per_block", [1, 2, 5])
def test_the_kept_block_is_gathered_in_place_without_overwriting_what_is_still_to_be_read(
        rows_per_block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refit, "_BLOCK_ELEMENTS", 10 * rows_per_block)  # blocks of rows_per_block rows of 10
    gram = torch.arange(100.0).view(10, 10)
    keep = torch.tensor([0, 1, 4, 8, 9])
    expected = gram[keep][:, keep].clone()
    gathered = refit._gather_kept(gram, keep, torch.float32, in_place=True)
    assert gathered.data_ptr() == gram.data_ptr() and torch.equal(gathered, expected)
