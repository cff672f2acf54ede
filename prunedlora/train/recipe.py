"""The training recipe, top to bottom: setup -> train -> save -> evaluate -> summary.

``run`` is the only function that sees the whole config; it unpacks it and hands each component one
section or plain values.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prunedlora.config import RootConfig, validate
from prunedlora.data.batching import ResumableBatches, build_train_examples
from prunedlora.eval.runner import evaluate
from prunedlora.methods import build_method
from prunedlora.models.load import count_parameters, load_model
from prunedlora.train import checkpoint as ckpt
from prunedlora.train.loop import MetricsWriter, peak_memory_mb, train_loop
from prunedlora.train.optim import build_optimizer, build_scheduler
from prunedlora.train.preemption import Preempted, PreemptionGuard
from prunedlora.train.tracking import log_eval, start_wandb
from prunedlora.train.rundir import prepare_run_dir

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: RootConfig, run_dir: Path) -> dict[str, Any]:
    """Train, export, evaluate and summarise one run in ``run_dir``; returns the summary dict."""
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_dict = asdict(cfg)
    completed = prepare_run_dir(run_dir, config_dict)
    if completed is not None:
        log.info("run in %s is already complete; nothing to do", run_dir)
        return completed

    started = time.time()
    device = resolve_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)

    # ---------------------------------------------------------------- setup
    model, tokenizer = load_model(cfg.model, device)
    params_total, _ = count_parameters(model)
    method = build_method(cfg.method, cfg.sparsity)
    adapted = method.attach(model)
    model.to(device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, params_trainable = count_parameters(model)
    log.info("%s on %s: %d adapted modules, %d trainable of %d parameters",
             method.name, cfg.model.name, len(adapted), params_trainable, params_total)

    # The data order depends only on the seed, so a resumed run sees the same batches.
    examples = build_train_examples(cfg.task, cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed,
                                    cfg.train.packing)
    batches = ResumableBatches(examples, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)
    optimizer = build_optimizer(method.parameter_groups(model, cfg.train.weight_decay), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    callbacks = method.callbacks()
    wandb_run = start_wandb(cfg.logging, run_dir, config_dict, name=f"{method.name}-{cfg.model.name}-{run_dir.name}")
    writer = MetricsWriter(run_dir / "metrics.jsonl", wandb_run)
    start_step = _maybe_resume(run_dir, model, optimizer, scheduler, batches, callbacks, writer)

    def save(step: int) -> None:
        state = {
            ckpt.STEP_KEY: step,
            ckpt.ADAPTER_KEY: ckpt.adapter_state_dict(model),
            ckpt.OPTIMIZER_KEY: optimizer.state_dict(),
            ckpt.SCHEDULER_KEY: scheduler.state_dict(),
            ckpt.RNG_KEY: ckpt.rng_state(),
            ckpt.DATA_KEY: batches.state_dict(),
            ckpt.CALLBACKS_KEY: [cb.state_dict() for cb in callbacks],
            ckpt.CONFIG_KEY: config_dict,
        }
        ckpt.save_checkpoint(run_dir / "checkpoints", step, state, cfg.train.keep_checkpoints)

    try:
        # ------------------------------------------------------------ train
        with PreemptionGuard() as guard:
            try:
                last = train_loop(model, optimizer, scheduler, batches, callbacks, cfg.train, device=device,
                                  start_step=start_step, writer=writer, save=save,
                                  progress=cfg.logging.progress, preemption=guard)
            except Preempted as exc:
                log.warning("%s; re-run the same command to resume", exc)
                guard.forward(exc.signum)  # submitit requeues, or exit 128+signum for sbatch scripts
        final_loss = last.loss if last is not None else _last_logged_loss(writer.path)
        summary = _finish(cfg, run_dir, model, tokenizer, method, wandb_run, device, final_loss,
                          params_total, params_trainable, started)
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    return summary


def _finish(cfg: RootConfig, run_dir: Path, model, tokenizer, method, wandb_run, device: torch.device,
            final_loss: float | None, params_total: int, params_trainable: int, started: float) -> dict[str, Any]:
    """Export, evaluate and write ``summary.json``."""

    # ---------------------------------------------------------------- save
    model.eval()
    report = method.report(model)  # before export: export may merge or compact the adapters away
    exported = method.export(model, tokenizer, run_dir, cfg.model.name_or_path)

    # ---------------------------------------------------------------- evaluate
    eval_results: dict[str, dict[str, float]] = {}
    if cfg.eval.enabled:
        tasks = cfg.eval.tasks if cfg.eval.tasks is not None else cfg.task.eval_tasks
        eval_results = evaluate(model, tokenizer, tasks, cfg.eval, cfg.data, run_dir,
                                model_id=str(run_dir / "model"),
                                autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None,
                                progress=cfg.logging.progress)
        log_eval(wandb_run, eval_results, step=cfg.train.max_steps)

    summary = {
        "method": method.name,
        "model": cfg.model.name_or_path,
        "task": cfg.task.name,
        "steps": cfg.train.max_steps,
        "final_loss": final_loss,
        "params_total": params_total,
        "params_trainable": params_trainable,
        **report,
        **exported,
        "eval": eval_results,
        "wall_time_s": time.time() - started,
        "peak_memory_mb": peak_memory_mb(device),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _maybe_resume(run_dir: Path, model, optimizer, scheduler, batches, callbacks, writer) -> int:
    """Restore the newest checkpoint in ``run_dir`` if there is one; returns the completed step count."""
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return 0
    state = ckpt.load_checkpoint(latest)
    ckpt.load_adapter_state_dict(model, state[ckpt.ADAPTER_KEY])
    optimizer.load_state_dict(state[ckpt.OPTIMIZER_KEY])
    scheduler.load_state_dict(state[ckpt.SCHEDULER_KEY])
    batches.load_state_dict(state[ckpt.DATA_KEY])
    for cb, cb_state in zip(callbacks, state[ckpt.CALLBACKS_KEY], strict=True):
        cb.load_state_dict(cb_state)
    ckpt.set_rng_state(state[ckpt.RNG_KEY])
    step = int(state[ckpt.STEP_KEY])
    writer.truncate_after(step)
    log.info("resuming from %s (step %d)", latest, step)
    return step


def _last_logged_loss(metrics_path: Path) -> float | None:
    if not metrics_path.exists():
        return None
    lines = metrics_path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None
