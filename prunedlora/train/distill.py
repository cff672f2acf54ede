"""Distillation from the unpruned model as a recovery objective: ``KL(teacher || student)`` per token.

Per predicted token, with ``p = softmax(z_teacher / T)`` and ``q = softmax(z_student / T)`` over the vocabulary:

    KL(p || q) = Σ_v p_v (log p_v - log q_v)

It is taken on exactly the tokens the causal-LM cross-entropy counts (transformers' ``ForCausalLMLoss``):
logits at position ``t`` predict ``labels[t + 1]``, and a position counts where that label is not ``-100``.
The reduction is the cross-entropy's too: the mean over the micro-batch's counted tokens (or the sum divided by
``num_items_in_batch`` when one is passed, as transformers does), so the training engine's ``loss / grad_accum``
weighs both terms alike under gradient accumulation, and ``α · CE + (1 - α) · KL`` mixes like with like.

Temperature: the loss is multiplied by ``T²`` (Hinton et al. 2015). The gradient of the soft term scales as
``1 / T²``; the factor keeps its size, and so the meaning of ``α``, independent of ``T``. At ``T = 1`` (the
prototype's setting) it changes nothing.

Precision and memory. Logits may be bf16; every softmax, log and sum runs in float32 (float64 logits stay
float64). The ``(tokens, vocab)`` float32 temporaries exist for ``chunk_tokens`` tokens at a time, three of them
(the two log-softmaxes and ``p``; every later op works in place): at a 49k-128k vocabulary each is 0.2-0.5 GB per
1k tokens. Chunks are contiguous runs of positions: one whose positions mostly count is read as a view and its few
others (a sequence's last position) computed and zeroed; one with more than ``GATHER_ABOVE`` not counting (padding,
a prompt) gathers its counted rows. The gradient with respect to the student logits,
``T (q - p) / N``, is computed chunk by chunk in the forward and stored in the logits' dtype (what autograd would
hand back for them anyway), so backward costs no recomputation and autograd keeps no float32 copy. The teacher gets
no gradient.

Speed: on SmolLM2's 49k vocabulary, 512 tokens, one CPU thread, the value and gradient take about 0.5 s, against
1.1 s for the unfused formula (gathered chunks, a temporary per op): about a third of a teacher forward.
"""

from __future__ import annotations

from bisect import bisect_left

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024
"""Tokens per float32 softmax chunk (vocabulary 128k: 0.5 GB per float32 temporary)."""
GATHER_ABOVE = 0.25
"""A chunk with more than this fraction of positions that do not count (padding, a prompt) gathers its counted rows;
one with fewer is computed whole as a view and its other rows zeroed. Around a quarter the two cost about the same:
two copies of the counted rows against the whole computation on the others."""


