"""lm-evaluation-harness in process: our in-memory model and tokenizer behind ``HFLM``, local task YAMLs.

``run_lm_eval`` wraps the model (merged, a ``PeftModel``, or with our own adapter layers) in ``HFLM`` with
the tokenizer object (so HFLM never looks a tokenizer up on the hub), indexes only the generated YAMLs
(``TaskManager(include_path=..., include_defaults=False)``: milliseconds instead of indexing ~15k built-in
YAMLs), and calls ``simple_evaluate`` with ``log_samples=False``. lm-eval is imported here, lazily (~4 s).

Side effects are contained: the ``HF_*_OFFLINE`` switches are set for the call and restored (the generated
tasks read only local files; this keeps any stray lookup from waiting on an unreachable hub), the global
RNGs that ``simple_evaluate`` re-seeds are restored afterwards, and so is the model's training mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunedlora import quiet

from .lm_tasks import DATASETS_CACHE

log = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 1000
"""Passed to ``simple_evaluate``. Every metric here is a mean, whose stderr lm-eval computes in closed
form; any positive value enables it (0 would report "N/A")."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}


@contextlib.contextmanager
def offline_env() -> Iterator[None]:
    """Set the Hugging Face offline switches for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states (``simple_evaluate`` re-seeds all three)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TruncationCounter(logging.Filter):
    """Counts (and drops) lm-eval's per-batch "Left truncation applied" warnings, for one summary line."""

    PREFIX = "Left truncation applied"

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.kept_tokens: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        self.batches += 1
        found = re.search(r"last (\d+) tokens", message)
        if found:
            self.kept_tokens = int(found.group(1))
        return False


@contextlib.contextmanager
def _quiet_lm_eval(tokenizer, task_names: list[str]) -> Iterator[None]:
    """lm-eval's known-harmless chatter off for one call (``prunedlora.quiet``); truncation reported once."""
    if quiet.verbose():
        yield
        return
    import datasets

    counter = TruncationCounter()
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    hf_logger.addFilter(counter)
    # The tokenizer's own warned-once flag: lm-eval tokenizes whole few-shot prompts, then left-truncates them.
    flags = getattr(tokenizer, "deprecation_warnings", None)
    flag = "sequence-length-is-longer-than-the-specified-maximum"
    had_flag = isinstance(flags, dict) and flag in flags
    if isinstance(flags, dict):
        flags[flag] = True
    bars_were_off = datasets.utils.logging.is_progress_bar_enabled() is False
    datasets.disable_progress_bars()  # "Generating test split" bars of the generated task files
    try:
        with quiet.lm_eval_probes():
            yield
    finally:
        hf_logger.removeFilter(counter)
        if isinstance(flags, dict) and not had_flag:
            flags.pop(flag, None)
        if not bars_were_off:
            datasets.enable_progress_bars()
    if counter.batches:
        log.warning("%s: lm-eval cut the prompts of %d batch(es) to their last %s tokens to fit the model's context "
                    "(few-shot examples are lost first); lower eval.num_fewshot or eval.max_gen_toks to avoid it",
                    ", ".join(task_names), counter.batches, counter.kept_tokens)


def _device_type(model) -> str:
    try:
        return next(model.parameters()).device.type
    except (StopIteration, AttributeError):
        return "cpu"


def simple_evaluate_local(lm, tasks_dir: Path, task_names: list[str], *, allow_unsafe_code: bool = False
                          ) -> dict[str, Any]:
    """``simple_evaluate`` on any lm-eval ``LM`` with only the YAMLs of ``tasks_dir`` indexed.

    Few-shot counts, generation caps and limits live in the generated YAMLs and data files, so nothing
    here overrides them (``num_fewshot=None``, ``limit=None``).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):  # per-task info lines are noise inside a training run's log
        logging.getLogger(name).setLevel(logging.INFO if quiet.verbose() else logging.WARNING)
    try:
        with offline_env(), preserved_rng():
            manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(task_names), task_manager=manager, num_fewshot=None,
                                          limit=None, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                          confirm_run_unsafe_code=allow_unsafe_code)
    finally:
        shutil.rmtree(Path(tasks_dir) / DATASETS_CACHE, ignore_errors=True)
    if out is None:  # non-zero ranks get nothing back
        raise RuntimeError("lm-eval returned no results (simple_evaluate returns None on non-zero ranks)")
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks_dir: Path,
    task_names: list[str],
    *,
    batch_size: int,
    allow_unsafe_code: bool = False,
    autocast_dtype: torch.dtype | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``task_names`` (defined by the YAMLs under ``tasks_dir``) and return lm-eval's results dict.

    Args:
        model: A causal LM module with ``config`` and ``device`` (transformers or PEFT); evaluated as it is.
        tokenizer: Its tokenizer object.
        tasks_dir: Folder of generated task YAMLs (``prunedlora.eval.lm_tasks``).
        task_names: lm-eval task or group names defined there.
        batch_size: Requests per forward / generate call.
        allow_unsafe_code: ``confirm_run_unsafe_code`` (HumanEval; only with the user's opt-in).
        autocast_dtype: Run under ``torch.autocast`` with this dtype (bf16 runs).
        max_length: Context length for HFLM; None lets HFLM read it from the model config.

    Returns:
        ``simple_evaluate``'s dict (``results``, ``n-shot``, ``n-samples``, ``configs``, ...), no samples.
    """
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    amp = torch.autocast(_device_type(model), dtype=autocast_dtype) if autocast_dtype else nullcontext()
    try:
        with amp:
            with _quiet_lm_eval(tokenizer, task_names):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
                return simple_evaluate_local(lm, tasks_dir, task_names, allow_unsafe_code=allow_unsafe_code)
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode


def hflm_max_length(model, tokenizer) -> int:
    """The context length HFLM will use for ``model`` (from its config, else the tokenizer, else 2048)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else 2048


def as_float(value: Any) -> float | None:
    """A finite plain float from lm-eval's numpy / "N/A" values, else None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def metric_value(results: dict[str, Any], task: str, metric: str, filt: str = "none") -> tuple[float | None,
                                                                                             float | None]:
    """``(value, stderr)`` of ``"<metric>,<filter>"`` for one task of ``simple_evaluate``'s results."""
    row = results["results"].get(task, {})
    return as_float(row.get(f"{metric},{filt}")), as_float(row.get(f"{metric}_stderr,{filt}"))


def n_samples(results: dict[str, Any], task: str) -> int:
    """Documents lm-eval evaluated for ``task`` (``n-samples[task]["effective"]``)."""
    entry = results.get("n-samples", {}).get(task, {})
    return int(entry.get("effective", entry.get("original", 0)))
