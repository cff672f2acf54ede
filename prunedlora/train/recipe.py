"""The training recipe, top to bottom: setup -> train -> save -> evaluate -> summary.

``run`` is the only function that sees the whole config; it unpacks it and hands each component one
section or plain values. Under DeepSpeed (``distributed=deepspeed_zero2|3``, launched with ``torchrun``)
every rank runs this same function; only rank 0 writes the run directory, logs and evaluates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora import quiet
from prunedlora.config import ConfigError, RootConfig, TrainConfig
from prunedlora.data.batching import ResumableBatches, ShardedBatches, build_train_examples
from prunedlora.eval.runner import evaluate
from prunedlora.methods.base import AttachContext, Method
from prunedlora.methods.registry import build_method
from prunedlora.models.load import count_parameters, load_model, resolve_device
from prunedlora.train import checkpoint as ckpt
from prunedlora.train.checkpointer import Checkpointer
from prunedlora.train.engine import barrier, broadcast_from_rank0, build_engine, init_distributed
from prunedlora.train.loop import LoopContext, MetricsWriter, train_loop
from prunedlora.train.memory import peak_memory_mb, reset_peak_memory, resident_memory_mb
from prunedlora.train.nonfinite import NonFiniteGuard
from prunedlora.train.objective import Objective, build_held_teacher, build_objective, storage
from prunedlora.train.optim import build_optimizer, build_scheduler
from prunedlora.train.preemption import Preempted, PreemptionGuard, resume_command
from prunedlora.train.rundir import prepare_run_dir
from prunedlora.train.tracking import log_eval, start_wandb
from prunedlora.validation import validate

log = logging.getLogger(__name__)


def run(cfg: RootConfig, run_dir: Path) -> dict[str, Any]:
    """Train, export, evaluate and summarise one run in ``run_dir``; returns the summary dict."""
    validate(cfg)
    started = time.time()
    device = resolve_device(cfg.train.device)
    distributed = cfg.distributed.name != "none"
    rank, world = init_distributed(device) if distributed else (0, 1)
    is_main = rank == 0
    config_dict = asdict(cfg)
    # Under torchrun every rank resolved its own Hydra dir: rank 0's is the run's (pass hydra.run.dir).
    run_dir = _broadcast(run_dir, distributed)
    completed = _broadcast(_claim_run_dir(run_dir, config_dict) if is_main else None, distributed)
    if completed is not None:
        log.info("run in %s is already complete; nothing to do", run_dir)
        return completed
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)

    # ---------------------------------------------------------------- setup
    method = build_method(cfg.method, cfg.sparsity)
    model, tokenizer, examples = _load(cfg, method, device, run_dir=run_dir, is_main=is_main,
                                       wait=lambda: barrier(distributed), distills=cfg.recovery.distills)
    # A separate teacher is the base as loaded, before the method changes anything.
    held = build_held_teacher(cfg.model, cfg.recovery, device) \
        if cfg.recovery.distills and method.teacher_source == "copy" else None
    params_total, _ = count_parameters(model)
    params_trainable = _attach(method, model, cfg, device, params_total)
    batches = ResumableBatches(examples, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)
    if world > 1:
        batches = ShardedBatches(batches, rank, world)
    optimizer = build_optimizer(method.parameter_groups(model, cfg.train.weight_decay), cfg.train)
    objective = build_objective(cfg.recovery, method, model, held)
    engine = build_engine(cfg.train, cfg.distributed, model, optimizer, build_scheduler(optimizer, cfg.train),
                          device=device, world_size=world, objective=objective)
    callbacks = method.callbacks()
    wandb_run = start_wandb(cfg.logging, run_dir, config_dict, f"{method.name}-{cfg.model.name}-{run_dir.name}") \
        if is_main else None
    writer = MetricsWriter(run_dir / "metrics.jsonl" if is_main else None, wandb_run)
    nonfinite = NonFiniteGuard(cfg.train.skip_nonfinite, run_dir / "checkpoints")
    ctx = LoopContext(model, engine, batches, callbacks, writer, nonfinite, progress=cfg.logging.progress and is_main)
    checkpointer = Checkpointer(run_dir, ctx, config_dict, keep=cfg.train.keep_checkpoints, distributed=distributed,
                                is_main=is_main)
    start_step = checkpointer.resume()

    try:
        # ------------------------------------------------------------ train
        final_loss, memory = _train(ctx, cfg.train, run_dir, checkpointer.save, start_step)
        # ------------------------------------------------------------ save, evaluate (rank 0)
        if distributed:
            # Export from a plain copy on rank 0: full adapter weights gathered, no DeepSpeed hooks.
            adapter = ckpt.adapter_state_dict(model)
            model, method = _rebuild_on_rank0(cfg, adapter, device, run_dir) if is_main else (None, method)
        summary = _finish(cfg, run_dir, model, tokenizer, method, wandb_run, device,
                          {"final_loss": final_loss, "params_total": params_total,
                           "params_trainable": params_trainable, "started": started,
                           "recovery": _recovery_summary(cfg, method, objective), **memory}) if is_main else {}
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    barrier(distributed)
    return summary


def _train(ctx: LoopContext, train: TrainConfig, run_dir: Path, save: Callable[[int], None],
           start_step: int) -> tuple[float | None, dict]:
    """Train to ``train.max_steps``; on a preemption signal, checkpoint and hand the signal on (it exits).

    Returns the final loss and the memory figures: resident before training, and the training peak, measured from
    the start of training so that loading spikes do not count.
    """
    device = ctx.engine.device
    memory = {"memory_before_training_mb": resident_memory_mb(device)}  # model, adapters, optimizer, data
    reset_peak_memory(device)
    with PreemptionGuard() as guard:
        try:
            last = train_loop(ctx, train, save=save, start_step=start_step, preemption=guard)
        except Preempted as exc:
            log.warning("%s. To resume: %s", exc, resume_command(run_dir))
            guard.forward(exc.signum)  # submitit requeues, or exit 128+signum for sbatch scripts
    memory["peak_memory_mb"] = peak_memory_mb(device)
    final_loss = last.loss if last is not None else _last_logged_loss(run_dir / "metrics.jsonl")
    return final_loss, memory


def _finish(cfg: RootConfig, run_dir: Path, model: nn.Module, tokenizer: Any, method: Method, wandb_run: Any,
            device: torch.device, figures: dict[str, Any]) -> dict[str, Any]:
    """Export, evaluate and write ``summary.json`` (rank 0)."""
    # ---------------------------------------------------------------- save
    model.eval()
    report = method.report(model)  # before export: export may merge or compact the adapters away
    with quiet.deepspeed_left_unimported():  # save_pretrained would import DeepSpeed just to rule it out
        exported = method.export(model, tokenizer, run_dir, cfg.model.name_or_path, cfg.export.resolve(cfg.method))

    # ---------------------------------------------------------------- evaluate
    model.config.use_cache = True  # loaded for training without a KV cache; generation needs it
    eval_results: dict[str, dict[str, float]] = {}
    if cfg.eval.enabled:
        tasks = cfg.eval.tasks if cfg.eval.tasks is not None else cfg.task.eval_tasks
        eval_results = evaluate(model, tokenizer, tasks, cfg.eval, cfg.data, run_dir,
                                model_id=str(run_dir / "model"),
                                identity={"run_dir": str(run_dir.resolve()), "method": method.name,
                                          "base_model": cfg.model.name_or_path, "weights": "in-memory"},
                                autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None,
                                progress=cfg.logging.progress)
        log_eval(wandb_run, run_dir, eval_results, step=cfg.train.max_steps)

    summary = {
        "method": method.name,
        "model": cfg.model.name_or_path,
        "task": cfg.task.name,
        "steps": cfg.train.max_steps,
        "final_loss": figures["final_loss"],
        "recovery": figures["recovery"],
        "params_total": figures["params_total"],
        "params_trainable": figures["params_trainable"],
        **report,
        **exported,
        "eval": eval_results,
        "wall_time_s": time.time() - figures["started"],
        "memory_before_training_mb": figures["memory_before_training_mb"],
        "peak_memory_mb": figures["peak_memory_mb"],
        "peak_memory_with_export_and_eval_mb": peak_memory_mb(device),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wandb_run is not None:
        wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def _claim_run_dir(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | ConfigError | None:
    """``prepare_run_dir`` on rank 0; a refusal is returned, not raised, so it can reach every rank."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return prepare_run_dir(run_dir, config)
    except ConfigError as exc:
        return exc


