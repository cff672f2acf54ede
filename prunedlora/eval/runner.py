"""Evaluation entry point: a registry of task evaluators and the ``eval/`` files of a run directory.

Every evaluator has one signature::

    fn(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress: bool,
       autocast_dtype) -> TaskResult

and is registered in :data:`EVALUATORS` under its task name:

========== ================================================== ==========================================
task       how                                                ``eval.limit`` means
========== ================================================== ==========================================
gsm8k      lm-eval, generate until ``Question:`` (5-shot)     the first ``limit`` test questions
mmlu       lm-eval, 57 multiple-choice subjects (5-shot, dev) ``limit`` questions in total, spread evenly
                                                              over the subjects (``lm_tasks.spread_limit``)
humaneval  lm-eval generation + our sandboxed pass@1          the first ``limit`` problems
           (only with ``eval.allow_code_execution=true``)
wikitext2  our token-level perplexity (SparseGPT protocol)    the first ``limit`` windows of ``seqlen``
           (+ lm-eval's word perplexity per article with        (and the first ``limit`` articles)
           ``eval.lm_eval_wikitext=true``)
ptb        our token-level perplexity                         the first ``limit`` windows of ``seqlen``
gsm8k_loss held-out answer-token NLL, training format          the first ``limit`` test examples
           (``heldout.py``)
========== ================================================== ==========================================

``eval.task_limits.<task>`` (null by default) overrides ``eval.limit`` for that task.

``evaluate`` checks every requested name before running anything, runs the tasks in order and writes

* ``eval/results.json``: ``{"model_id", "model": {identity}, "timestamp", "results": {task: {metric:
  float}}, "stderr": {task: {metric: float}}, "settings": {task: {n, n_shot, seqlen, limit, split, ...}},
  "details": {task: {...}}, "skipped": {task: reason}, "versions": {...}}``;
* ``eval/results.md``: a markdown table ``task | metric | value | stderr | n | shots``;
* ``eval/tasks/``: the generated lm-eval task YAMLs and the exact data they evaluated.

Nothing already written is overwritten: an existing file (or ``tasks/`` folder) is first renamed to
``<name>.prev-<timestamp><suffix>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prunedlora.config import ConfigError, DataConfig, EvalConfig

from . import harness, lm_tasks
from .heldout import heldout_loss
from .perplexity import token_perplexity
from .sandbox import resolve_level

log = logging.getLogger(__name__)

HUMANEVAL_SKIPPED = (
    "skipped: HumanEval executes model-generated code and runs only with eval.allow_code_execution=true "
    "(each completion under bubblewrap when available, in a subprocess with a timeout, resource limits, no network "
    "and a temporary working directory; eval.sandbox=auto|bwrap|python)"
)


@dataclass
class TaskResult:
    metrics: dict[str, float]
    """Metric name -> plain float (empty when skipped)."""
    settings: dict[str, Any]
    """What produced the metrics: at least ``n``, ``n_shot``, ``seqlen``, ``limit``, ``split``."""
    stderr: dict[str, float] = field(default_factory=dict)
    """Standard errors where lm-eval gives them (metric name -> float)."""
    details: dict[str, Any] | None = None
    """Secondary figures kept out of the results table (e.g. MMLU per subject)."""
    skipped: str | None = None
    """Why the task did not run (then ``metrics`` is empty)."""


def _load_lm_text(*args, **kwargs):
    from prunedlora.data.datasets import load_lm_text

    return load_lm_text(*args, **kwargs)


# --------------------------------------------------------------------------------------- lm-eval tasks
def _gen_cap(model, tokenizer, requested: int | None, default: int) -> int:
    """The generation cap, lowered to half the context when it would leave no room for the prompt."""
    cap = default if requested is None else int(requested)
    max_length = harness.hflm_max_length(model, tokenizer)
    if cap >= max_length:
        log.warning("generation cap %d >= the model's context %d: using %d", cap, max_length, max_length // 2)
        cap = max_length // 2
    return cap


def _lm_eval_settings(spec: lm_tasks.TaskSpec, res: dict, n: int, cfg: EvalConfig, model, tokenizer) -> dict:
    return {"n": n, "n_shot": spec.n_shot, "seqlen": None, "limit": cfg.limit, "batch_size": cfg.batch_size,
            "max_length": harness.hflm_max_length(model, tokenizer), "lm_eval_version": res.get("lm_eval_version"),
            **spec.settings}


def eval_gsm8k(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress=True,
               autocast_dtype=None) -> TaskResult:
    """GSM8K through lm-eval: strict (``#### N``) and flexible (last number) exact match."""
    cap = _gen_cap(model, tokenizer, cfg.max_gen_toks, lm_tasks.GSM8K_DEFAULT_MAX_GEN_TOKS)
    spec = lm_tasks.gsm8k_task(work_dir, data, limit=cfg.limit, num_fewshot=cfg.num_fewshot, max_gen_toks=cap)
    res = harness.run_lm_eval(model, tokenizer, work_dir, spec.lm_eval_tasks, batch_size=cfg.batch_size,
                              autocast_dtype=autocast_dtype)
    metrics, stderr = {}, {}
    for ours, filt in (("exact_match_strict", "strict-match"), ("exact_match_flexible", "flexible-extract")):
        value, se = harness.metric_value(res, lm_tasks.GSM8K_TASK, "exact_match", filt)
        metrics[ours] = value if value is not None else math.nan
        if se is not None:
            stderr[ours] = se
    n = harness.n_samples(res, lm_tasks.GSM8K_TASK)
    return TaskResult(metrics, _lm_eval_settings(spec, res, n, cfg, model, tokenizer), stderr)


def eval_mmlu(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress=True,
              autocast_dtype=None) -> TaskResult:
    """MMLU through lm-eval: ``acc`` weighted by subject size (lm-eval's number) and ``acc_macro``."""
    spec = lm_tasks.mmlu_tasks(work_dir, data, limit=cfg.limit, num_fewshot=cfg.num_fewshot)
    res = harness.run_lm_eval(model, tokenizer, work_dir, spec.lm_eval_tasks, batch_size=cfg.batch_size,
                              autocast_dtype=autocast_dtype)
    acc, acc_se = harness.metric_value(res, lm_tasks.MMLU_GROUP, "acc")
    subjects: dict[str, dict[str, float]] = {}
    for subject in spec.settings["items_per_subject"]:
        task = lm_tasks.mmlu_subject_task(subject)
        value, se = harness.metric_value(res, task, "acc")
        subjects[subject] = {"acc": value if value is not None else math.nan, "n": harness.n_samples(res, task)}
        if se is not None:
            subjects[subject]["acc_stderr"] = se
    n = sum(int(s["n"]) for s in subjects.values())
    macro = sum(s["acc"] for s in subjects.values()) / len(subjects)
    if acc is None:  # only happens with a single subject (lm-eval reports no group row for it)
        acc = sum(s["acc"] * s["n"] for s in subjects.values()) / n
    metrics = {"acc": float(acc), "acc_macro": float(macro)}
    stderr = {"acc": acc_se} if acc_se is not None else {}
    ses = [s.get("acc_stderr") for s in subjects.values()]
    if all(se is not None for se in ses):  # subjects are independent samples: Var(mean) = sum(Var) / S^2
        stderr["acc_macro"] = math.sqrt(sum(se * se for se in ses)) / len(ses)
    return TaskResult(metrics, _lm_eval_settings(spec, res, n, cfg, model, tokenizer), stderr,
                      details={"subjects": subjects})


def eval_humaneval(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress=True,
                   autocast_dtype=None) -> TaskResult:
    """HumanEval pass@1 (greedy) with our sandboxed runner; skipped without ``eval.allow_code_execution``."""
    if not cfg.allow_code_execution:
        return TaskResult({}, {"n": 0, "n_shot": 0, "seqlen": None, "limit": cfg.limit, "split": "test"},
                          skipped=HUMANEVAL_SKIPPED)
    cap = _gen_cap(model, tokenizer, cfg.max_gen_toks, lm_tasks.HUMANEVAL_DEFAULT_MAX_GEN_TOKS)
    level = resolve_level(cfg.sandbox)  # before generating: eval.sandbox=bwrap without bubblewrap fails now
    spec = lm_tasks.humaneval_task(work_dir, data, limit=cfg.limit, max_gen_toks=cap,
                                   timeout_s=cfg.humaneval_timeout_s, sandbox=level,
                                   hide=[work_dir.resolve().parent.parent])  # the run directory (out_dir)
    res = harness.run_lm_eval(model, tokenizer, work_dir, spec.lm_eval_tasks, batch_size=cfg.batch_size,
                              allow_unsafe_code=True, autocast_dtype=autocast_dtype)
    value, se = harness.metric_value(res, lm_tasks.HUMANEVAL_TASK, "pass@1", "create_test")
    n = harness.n_samples(res, lm_tasks.HUMANEVAL_TASK)
    return TaskResult({"pass@1": value if value is not None else math.nan},
                      _lm_eval_settings(spec, res, n, cfg, model, tokenizer), {"pass@1": se} if se is not None else {})


# ------------------------------------------------------------------------------------------ perplexity
def _add_lm_eval_wikitext(result: TaskResult, model, tokenizer, cfg: EvalConfig, data: DataConfig, work_dir: Path,
                          autocast_dtype) -> None:
    """lm-eval's per-article rolling word/byte perplexity beside ours (``eval.lm_eval_wikitext=true``)."""
    spec = lm_tasks.wikitext_task(work_dir, data, limit=cfg.limit)
    res = harness.run_lm_eval(model, tokenizer, work_dir, spec.lm_eval_tasks, batch_size=cfg.batch_size,
                              autocast_dtype=autocast_dtype)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        value, se = harness.metric_value(res, lm_tasks.WIKITEXT_TASK, metric)
        result.metrics[metric] = value if value is not None else math.nan
        if se is not None:
            result.stderr[metric] = se
    result.settings["lm_eval_wikitext"] = {"documents": spec.n_items, "limit": cfg.limit, **spec.settings}


def _perplexity_evaluator(dataset: str) -> Callable[..., TaskResult]:
    def run(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress=True,
            autocast_dtype=None) -> TaskResult:
        text = _load_lm_text(dataset, "test", data)
        out = token_perplexity(model, tokenizer, text, seqlen=cfg.seqlen, batch_size=cfg.batch_size,
                               limit=cfg.limit, progress=progress, autocast_dtype=autocast_dtype)
        settings = {"n": out["n_windows"], "n_shot": 0, "seqlen": out["seqlen"], "limit": cfg.limit,
                    "split": "test", "n_tokens": out["n_tokens"], "requested_seqlen": cfg.seqlen,
                    "batch_size": cfg.batch_size, "protocol": "token-level, non-overlapping windows"}
        result = TaskResult({"ppl": out["ppl"], "nll": out["nll"]}, settings)
        if dataset == "wikitext2" and cfg.lm_eval_wikitext:
            _add_lm_eval_wikitext(result, model, tokenizer, cfg, data, work_dir, autocast_dtype)
        return result

    run.__name__ = f"eval_{dataset}"
    run.__doc__ = f"Token-level perplexity on the {dataset} test split (``eval.seqlen`` windows, ``limit`` windows)."
    return run


def eval_gsm8k_loss(model, tokenizer, cfg: EvalConfig, data: DataConfig, *, work_dir: Path, progress=True,
                    autocast_dtype=None) -> TaskResult:
    """Held-out GSM8K answer loss in the training format (``heldout.py``)."""
    out = heldout_loss(model, tokenizer, "gsm8k", data, limit=cfg.limit, seqlen=cfg.seqlen,
                       batch_size=cfg.batch_size, autocast_dtype=autocast_dtype, progress=progress)
    settings = {"n": out["n"], "n_available": out["n_available"], "n_shot": 0, "seqlen": cfg.seqlen,
                "limit": cfg.limit, "split": "test", "n_tokens": out["n_tokens"],
                "protocol": "answer tokens only, training format"}
    return TaskResult({"loss": out["loss"], "ppl": out["ppl"]}, settings, {"loss": out["loss_stderr"]})


EVALUATORS: dict[str, Callable[..., TaskResult]] = {
    "gsm8k": eval_gsm8k,
    "mmlu": eval_mmlu,
    "humaneval": eval_humaneval,
    "wikitext2": _perplexity_evaluator("wikitext2"),
    "ptb": _perplexity_evaluator("ptb"),
    "gsm8k_loss": eval_gsm8k_loss,
}


def check_tasks(tasks: list[str]) -> None:
    """Raise ``ConfigError`` for any name without an evaluator, before anything runs."""
    known = ", ".join(sorted(EVALUATORS))
    for t in tasks:
        if t not in EVALUATORS:
            raise ConfigError(f"eval.tasks: unknown task '{t}'. Known tasks: {known}.")


def task_config(cfg: EvalConfig, task: str) -> EvalConfig:
    """``cfg`` with ``limit`` replaced by ``cfg.task_limits[task]`` when the task has its own limit."""
    own = cfg.task_limits.get(task)
    return replace(cfg, limit=own) if own is not None else cfg


UNITS = {"gsm8k": "questions", "mmlu": "questions", "humaneval": "problems", "gsm8k_loss": "examples"}
"""What one evaluated item of each task is called in the budget line (perplexity tasks count windows)."""


def budget_line(task: str, cfg: EvalConfig, settings: dict[str, Any]) -> str:
    """One line saying what ``task`` evaluated and, when a limit cut it short, which key lifts the limit.

    ``gsm8k: 50 of 1319 questions (eval.limit=50; set eval.limit=null for all)``, or ``wikitext2: all 140
    windows of 2048 tokens``. A per-task limit names ``eval.task_limits.<task>`` instead.
    """
    own = cfg.task_limits.get(task)
    key, limit = (f"eval.task_limits.{task}", own) if own is not None else ("eval.limit", cfg.limit)
    lift = f"set {key}=null" + (" and eval.limit=null" if own is not None and cfg.limit is not None else "")
    n = int(settings.get("n") or 0)
    if task in UNITS:
        available = settings.get("n_available")
        what = f"{n} of {available} {UNITS[task]}" if available is not None else f"{n} {UNITS[task]}"
        cut = limit is not None and available is not None and n < int(available)
        return f"{task}: {what} ({key}={limit}; {lift} for all)" if cut else f"{task}: all {what.split(' of ')[-1]}"
    windows = f"{n} windows of {settings.get('seqlen')} tokens"
    if limit is not None and n >= limit:  # the text may hold more windows than the limit took
        return f"{task}: the first {windows} of the test split ({key}={limit}; {lift} for the whole split)"
    return f"{task}: all {windows} of the test split"


# ------------------------------------------------------------------------------------------------ files
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def format_results_table(results: dict) -> str:
    """Markdown table ``task | metric | value | stderr | n | shots`` (skipped tasks get one row).

    Accepts the ``results.json`` document (with ``results``, ``stderr``, ``settings``, ``skipped``) or a
    plain ``{task: {metric: value}}`` mapping (then the other columns are blank).
    """
    if isinstance(results.get("results"), dict):
        per_task, settings = results["results"], results.get("settings", {})
        stderr, skipped = results.get("stderr", {}), results.get("skipped", {})
    else:
        per_task, settings, stderr, skipped = results, {}, {}, {}
    lines = ["| task | metric | value | stderr | n | shots |", "|---|---|---:|---:|---:|---:|"]
    for task, metrics in per_task.items():
        s = settings.get(task, {})
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {_fmt(value)} | {_fmt(stderr.get(task, {}).get(metric))} | "
                         f"{_fmt(s.get('n'))} | {_fmt(s.get('n_shot'))} |")
    for task, reason in skipped.items():
        lines.append(f"| {task} | – | {reason.split(':')[0]} |  |  |  |")
    return "\n".join(lines)


