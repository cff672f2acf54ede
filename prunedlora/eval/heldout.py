"""Held-out answer loss: the training objective, measured on test questions the model never saw.

For a question/answer task the examples are formatted and tokenized exactly as for training
(:func:`~prunedlora.data.batching.tokenize_examples`: ``[BOS] + prompt + answer + [EOS]``, loss on the answer
tokens only), so the number is directly comparable with the training loss and across methods. This is the
steadiest quality signal a short fine-tune gives: exact match on a few dozen questions of a 135M model moves
in steps of several points, the answer-token NLL moves smoothly.

``loss`` is the token-weighted mean NLL over every answer token of the first ``limit`` test examples
(answers cut at ``eval.seqlen``), ``ppl = exp(loss)``; its standard error treats the examples as the sampling
unit (ratio estimator: ``sqrt(N / (N - 1) * sum((nll_i - loss * n_i)^2)) / sum(n_i)``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunedlora.config import DataConfig
from prunedlora.data.batching import IGNORE_INDEX, collate, pad_id_of, tokenize_examples
from prunedlora.data.datasets import load_records
from prunedlora.data.formatting import format_example


@torch.inference_mode()
def answer_nll(model, rows: list[dict[str, list[int]]], pad_id: int, *, batch_size: int = 4,
               autocast_dtype: torch.dtype | None = None, progress: bool = True) -> list[tuple[float, int]]:
    """Per example: (summed NLL of its answer tokens, number of answer tokens), in float32."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    for start in tqdm(range(0, len(rows), batch_size), desc="held-out loss", unit="batch", disable=not progress):
        batch = collate(rows[start:start + batch_size], pad_id)
        with autocast:
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                              reduction="none")
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        out += [(float(s), int(c)) for s, c in zip(nll.sum(dim=1).tolist(), counts.tolist(), strict=True)]
    return out


def heldout_loss(model, tokenizer, dataset: str, data: DataConfig, *, limit: int | None, seqlen: int,
                 batch_size: int = 4, autocast_dtype: torch.dtype | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Answer-token loss of ``model`` on the first ``limit`` test examples of ``dataset`` (module docstring)."""
    records = load_records(dataset, "test", data)
    available = len(records)
    records = records[:limit] if limit is not None else records
    rows = tokenize_examples([format_example(dataset, r) for r in records], tokenizer, seqlen)
    per_example = answer_nll(model, rows, pad_id_of(tokenizer), batch_size=batch_size,
                             autocast_dtype=autocast_dtype, progress=progress)
    total_nll = sum(s for s, _ in per_example)
    tokens = sum(c for _, c in per_example)
    loss = total_nll / tokens
    n = len(per_example)
    stderr = (math.sqrt(n / (n - 1) * sum((s - loss * c) ** 2 for s, c in per_example)) / tokens
              if n > 1 else math.nan)
    return {"loss": loss, "ppl": math.exp(loss), "loss_stderr": stderr, "n": n, "n_tokens": tokens,
            "n_records": len(records), "n_available": available}
