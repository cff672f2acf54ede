"""Token-level perplexity with the SparseGPT / Wanda protocol (stack.md section 8.2).

The evaluation text is tokenized once (so a BOS the tokenizer adds appears only at the very start), cut
into non-overlapping windows of ``seqlen`` tokens with the tail dropped (``n = numel // seqlen``), and
PPL = exp(mean token NLL over every predicted token of every window). Each window predicts its
``seqlen - 1`` next tokens (the first token of a window has no context), exactly as the papers'
``loss * seqlen / (n * seqlen)`` reduces to; all windows have the same length, so the mean over windows
of per-window mean NLL equals the mean over tokens.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunedlora.config import ConfigError


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


def make_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows, ``n = min(numel // seqlen, limit)``; the tail is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@torch.inference_mode()
def _window_nll(model, batch: torch.Tensor) -> float:
    """Sum of next-token NLL over a ``[b, seqlen]`` batch, in float32, one sample's logits at a time."""
    logits = model(input_ids=batch, use_cache=False).logits
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(batch.shape[0]):  # per sample: never a float32 copy of the whole batch's logits
        loss = F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum")
        total += loss.double() if logits.device.type != "mps" else loss
    return float(total)


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

    Returns plain numbers: ``ppl`` (exp of ``nll``), ``nll`` (mean NLL in nats per predicted token),
    ``n_windows``, ``n_tokens`` (predicted tokens, ``n_windows * (seqlen - 1)``) and ``seqlen`` (the
    effective window, capped at the model's ``max_position_embeddings``). The model is evaluated in eval
    mode and its previous training mode is restored afterwards.
    """
    seqlen = effective_seqlen(model, int(seqlen))
    if seqlen < 2:
        raise ConfigError(f"eval.seqlen={seqlen}: a perplexity window needs at least 2 tokens; raise eval.seqlen.")
    if limit is not None and limit < 1:
        raise ConfigError(f"eval.limit={limit}: use a positive number of windows, or null for all.")
    if batch_size < 1:
        raise ConfigError(f"eval.batch_size={batch_size}: must be at least 1.")
    ids = tokenize_text(tokenizer, text)
    windows = make_windows(ids, seqlen, limit)
    n = windows.shape[0]
    if n == 0:
        raise ConfigError(
            f"The evaluation text has {ids.numel()} tokens, fewer than one window of eval.seqlen={seqlen}; "
            "lower eval.seqlen."
        )
    device = _model_device(model)
    amp = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    was_training = getattr(model, "training", False)
    model.eval()
    nll_sum = 0.0
    try:
        with tqdm(total=n, desc=f"ppl (seqlen {seqlen})", unit="win", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device, non_blocking=True)
                with amp:
                    nll_sum += _window_nll(model, batch)
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    n_tokens = n * (seqlen - 1)
    nll = nll_sum / n_tokens
    return {
        "ppl": float(math.exp(nll)),
        "nll": float(nll),
        "n_windows": int(n),
        "n_tokens": int(n_tokens),
        "seqlen": int(seqlen),
    }