def _preserve(path: Path, stamp: str) -> None:
    """Rename an existing file or folder out of the way instead of overwriting it."""
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
    if isinstance(v, Path):
        return str(v)
    return v


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("prunedlora", "lm_eval", "transformers", "torch", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    cfg: EvalConfig,
    data: DataConfig,
    out_dir: Path,
    *,
    model_id: str,
    identity: dict[str, Any] | None = None,
    autocast_dtype=None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` on ``model`` and write ``out_dir/eval/``; returns ``{task: {metric: float}}``.

    Every task name is checked before anything runs (``ConfigError`` for unknown names). An empty
    ``tasks`` list is a no-op returning ``{}``. Skipped tasks (HumanEval without the opt-in) are reported
    in ``results.json``'s ``skipped`` and in the table, and left out of the returned mapping.

    Args:
        model_id: What was evaluated, in one string (a directory or hub id).
        identity: More about it for ``results.json``'s ``model`` (base model, adapter, run dir, method).
    """
    tasks = list(tasks)
    check_tasks(tasks)
    if not tasks:  # nothing asked for (e.g. a training task without eval_tasks): write nothing
        return {}
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    eval_dir = Path(out_dir) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    work_dir = eval_dir / "tasks"
    _preserve(work_dir, stamp)
    work_dir.mkdir()
    doc: dict[str, Any] = {"model_id": model_id, "model": _plain({"name_or_path": model_id, **(identity or {})}),
                           "timestamp": now.isoformat(timespec="seconds"), "results": {}, "stderr": {},
                           "settings": {}, "details": {}, "skipped": {}, "versions": _versions()}
    for task in tasks:
        res = EVALUATORS[task](model, tokenizer, task_config(cfg, task), data, work_dir=work_dir, progress=progress,
                               autocast_dtype=autocast_dtype)
        doc["settings"][task] = _plain(res.settings)
        if res.skipped is not None:
            doc["skipped"][task] = res.skipped
            print(f"prunedlora: {task} {res.skipped}", flush=True)
            continue
        log.info(budget_line(task, cfg, res.settings))
        doc["results"][task] = {k: float(v) for k, v in res.metrics.items()}
        if res.stderr:
            doc["stderr"][task] = {k: float(v) for k, v in res.stderr.items()}
        if res.details:
            doc["details"][task] = _plain(res.details)
    _write_text(eval_dir / "results.json", json.dumps(doc, indent=2) + "\n", stamp)
    table = format_results_table(doc)
    _write_text(eval_dir / "results.md", f"# Evaluation: {model_id}\n\n{table}\n", stamp)
    print(table, flush=True)
    print(f"results: {(eval_dir / 'results.json').resolve()}", flush=True)
    return doc["results"]