def _load(cfg: RootConfig, method: Method, device: torch.device, *, run_dir: Path | None = None,
          is_main: bool = True, wait: Callable[[], None] = lambda: None,
          distills: bool = False) -> tuple[nn.Module, Any, list[dict]]:
    """Model, tokenizer and training rows; then the method's ``prepare`` (``Method``, methods/base.py).

    A method with ``quantizes_base`` (SALR prunes float weights) gets the base unquantized and quantizes it
    itself in ``attach``. The data order depends only on the seed, so a resumed run sees the same batches. ``run_dir``,
    ``is_main`` and ``wait`` (a barrier of every rank) go to the method's ``AttachContext``; ``distills``: the method
    is told how to store what its teacher needs (``AttachContext.teacher``).
    """
    late = method.quantizes_base
    model, tokenizer = load_model(replace(cfg.model, quantization="none") if late else cfg.model, device)
    examples = build_train_examples(cfg.task, cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed,
                                    cfg.train.packing)
    method.prepare(AttachContext(examples, cfg.train.seq_len, cfg.model.quantization if late else "none",
                                 teacher=storage(cfg.recovery) if distills else None,
                                 run_dir=run_dir, is_main=is_main, barrier=wait))
    return model, tokenizer, examples


def _recovery_summary(cfg: RootConfig, method: Method, objective: Objective) -> dict[str, Any]:
    """The objective for ``summary.json``: its option, α, T, and where the teacher was and what it held."""
    r = cfg.recovery
    summary: dict[str, Any] = {"objective": r.name, "alpha": r.alpha, "temperature": r.temperature}
    if objective.teacher is not None:
        held = objective.teacher.held_bytes()
        summary.update(teacher=method.teacher_source, teacher_held_mb=held / 2**20)
        if held:
            summary.update(teacher_dtype=r.teacher_dtype, teacher_offload=r.teacher_offload)
    return summary


