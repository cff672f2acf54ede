"""``prunedlora-eval``: evaluate a saved run or any Hugging Face causal LM on ``eval.tasks``.

``run_dir=<dir>`` evaluates the exported ``<dir>/model``; otherwise ``model.*`` names the model exactly as
for training (hub id, local directory, ``tiny``, ``smollm2_135m``). Results go to this command's own
output directory (Hydra's run dir), so an evaluation never overwrites what a training run wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from prunedlora.config import ConfigError, RootConfig, validate
from prunedlora.eval.runner import evaluate
from prunedlora.models.load import load_model

log = logging.getLogger(__name__)


def _exported_model_dir(run_dir: Path) -> Path:
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"run_dir={run_dir} has no exported model ({model_dir}/config.json is missing). Point run_dir at a "
            "finished prunedlora-train run directory, or evaluate a model with model.name_or_path=<dir or hub id>."
        )
    return model_dir


def run_eval(cfg: RootConfig, out_dir: Path) -> dict[str, Any]:
    """Load the model named by ``run_dir`` or ``model``, evaluate it and return ``{task: {metric: value}}``."""
    validate(cfg)
    model_cfg = cfg.model
    tasks = cfg.eval.tasks if cfg.eval.tasks is not None else cfg.task.eval_tasks
    if cfg.run_dir is not None:
        run_dir = Path(cfg.run_dir).expanduser()
        model_cfg = replace(cfg.model, name=run_dir.name, name_or_path=str(_exported_model_dir(run_dir)),
                            fallback=None)
        summary = run_dir / "summary.json"
        if cfg.eval.tasks is None and summary.exists():
            tasks = list(json.loads(summary.read_text()).get("eval", {})) or tasks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(model_cfg, device)
    model.eval()
    log.info("evaluating %s on %s", model_cfg.name_or_path, ", ".join(tasks))
    return evaluate(model, tokenizer, tasks, cfg.eval, cfg.data, out_dir, model_id=model_cfg.name_or_path,
                    autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None, progress=cfg.logging.progress)
