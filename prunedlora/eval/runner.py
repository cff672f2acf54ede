"""Evaluation entry point: a registry of task evaluators and the ``eval/`` files of a run directory.

Every evaluator has one signature::

    fn(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, progress: bool, autocast_dtype) -> TaskResult

and is registered in :data:`EVALUATORS` under its task name. ``evaluate`` checks every requested name
before running anything, runs the tasks in order and writes

* ``eval/results.json``: ``{"model_id", "timestamp", "results": {task: {metric: float}},
  "settings": {task: {n, n_shot, seqlen, limit, split, ...}}}``;
* ``eval/results.md``: a markdown table ``task | metric | value | n``;
* ``eval/samples_<task>.jsonl`` for tasks with per-item samples (gsm8k).

Nothing already written is overwritten: an existing file is first renamed to
``<name>.prev-<timestamp><suffix>``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prunedlora.config import ConfigError, DataConfig, EvalConfig

from .gsm8k import gsm8k_exact_match
from .perplexity import token_perplexity

GSM8K_DEFAULT_FEWSHOT = 5


@dataclass
class TaskResult:
    metrics: dict[str, float]
    """Metric name -> plain float."""
    settings: dict[str, Any]
    """What produced the metrics: at least ``n``, ``n_shot``, ``seqlen``, ``limit``, ``split``."""
    samples: list[dict] | None = field(default=None)
    """Per-item records written to ``samples_<task>.jsonl`` (kept out of ``results.json``)."""


def _load_records(*args, **kwargs):
    from prunedlora.data.datasets import load_records

    return load_records(*args, **kwargs)


def _load_lm_text(*args, **kwargs):
    from prunedlora.data.datasets import load_lm_text

    return load_lm_text(*args, **kwargs)


def eval_gsm8k(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, progress=True, autocast_dtype=None):
    """GSM8K test split (first ``limit`` items), few-shot from the first ``num_fewshot`` train records."""
    n_shot = GSM8K_DEFAULT_FEWSHOT if cfg.num_fewshot is None else int(cfg.num_fewshot)
    records = _load_records("gsm8k", "test", data)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    fewshot = _load_records("gsm8k", "train", data)[:n_shot] if n_shot > 0 else []
    out = gsm8k_exact_match(
        model, tokenizer, records, fewshot=fewshot, max_gen_toks=cfg.max_gen_toks,
        batch_size=cfg.batch_size, progress=progress, autocast_dtype=autocast_dtype,
    )
    metrics = {k: float(out[k]) for k in ("exact_match_strict", "exact_match_flexible")}
    settings = {"n": int(out["n"]), "n_shot": n_shot, "seqlen": None, "limit": cfg.limit, "split": "test",
                "fewshot_split": "train", "max_gen_toks": cfg.max_gen_toks, "batch_size": cfg.batch_size}
    return TaskResult(metrics, settings, out["samples"])


def _perplexity_evaluator(dataset: str) -> Callable[..., TaskResult]:
    def run(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, progress=True, autocast_dtype=None):
        text = _load_lm_text(dataset, "test", data)
        out = token_perplexity(model, tokenizer, text, seqlen=cfg.seqlen, batch_size=cfg.batch_size,
                               limit=cfg.limit, progress=progress, autocast_dtype=autocast_dtype)
        settings = {"n": out["n_windows"], "n_shot": 0, "seqlen": out["seqlen"], "limit": cfg.limit,
                    "split": "test", "n_tokens": out["n_tokens"], "requested_seqlen": cfg.seqlen,
                    "protocol": "token-level, non-overlapping windows"}
        return TaskResult({"ppl": out["ppl"], "nll": out["nll"]}, settings)

    run.__name__ = f"eval_{dataset}"
    run.__doc__ = f"Token-level perplexity on the {dataset} test split (``eval.seqlen`` windows, ``limit`` windows)."
    return run


EVALUATORS: dict[str, Callable[..., TaskResult]] = {
    "gsm8k": eval_gsm8k,
    "wikitext2": _perplexity_evaluator("wikitext2"),
    "ptb": _perplexity_evaluator("ptb"),
}

PLANNED_TASKS: dict[str, str] = {
    "mmlu": "MMLU (via lm-eval) is planned but not implemented yet",
    "humaneval": "HumanEval (pass@k in isolated subprocesses) is planned but not implemented yet",
}


def check_tasks(tasks: list[str]) -> None:
    """Raise ``ConfigError`` for any name without an evaluator, before anything runs."""
    known = ", ".join(sorted(EVALUATORS))
    for t in tasks:
        if t in EVALUATORS:
            continue
        if t in PLANNED_TASKS:
            raise ConfigError(f"eval.tasks: {PLANNED_TASKS[t]} ('{t}'). Supported now: {known}.")
        raise ConfigError(f"eval.tasks: unknown task '{t}'. Known tasks: {known}.")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return str(v)


def format_results_table(results: dict) -> str:
    """Markdown table ``task | metric | value | n``.

    Accepts the ``results.json`` document (with ``results`` and ``settings``) or a plain
    ``{task: {metric: value}}`` mapping (then ``n`` is left blank).
    """
    if isinstance(results.get("results"), dict):
        per_task, settings = results["results"], results.get("settings", {})
    else:
        per_task, settings = results, {}
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for task, metrics in per_task.items():
        n = settings.get(task, {}).get("n", "")
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {_fmt(value)} | {n} |")
    return "\n".join(lines)


def _preserve(path: Path, stamp: str) -> None:
    """Rename an existing file out of the way instead of overwriting it."""
    if not path.exists():
        return
    target, k = path.with_name(f"{path.stem}.prev-{stamp}{path.suffix}"), 1
    while target.exists():  # two runs within one second
        target, k = path.with_name(f"{path.stem}.prev-{stamp}-{k}{path.suffix}"), k + 1
    path.rename(target)


def _write_text(path: Path, text: str, stamp: str) -> None:
    _preserve(path, stamp)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _plain(v: Any) -> Any:
    """Numbers as built-in int/float (numpy / torch scalars included), containers recursively."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return v
    if hasattr(v, "item"):  # numpy / torch scalar
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    cfg: EvalConfig,
    data: DataConfig,
    out_dir: Path,
    *,
    model_id: str,
    autocast_dtype=None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` on ``model`` and write ``out_dir/eval/``; returns ``{task: {metric: float}}``.

    Every task name is checked before anything runs (``ConfigError`` for unknown or not-yet-supported
    names). An empty ``tasks`` list is a no-op returning ``{}``.
    """
    tasks = list(tasks)
    check_tasks(tasks)
    if not tasks:  # nothing asked for (e.g. a training task without eval_tasks): write nothing
        return {}
    results: dict[str, dict[str, float]] = {}
    settings: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[dict]] = {}
    for task in tasks:
        res = EVALUATORS[task](model, tokenizer, cfg, data, progress=progress, autocast_dtype=autocast_dtype)
        results[task] = {k: float(v) for k, v in res.metrics.items()}
        settings[task] = _plain(res.settings)
        if res.samples is not None:
            samples[task] = res.samples
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    doc = {"model_id": model_id, "timestamp": now.isoformat(timespec="seconds"),
           "results": results, "settings": settings}
    eval_dir = Path(out_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    _write_text(eval_dir / "results.json", json.dumps(doc, indent=2) + "\n", stamp)
    table = format_results_table(doc)
    _write_text(eval_dir / "results.md", f"# Evaluation: {model_id}\n\n{table}\n", stamp)
    for task, rows in samples.items():
        body = "".join(json.dumps(_plain(r), ensure_ascii=False) + "\n" for r in rows)
        _write_text(eval_dir / f"samples_{task}.jsonl", body, stamp)
    print(table, flush=True)
    return results