def _attach(method: Method, model: nn.Module, cfg: RootConfig, device: torch.device, params_total: int) -> int:
    """Attach the method, move the model, turn on gradient checkpointing; returns the trainable parameter count."""
    adapted = method.attach(model)
    model.to(device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total, trainable = count_parameters(model)  # after the method: a one-shot cut has made the base smaller
    log.info("%s on %s: %d adapted modules, %d trainable of %d parameters (the base had %d)",
             method.name, cfg.model.name, len(adapted), trainable, total, params_total)
    return trainable


def _rebuild_on_rank0(cfg: RootConfig, adapter: dict[str, torch.Tensor], device: torch.device,
                      run_dir: Path) -> tuple[nn.Module, Method]:
    """A fresh model with the trained adapter state, outside DeepSpeed, for export and evaluation."""
    method = build_method(cfg.method, cfg.sparsity)
    model, _, _ = _load(cfg, method, device, run_dir=run_dir)  # rank 0 alone: no barrier, no teacher
    method.attach(model)
    ckpt.load_adapter_state_dict(model, adapter)
    return model.to(device), method


def _broadcast(obj: Any, distributed: bool) -> Any:
    """Rank 0's value on every rank; a ConfigError on rank 0 is raised on every rank."""
    obj = broadcast_from_rank0(obj, distributed)
    if isinstance(obj, ConfigError):
        raise obj
    return obj


def _last_logged_loss(metrics_path: Path) -> float | None:
    if not metrics_path.exists():
        return None
    lines = metrics_path.read_text().splitlines()
    return json.loads(lines[-1])["loss"] if lines else None
