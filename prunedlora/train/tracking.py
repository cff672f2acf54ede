"""wandb tracking for a run (rank 0 only), off unless ``logging.wandb=true``.

One wandb run per prunedlora run directory: its id is kept in ``checkpoints/wandb_id`` so a resumed or
requeued job continues the same wandb run. ``reinit="finish_previous"`` and ``finish()`` in the caller's
``finally`` keep the jobs of a basic-launcher multirun (one process) from sharing a run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from prunedlora.config import LoggingConfig

WANDB_ID_FILE = "wandb_id"


def start_wandb(cfg: LoggingConfig, run_dir: Path, config: dict[str, Any], name: str) -> Any | None:
    """Start (or resume) the wandb run of ``run_dir``; ``None`` when wandb is off."""
    if not cfg.wandb:
        return None
    import wandb  # lazy: optional at run time, slow to import

    id_file = run_dir / "checkpoints" / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        mode=cfg.mode or os.environ.get("WANDB_MODE") or "online",
        dir=str(run_dir),
        config=config,
        name=name,
        id=run_id,
        resume="allow",
        reinit="finish_previous",
    )


def log_eval(wandb_run: Any | None, run_dir: Path, results: dict[str, dict[str, float]], step: int) -> None:
    """The run's evaluation (``run_dir/eval/results.json``: values, stderrs, the results table) at ``step``."""
    if wandb_run is None or not results:
        return
    from prunedlora.eval.wandb_log import log_results, read_results

    log_results(wandb_run, read_results(run_dir, results), step=step)
