"""Token-level perplexity with the SparseGPT / Wanda protocol.

The evaluation text is tokenized once (so a BOS the tokenizer adds appears only at the very start), cut
into non-overlapping windows of ``seqlen`` tokens with the tail dropped (``n = numel // seqlen``), and
PPL = exp(mean token NLL over every predicted token of every window). Each window predicts its
``seqlen - 1`` next tokens (the first token of a window has no context), exactly as the papers'
``loss * seqlen / (n * seqlen)`` reduces to; all windows have the same length, so the mean over windows
of per-window mean NLL equals the mean over tokens.

Speed (``scripts/bench_perplexity.py``, results in ``docs/RESULTS.md``): the NLL is computed from the
decoder's hidden states through the output head in chunks of tokens, ``logsumexp(logits) - logit[target]``
in float32 per chunk (the fused log-softmax of ``cross_entropy``). That never materialises the ``(B, T, V)``
logits of the whole batch (nor a log-softmax copy of them), and skips the head for the last position of
each window, which has no target. Whether a model's logits really are ``head(decoder(x))`` (no
soft-capping, scaling, ...) is checked once per evaluation on a 16-token prefix of the first window
against the model's own ``forward``; a model that fails the check is evaluated through its full logits
instead, with the same chunked float32 reduction.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunedlora.config import ConfigError

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2**23
"""Logits per chunk of the NLL reduction (32 MiB in float32): ``2**23 // vocab`` tokens at a time. On CPU,
head matmul + cross-entropy per token was fastest at this size among 2**21..2**24 (smaller chunks make
thin matmuls, larger ones cost more in memory traffic), matching a bare forward's head time."""
SPLIT_CHECK_RTOL = 1e-3
"""Relative tolerance of the check that the head/decoder split reproduces the model's own NLL."""
SPLIT_CHECK_TOKENS = 16
"""Length of the prefix of the first window that the check runs on (cheap next to a whole window)."""


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def effective_seqlen(model, seqlen: int) -> int:
    """``min(seqlen, model.config.max_position_embeddings)`` (``seqlen`` when the model has no such field)."""
    cfg = getattr(model, "config", None)
    max_pos = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
    return min(seqlen, max_pos) if isinstance(max_pos, int) and max_pos > 0 else seqlen


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor, tokenized in a single call (special tokens as usual)."""
    enc = tokenizer(text, return_tensors="pt", verbose=False)
    return enc["input_ids"][0]


PREFIX_MARGIN_TOKENS = 256
"""With ``limit``, tokens tokenized beyond the last needed one (see :func:`tokenize_for_windows`)."""


def tokenize_for_windows(tokenizer, text: str, n_tokens: int | None) -> torch.Tensor:
    """The text's token ids; with ``n_tokens`` only a prefix long enough to hold that many.

    A quick run (``eval.limit`` windows) does not need the whole corpus tokenized: a character prefix is
    tokenized in one call, doubling it until it yields ``n_tokens + PREFIX_MARGIN_TOKENS`` tokens (or is
    the whole text). Tokenization is local (a token never spans hundreds of tokens' worth of text), so
    the first ``n_tokens`` ids equal those of tokenizing the whole text once, BOS included.
    """
    if n_tokens is None:
        return tokenize_text(tokenizer, text)
    chars = max(4096, 8 * n_tokens)
    while chars < len(text):
        ids = tokenize_text(tokenizer, text[:chars])
        if ids.numel() >= n_tokens + PREFIX_MARGIN_TOKENS:
            return ids
        chars *= 2
    return tokenize_text(tokenizer, text)


def make_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows, ``n = min(numel // seqlen, limit)``; the tail is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


# ------------------------------------------------------------------------------------------- NLL sums
def _nll_sum_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``logsumexp(logits) - logits[target]`` in float32, returned in float64.

    ``cross_entropy`` runs the fused log-softmax kernel, about twice as fast on CPU as ``logsumexp``
    followed by a gather (which materialises ``x - max`` and ``exp`` separately).

    Args:
        logits: ``(N, V)`` in any float dtype; only this chunk is upcast.
        targets: ``(N,)`` token ids.
    """
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,) float32 per token
    return nll.sum(dtype=torch.float64)  # accumulated in float64: chunks hold up to 2**24 / V tokens


def _chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _vocab_size(model, head: nn.Module | None = None) -> int:
    out = getattr(head, "out_features", None)
    if isinstance(out, int):
        return out
    return int(getattr(getattr(model, "config", None), "vocab_size", 32_000))