def counted_rows(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(batch * seq,)`` bool: the logit positions whose next-token label counts (the cross-entropy's shift)."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (batch, seq): label of t + 1
    return (shifted != ignore_index).reshape(-1)


def _scaled(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    """``logits / T`` in ``dtype``; at ``T = 1`` in the same dtype, the logits themselves (no copy)."""
    return logits.to(dtype) if temperature == 1.0 else logits.to(dtype) / temperature


def _log_softmaxes(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log q`` and ``log p`` of a chunk, in float32 or wider."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    return (torch.log_softmax(_scaled(student, dtype, temperature), dim=-1),
            torch.log_softmax(_scaled(teacher, dtype, temperature), dim=-1))


def _chunk_kl(student: torch.Tensor, teacher: torch.Tensor, skipped: torch.Tensor, temperature: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(p || q) over a ``(n, vocab)`` chunk's rows except ``skipped`` (indices), in float64, and ``q - p``
    with the skipped rows zero. After the two log-softmaxes every op works in place, so the chunk's temporaries
    are those two and ``p``. A -inf teacher logit (p = 0) adds 0; a -inf student logit makes the sum non-finite,
    and the caller recomputes it with ``_exact_kl``."""
    log_q, log_p = _log_softmaxes(student, teacher, temperature)
    p = log_p.exp().index_fill_(0, skipped, 0.0)  # a row that does not count adds nothing and gets no gradient
    diff = log_p.clamp_min_(torch.finfo(log_p.dtype).min).sub_(log_q)  # log p - log q, finite where only p = 0
    kl = diff.mul_(p).sum().double()  # torch's cascaded sum: as accurate as the unfused formula, unlike a BLAS dot
    return kl, log_q.exp_().sub_(p).index_fill_(0, skipped, 0.0)


def _exact_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``_chunk_kl``'s sum where a logit is -inf: an entry with p = 0 adds 0, one with q = 0 < p makes it inf."""
    log_q, log_p = _log_softmaxes(student, teacher, temperature)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).double().sum()


class _DistillKL(torch.autograd.Function):
    """``T² · Σ_counted KL / normaliser``; the student-logit gradient is formed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, counted: torch.Tensor, skipped: list[int],
                temperature: float, normaliser: float, chunk: int) -> torch.Tensor:
        vocab = student.shape[-1]
        flat_s, flat_t = student.detach().reshape(-1, vocab), teacher.detach().reshape(-1, vocab)
        grad = torch.empty_like(flat_s) if ctx.needs_input_grad[0] else None  # every chunk writes its rows
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        scale = temperature * temperature / normaliser if normaliser else float("nan")  # no token: NaN, as CE
        for start in range(0, flat_s.shape[0], chunk):
            rows = slice(start, min(start + chunk, flat_s.shape[0]))
            # The chunk's positions that do not count: ``skipped`` is sorted.
            uncounted = skipped[bisect_left(skipped, rows.start):bisect_left(skipped, rows.stop)]
            size = rows.stop - rows.start
            if len(uncounted) == size:
                if grad is not None:
                    grad[rows] = 0.0
                continue
            if len(uncounted) <= GATHER_ABOVE * size:  # the chunk as a view, its few other rows zeroed
                kept = None
                local = torch.tensor(uncounted, dtype=torch.long, device=student.device) - rows.start
                kl, q_minus_p = _chunk_kl(flat_s[rows], flat_t[rows], local, temperature)
            else:  # mostly not counted: gather the counted rows
                kept = torch.nonzero(counted[rows]).flatten()
                kl, q_minus_p = _chunk_kl(flat_s[rows].index_select(0, kept), flat_t[rows].index_select(0, kept),
                                          kept[:0], temperature)
            total += kl
            if grad is not None:  # d(T² KL / N) / dz = T² · (q - p) / (T N)
                q_minus_p = q_minus_p.mul_(scale / temperature).to(grad.dtype)
                if kept is None:
                    grad[rows] = q_minus_p
                else:
                    grad[rows] = 0.0
                    grad[rows].index_copy_(0, kept, q_minus_p)
        if not torch.isfinite(total):  # a -inf logit somewhere (one host sync per micro-batch): the exact sum
            index = torch.nonzero(counted).flatten()
            total = sum(_exact_kl(flat_s.index_select(0, rows), flat_t.index_select(0, rows), temperature)
                        for rows in index.split(chunk))
        ctx.save_for_backward(grad.view_as(student) if grad is not None else None)
        return (total * scale).to(torch.promote_types(student.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
               temperature: float = 1.0, num_items_in_batch: int | torch.Tensor | None = None,
               ignore_index: int = IGNORE_INDEX, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """``T² · KL(teacher || student)`` averaged over the tokens the causal-LM loss counts (module docstring).

    Args:
        student_logits: ``(batch, seq, vocab)``, any float dtype, with a graph to the trainable weights.
        teacher_logits: the same shape, from the unpruned model under ``no_grad`` (never differentiated).
        labels: ``(batch, seq)`` as given to the model (unshifted), ``ignore_index`` where no loss counts.
        temperature: ``T > 0``.
        num_items_in_batch: divide the sum by this instead of the counted tokens (transformers' convention when a
            trainer passes it for exact accumulation).
        ignore_index: the label that does not count.
        chunk_tokens: tokens per float32 softmax chunk.

    Returns:
        A scalar in float32 (float64 logits: float64). With no counted token it is NaN, as the cross-entropy's
        mean over no token is (the loop then skips the step).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; the teacher must share the student's tokenizer "
                         "and see the same batch")
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"distillation: labels {tuple(labels.shape)} do not match the logits' "
                         f"{tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"distillation: the temperature must be > 0, got {temperature}")
    counted = counted_rows(labels.to(student_logits.device), ignore_index)
    skipped = torch.nonzero(~counted).flatten().tolist()  # the one host sync, as the cross-entropy's own
    normaliser = float(num_items_in_batch) if num_items_in_batch is not None else float(counted.numel() - len(skipped))
    return _DistillKL.apply(student_logits, teacher_logits, counted, skipped, float(temperature), normaliser,
                            max(1, int(chunk_tokens)))


def mix_losses(ce: torch.Tensor, kl: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``α · CE + (1 - α) · KL``; ``α = 1`` is the cross-entropy alone (``kl`` may then be None: skip the teacher),
    ``α = 0`` the distillation alone.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation: the cross-entropy weight α must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return ce
    if kl is None:
        raise ValueError(f"distillation: α = {alpha} < 1 weighs the KL term, but no teacher logits were computed")
    return kl if alpha == 0.0 else alpha * ce + (1.0 - alpha) * kl
