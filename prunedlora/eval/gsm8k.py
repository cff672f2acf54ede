"""GSM8K exact match, in lm-eval's ``gsm8k`` format (5-shot from train, ``Question: ...\\nAnswer:``).

Answer extraction follows lm-eval's two filters:

* ``strict-match``: the first ``#### <number>`` (regex ``#### (\\-?[0-9\\.\\,]+)``);
* ``flexible-extract``: the last number-like match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``. Unlike lm-eval we
  skip matches without a digit (``"..."``), so trailing ellipses do not hide the answer.

Comparison (a deliberate, documented deviation): lm-eval compares strings after removing ``,``, ``$``,
a leading ``... #### `` and a trailing ``.``. We apply the same clean-up (:func:`normalize_number`) and
then compare *numerically* when both sides parse as floats (``|a - b| <= 1e-6``, so ``"5.0"`` matches
``"5"``), falling back to case-insensitive string equality otherwise. GSM8K golds are integers, so the
only effect is that ``5.00`` / ``5`` style answers count as correct.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>", "\n\n")
"""lm-eval's ``until`` for gsm8k plus its few-shot delimiter ``\\n\\n`` (an answer never contains a blank
line, and without it small models ramble on to ``max_gen_toks``). The tokenizer's EOS is added too."""
ABS_TOL = 1e-6


def normalize_number(s: str) -> str:
    """Clean a number string the way lm-eval's gsm8k metric does, then canonicalise it.

    Strips whitespace, commas, ``$`` and trailing dots; a value that parses as a finite float is
    rendered canonically: integral values as integers (``"1,000"`` -> ``"1000"``, ``"5.0"`` -> ``"5"``,
    ``"-0"`` -> ``"0"``), others with ``repr`` (``"0.50"`` -> ``"0.5"``). Anything else is returned
    cleaned and lower-cased.
    """
    t = s.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        v = float(t)
    except ValueError:
        return t.lower()
    if not math.isfinite(v):
        return t.lower()
    if v == int(v):
        return str(int(v))
    return repr(v)


def extract_strict(text: str) -> str | None:
    """``#### <number>`` (first occurrence), normalised; None when absent."""
    m = STRICT_RE.search(text)
    if m is None:
        return None
    out = normalize_number(m.group(1))
    return out if any(c.isdigit() for c in out) else None


def extract_flexible(text: str) -> str | None:
    """The last number in ``text`` (lm-eval's flexible-extract regex), normalised; None when absent."""
    last = None
    for m in FLEXIBLE_RE.finditer(text):
        g = m.group(1) or m.group(2)
        if g and any(c.isdigit() for c in g):
            last = g
    return None if last is None else normalize_number(last)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Numeric equality within 1e-6 when both parse as floats, else normalised string equality."""
    if pred is None or gold is None:
        return False
    try:
        return math.isclose(float(pred), float(gold), rel_tol=0.0, abs_tol=ABS_TOL)
    except ValueError:
        return normalize_number(pred) == normalize_number(gold)


def format_example(question: str, answer: str | None = None) -> str:
    """One lm-eval gsm8k turn: ``Question: q\\nAnswer: a\\n\\n`` (few-shot) or ``Question: q\\nAnswer:``."""
    if answer is None:
        return f"Question: {question}\nAnswer:"
    return f"Question: {question}\nAnswer: {answer}\n\n"


def build_prompt(question: str, fewshot: list[dict]) -> str:
    return "".join(format_example(ex["question"], ex["answer"]) for ex in fewshot) + format_example(question)


def truncate_at_stop(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


class _StopOnStrings(StoppingCriteria):
    """Per-sequence stopping criterion: done once the decoded continuation contains a stop string.

    Only the last ``window`` generated tokens are decoded each step (stop strings are short), so the
    cost per step is a small batch decode, negligible next to a forward pass.
    """

    def __init__(self, tokenizer, prompt_len: int, stops: tuple[str, ...], window: int = 24):
        self.tokenizer, self.prompt_len, self.stops, self.window = tokenizer, prompt_len, stops, window

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len :]
        tail = new[:, -self.window :].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=False)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


def gsm8k_exact_match(
    model,
    tokenizer,
    records: list[dict],
    *,
    fewshot: list[dict],
    max_gen_toks: int,
    batch_size: int,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Greedy-generate answers for ``records`` and score strict / flexible exact match.

    Prompts are left-padded for batched generation (padding is built here, so the tokenizer's padding
    side and pad token are never modified) and left-truncated so that prompt + ``max_gen_toks`` fits the model's positions,
    as lm-eval does. Returns ``exact_match_strict``, ``exact_match_flexible``, ``n`` and ``samples``.
    """
    stops = tuple(STOP_STRINGS) + ((tokenizer.eos_token,) if isinstance(tokenizer.eos_token, str) else ())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    max_pos = _max_positions(model)
    max_prompt = None if max_pos is None else max(1, max_pos - max_gen_toks)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    samples: list[dict] = []
    strict_hits = flex_hits = 0
    try:
        bar = tqdm(total=len(records), desc="gsm8k", disable=not progress)
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            enc = [tokenizer(build_prompt(r["question"], fewshot))["input_ids"] for r in batch]
            if max_prompt is not None:
                enc = [ids[-max_prompt:] for ids in enc]
            width = max(len(ids) for ids in enc)
            input_ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(enc), width), dtype=torch.long)
            for i, ids in enumerate(enc):  # left padding, built by hand: no tokenizer state is touched
                input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[i, width - len(ids) :] = 1
            input_ids, attention = input_ids.to(device), attention.to(device)
            amp = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            )
            with torch.inference_mode(), amp:
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_gen_toks,
                    do_sample=False,
                    use_cache=True,  # loaded models come with the cache off (training); generation wants it
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=[_StopOnStrings(tokenizer, width, stops)],
                )
            gens = tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=True)
            for r, gen in zip(batch, gens):
                gen = truncate_at_stop(gen, stops)
                gold = extract_strict(r["answer"]) or extract_flexible(r["answer"])
                strict, flex = extract_strict(gen), extract_flexible(gen)
                s_ok, f_ok = answers_match(strict, gold), answers_match(flex, gold)
                strict_hits += s_ok
                flex_hits += f_ok
                samples.append(
                    {"question": r["question"], "gold": gold, "generation": gen, "pred": strict,
                     "pred_strict": strict, "pred_flexible": flex,
                     "correct_strict": bool(s_ok), "correct_flexible": bool(f_ok)}
                )
            bar.update(len(batch))
        bar.close()
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    n = len(records)
    return {
        "exact_match_strict": strict_hits / n if n else 0.0,
        "exact_match_flexible": flex_hits / n if n else 0.0,
        "n": n,
        "samples": samples,
    }