def _split(model) -> tuple[nn.Module, nn.Module] | None:
    """``(decoder, output head)`` of a causal LM (a PEFT wrapper is looked through), or None."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    get_decoder, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module) or decoder is base:
        return None
    return decoder, head


def nll_sum_full_logits(model, batch: torch.Tensor) -> float:
    """Sum of next-token NLL over a ``(B, T)`` batch through the model's own ``forward`` (any causal LM)."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    flat, targets = logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    step = _chunk_tokens(flat.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    for start in range(0, flat.shape[0], step):
        total += _nll_sum_from_logits(flat[start : start + step], targets[start : start + step])
    return float(total)


def nll_sum_split(decoder: nn.Module, head: nn.Module, batch: torch.Tensor) -> float:
    """Sum of next-token NLL over a ``(B, T)`` batch from the decoder's hidden states, the head in chunks."""
    out = decoder(input_ids=batch, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), H): the last position has no target
    targets = batch[:, 1:].reshape(-1)
    step = _chunk_tokens(_vocab_size(None, head))
    total = torch.zeros((), dtype=torch.float64, device=batch.device)
    for start in range(0, hidden.shape[0], step):
        total += _nll_sum_from_logits(head(hidden[start : start + step]), targets[start : start + step])
    return float(total)


def _split_reproduces_forward(model, decoder: nn.Module, head: nn.Module, window: torch.Tensor) -> bool:
    """Whether ``head(decoder(x))`` gives the model's own NLL on a ``(1, t)`` probe."""
    ref, got = nll_sum_full_logits(model, window), nll_sum_split(decoder, head, window)
    ok = math.isclose(got, ref, rel_tol=SPLIT_CHECK_RTOL, abs_tol=1e-4)
    if not ok:
        log.warning("perplexity: %s's logits are not head(decoder(x)) (NLL %.6g vs %.6g on one window); "
                    "evaluating through the full logits instead (slower)", type(model).__name__, got, ref)
    return ok


# ----------------------------------------------------------------------------------------- evaluator
def window_nll(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Sum of next-token NLL (nats) over every ``(n, seqlen)`` window, evaluated ``batch_size`` at a time.

    The model is put in eval mode and its previous training mode is restored afterwards.
    """
    n, seqlen = windows.shape
    device = _model_device(model)
    amp = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    was_training = getattr(model, "training", False)
    model.eval()
    nll_sum = 0.0
    try:
        with torch.inference_mode(), amp, tqdm(total=n, desc=f"ppl (seqlen {seqlen})", unit="win",
                                               disable=not progress) as bar:
            parts = _split(model)
            probe = windows[:1, :SPLIT_CHECK_TOKENS].to(device)  # (1, <=16): a prefix suffices for the check
            if parts is not None and n > 0 and not _split_reproduces_forward(model, *parts, probe):
                parts = None
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device, non_blocking=True)
                nll_sum += nll_sum_split(*parts, batch) if parts is not None else nll_sum_full_logits(model, batch)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return nll_sum


def token_perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seqlen: int,
    batch_size: int = 4,
    limit: int | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-level perplexity of ``model`` on ``text``.

    Args:
        seqlen: Window length; capped at the model's ``max_position_embeddings``.
        batch_size: Windows per forward pass.
        limit: At most this many windows (the first ones; only the text they need is tokenized); None: all.

    Returns:
        Plain numbers: ``ppl`` (exp of ``nll``), ``nll`` (mean NLL in nats per predicted token),
        ``n_windows``, ``n_tokens`` (predicted tokens, ``n_windows * (seqlen - 1)``) and ``seqlen`` (the
        effective window).

    Raises:
        ConfigError: A window shorter than 2 tokens, a non-positive limit or batch size, or a text shorter
            than one window.
    """
    seqlen = effective_seqlen(model, int(seqlen))
    if seqlen < 2:
        raise ConfigError(f"eval.seqlen={seqlen}: a perplexity window needs at least 2 tokens; raise eval.seqlen.")
    if limit is not None and limit < 1:
        raise ConfigError(f"eval.limit={limit}: use a positive number of windows, or null for all.")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size}: must be at least 1.")
    ids = tokenize_for_windows(tokenizer, text, None if limit is None else limit * seqlen)
    windows = make_windows(ids, seqlen, limit)
    n = windows.shape[0]
    if n == 0:
        raise ConfigError(
            f"The evaluation text has {ids.numel()} tokens, fewer than one window of eval.seqlen={seqlen}; "
            "lower eval.seqlen."
        )
    nll_sum = window_nll(model, windows, batch_size=batch_size, progress=progress, autocast_dtype=autocast_dtype)
    n_tokens = n * (seqlen - 1)
    nll = nll_sum / n_tokens
    return {
        "ppl": float(math.exp(nll)),
        "nll": float(nll),
        "n_windows": int(n),
        "n_tokens": int(n_tokens),
        "seqlen": int(seqlen),
    }
