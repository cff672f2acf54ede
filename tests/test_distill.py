"""The distillation loss (``train/distill.py``): value, gradient, token selection and reduction, mixing."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from prunedlora.train.distill import distill_kl, mix_losses

VOCAB = 11


def logits_and_labels(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(2, 7, VOCAB, generator=gen)).to(dtype)
    teacher = (3 * torch.randn(2, 7, VOCAB, generator=gen)).to(dtype)
    labels = torch.randint(0, VOCAB, (2, 7), generator=gen)
    labels[0, :3] = -100  # a prompt: its positions do not count
    labels[1, 5] = -100
    return student, teacher, labels


def direct_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean over counted positions of Σ_v p (log p - log q)``, written out."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature ** 2 * per_token[counted].mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_logits_give_exactly_zero_and_no_gradient(dtype: torch.dtype) -> None:
    student, _, labels = logits_and_labels(dtype=dtype)
    student.requires_grad_(True)
    loss = distill_kl(student, student.detach().clone(), labels, temperature=2.0)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.count_nonzero(student.grad) == 0 and student.grad.dtype == dtype


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_value_and_gradient_match_autograd_of_the_direct_formula(temperature: float, chunk_tokens: int) -> None:
    student, teacher, labels = logits_and_labels(seed=1)
    mine = student.clone().requires_grad_(True)
    ref = student.clone().requires_grad_(True)
    loss = distill_kl(mine, teacher, labels, temperature=temperature, chunk_tokens=chunk_tokens)
    expected = direct_kl(ref, teacher, labels, temperature)
    (3.0 * loss).backward()  # an upstream factor (α, 1 / grad_accum) reaches the gradient
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_a_chunk_read_whole_and_a_gathered_chunk_both_give_the_direct_formula() -> None:
    """Sequence 0 counts all but its last position (its chunk is read as a view, one row zeroed); sequence 1 is
    mostly prompt (its chunk gathers the counted rows); a chunk of padding only adds nothing."""
    from prunedlora.train.distill import GATHER_ABOVE

    gen = torch.Generator().manual_seed(5)
    student, teacher = (3 * torch.randn(3, 16, VOCAB, generator=gen, dtype=torch.float64) for _ in range(2))
    labels = torch.randint(0, VOCAB, (3, 16), generator=gen)
    labels[1, :11] = -100  # rows 16-25 and 31 do not count: 11 of 16, above GATHER_ABOVE
    labels[2] = -100  # padding
    assert 1 / 16 <= GATHER_ABOVE < 11 / 16
    mine, ref = (student.clone().requires_grad_(True) for _ in range(2))
    loss = distill_kl(mine, teacher, labels, chunk_tokens=16)
    expected = direct_kl(ref, teacher, labels, 1.0)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(mine.grad[2]) == 0 and torch.count_nonzero(mine.grad[1, :10]) == 0


def test_tokens_and_mean_are_the_causal_lm_losss() -> None:
    """A teacher sure of the next label turns the KL into the cross-entropy: same tokens, same reduction."""
    student, _, labels = logits_and_labels(seed=2, dtype=torch.float32)  # transformers' CE runs in float32
    teacher = torch.randn_like(student)  # positions that do not count hold anything
    nxt = labels[:, 1:]
    onehot = torch.full_like(teacher[:, :-1], float("-inf")).scatter_(-1, nxt.clamp_min(0)[..., None], 0.0)
    teacher[:, :-1] = torch.where((nxt != -100)[..., None], onehot, teacher[:, :-1])
    ce = ForCausalLMLoss(student, labels, VOCAB)
    torch.testing.assert_close(distill_kl(student, teacher, labels), ce, rtol=1e-6, atol=1e-6)
    ce_sum = ForCausalLMLoss(student, labels, VOCAB, num_items_in_batch=torch.tensor(20))
    torch.testing.assert_close(distill_kl(student, teacher, labels, num_items_in_batch=20), ce_sum, rtol=1e-6,
                               atol=1e-6)


def test_minus_infinity_logits_add_nothing_where_the_teacher_gives_no_probability() -> None:
    """A vocabulary entry both models rule out (-inf logits: a masked or padded token) adds 0, not NaN; one only the
    student rules out, where the teacher puts mass, makes the KL infinite, as it is."""
    student, teacher, labels = logits_and_labels(seed=4)
    student[..., 0] = teacher[..., 0] = float("-inf")
    teacher[..., 1] = float("-inf")  # the teacher alone: the entry adds 0 too
    mine = student.clone().requires_grad_(True)
    ref = student[..., 1:].clone().requires_grad_(True)
    loss = distill_kl(mine, teacher, labels)
    expected = direct_kl_finite(ref, teacher[..., 1:], labels)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad[..., 1:], ref.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(mine.grad[..., 0]) == 0
    student[0, 4, 2] = float("-inf")  # counted position (label of t + 1 counts), teacher mass > 0
    assert distill_kl(student, teacher, labels).item() == float("inf")


def direct_kl_finite(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``direct_kl`` at T = 1 where the teacher may put zero mass on an entry (it then adds 0)."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    log_q, log_p = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    p = log_p.exp()
    per_token = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    return per_token[counted].mean()


def test_bf16_logits_are_computed_in_float32() -> None:
    student, teacher, labels = logits_and_labels(seed=3, dtype=torch.bfloat16)
    student.requires_grad_(True)
    loss = distill_kl(student, teacher, labels)
    loss.backward()
    reference = direct_kl(student.detach().double(), teacher.double(), labels, 1.0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert student.grad.dtype == torch.bfloat16


def test_no_counted_token_gives_nan_like_the_cross_entropy() -> None:
    student, teacher, _ = logits_and_labels()
    labels = torch.full((2, 7), -100)
    student.requires_grad_(True)
    loss = distill_kl(student, teacher, labels)
    assert loss.isnan() and ForCausalLMLoss(student.detach(), labels, VOCAB).isnan()
    loss.backward()  # the step is then skipped by the loop's non-finite guard; backward itself must not fail


def test_mismatched_inputs_are_refused() -> None:
    student, teacher, labels = logits_and_labels()
    with pytest.raises(ValueError, match="same batch"):
        distill_kl(student, teacher[:, :5], labels)
    with pytest.raises(ValueError, match="labels"):
        distill_kl(student, teacher, labels[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        distill_kl(student, teacher, labels, temperature=0.0)


def test_mixing() -> None:
    ce, kl = torch.tensor(2.0), torch.tensor(float("nan"))
    assert mix_losses(ce, kl, 1.0) is ce and mix_losses(ce, None, 1.0) is ce  # α = 1: the cross-entropy only
    assert mix_losses(ce, torch.tensor(4.0), 0.0).item() == 4.0
    assert mix_losses(ce, torch.tensor(4.0), 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mix_losses(ce, kl, 1.5)
    with pytest.raises(ValueError, match="no teacher"):
        mix_losses(ce, None, 0.5)
