"""wandb logging of evaluation results, off unless ``logging.wandb=true``.

:func:`log_results` writes one evaluation (its ``eval/results.json`` document) into a wandb run: a training run
logs into its own run at its last step (``prunedlora.train.tracking.log_eval``); a standalone evaluation
(``prunedlora-eval``) has no run yet: :func:`log_eval_run` starts one (``job_type="eval"``, in the
evaluation's output directory), logs ``eval/<task>/<metric>`` values and stderrs, the results table (task,
metric, value, stderr, n, shots) and the markdown table, then finishes it. ``reinit="finish_previous"``
keeps jobs of a one-process multirun from sharing a run. ``logging.mode`` (or ``WANDB_MODE``) selects
online, offline (no network; ``wandb sync`` later) or disabled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prunedlora.config import LoggingConfig


def flat_metrics(results: dict[str, dict[str, float]], stderr: dict[str, dict[str, float]] | None = None
                 ) -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` plus ``.../<metric>_stderr`` where known, as plain floats."""
    flat = {f"eval/{t}/{m}": float(v) for t, ms in results.items() for m, v in ms.items()}
    for t, ms in (stderr or {}).items():
        flat |= {f"eval/{t}/{m}_stderr": float(v) for m, v in ms.items()}
    return flat


def table_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[task, metric, value, stderr, n, shots]`` of a ``results.json`` document."""
    rows = []
    for task, metrics in doc.get("results", {}).items():
        s = doc.get("settings", {}).get(task, {})
        for metric, value in metrics.items():
            rows.append([task, metric, float(value), doc.get("stderr", {}).get(task, {}).get(metric),
                         s.get("n"), s.get("n_shot")])
    return rows


TABLE_COLUMNS = ["task", "metric", "value", "stderr", "n", "shots"]


def read_results(out_dir: Path, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The ``results.json`` document of ``out_dir/eval`` (stderr, settings), else just ``results``."""
    results_json = Path(out_dir) / "eval" / "results.json"
    return json.loads(results_json.read_text()) if results_json.is_file() else {"results": results}


def log_results(run: Any, doc: dict[str, Any], step: int | None = None) -> None:
    """``eval/<task>/<metric>`` values and stderrs into ``run`` and its summary, plus the results table."""
    import wandb  # lazy: slow import, optional at run time

    flat = flat_metrics(doc["results"], doc.get("stderr"))
    run.log(flat, step=step)
    run.summary.update(flat)
    run.log({"eval/results": wandb.Table(columns=TABLE_COLUMNS, data=table_rows(doc))}, step=step)


def log_eval_run(cfg: LoggingConfig, out_dir: Path, results: dict[str, dict[str, float]], *, name: str,
                 config: dict[str, Any] | None = None) -> None:
    """Log one evaluation (``out_dir/eval/results.json``) to a new wandb run and finish it; no-op when off."""
    if not cfg.wandb or not results:
        return
    import wandb  # lazy: slow import, optional at run time

    md_path = Path(out_dir) / "eval" / "results.md"
    run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode or os.environ.get("WANDB_MODE") or "online",
                     dir=str(out_dir), name=name, job_type="eval", config=config or {}, reinit="finish_previous")
    try:
        log_results(run, read_results(out_dir, results))
        if md_path.is_file():
            run.summary["eval/results_md"] = md_path.read_text()
    finally:
        run.finish()
