"""The training loop: short, flat, and the only place that decides what happens in a step.

One optimizer step = ``grad_accum`` micro-batches (forward, backward) -> callbacks'
``on_before_optimizer_step`` (pruning sees the complete, unclipped gradients) -> gradient clipping ->
``optimizer.step()`` -> scheduler -> callbacks' ``on_step_end`` -> ``zero_grad``. A step whose loss or gradient
norm is not finite is never applied: the run stops (or skips it, ``nonfinite.py``). The engine
(``engine.py``) does the forward/backward and the update, in plain PyTorch or under DeepSpeed. ``step`` counts
optimizer steps (1-based once taken); logs and checkpoints use it only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from prunedlora.config import TrainConfig
from prunedlora.data.batching import ResumableBatches, ShardedBatches
from prunedlora.methods.base import Callback
from prunedlora.train.engine import Engine
from prunedlora.train.memory import peak_memory_mb
from prunedlora.train.nonfinite import NonFiniteGuard
from prunedlora.train.preemption import Preempted, PreemptionGuard

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (and to wandb when given a run).

    ``path=None`` writes nothing (ranks other than 0).
    """

    def __init__(self, path: Path | None, wandb_run: Any = None) -> None:
        self.path = path
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run redoes them. A line that does not parse (a record
        cut short when the run was killed mid-write) is dropped with a warning rather than stopping the resume."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not a complete record (the run was killed while writing it?): dropped",
                            self.path, number)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(_flatten_numbers(record, "train/"), step=record["step"])


def _flatten_numbers(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{"active_rank": {"q": 4}}`` -> ``{"train/active_rank/q": 4}``; non-numbers are dropped."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass
class LoopContext:
    """What the loop drives and where it reports, built once by the recipe's setup (or by a test)."""

    model: nn.Module
    engine: Engine
    batches: ResumableBatches | ShardedBatches
    callbacks: list[Callback]
    writer: MetricsWriter
    nonfinite: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    """What a step whose loss or gradient norm is not finite does (default: stop the run, ``TrainingDiverged``)."""
    progress: bool = True
    """Show a tqdm bar."""


def optimizer_step(engine: Engine, callbacks: list[Callback], step: int) -> dict[str, Any]:
    """Callbacks, update (clip, step, schedule), callbacks, zero_grad. Returns the figures to log."""
    figures: dict[str, Any] = {}
    for cb in callbacks:
        figures.update(cb.on_before_optimizer_step(step))
    figures.update(engine.optimizer_step())
    for cb in callbacks:
        figures.update(cb.on_step_end(step))
    engine.zero_grad()
    return figures


def guarded_optimizer_step(engine: Engine, callbacks: list[Callback], step: int,
                           loss: float, nonfinite: NonFiniteGuard) -> dict[str, Any]:
    """``optimizer_step``, unless the step is not finite: then ``nonfinite`` stops the run or skips the step."""
    if not math.isfinite(loss):  # before any callback or update sees this step's gradients
        figures = nonfinite.skip(step, loss)
        engine.skip_step()
        return figures
    figures = optimizer_step(engine, callbacks, step)
    grad_norm = figures.get("grad_norm", 0.0)
    if not math.isfinite(grad_norm):  # not applied by TorchEngine; DeepSpeed applied it, but cannot skip
        figures.update(nonfinite.skip(step, loss, grad_norm))
    return figures


def train_loop(ctx: LoopContext, cfg: TrainConfig, *, save: Callable[[int], None], start_step: int = 0,
               preemption: PreemptionGuard | None = None) -> StepResult | None:
    """Train from ``start_step`` (completed steps) to ``cfg.max_steps``; returns the last step's result.

    ``save(step)`` is called every ``cfg.save_every`` steps and after the last one. When ``preemption``
    has caught a signal, the loop saves after the current step and raises ``Preempted``. A step whose loss
    or gradient norm is not finite goes to ``ctx.nonfinite``.
    """
    engine, callbacks = ctx.engine, ctx.callbacks
    ctx.model.train()
    for cb in callbacks:
        cb.on_train_start(ctx.model, engine.optimizer, cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not ctx.progress,
               dynamic_ncols=True)
    last: StepResult | None = None
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        losses, tokens = [], 0
        for micro in range(cfg.grad_accum):
            loss, n = engine.micro_step(ctx.batches.next_batch(), boundary=micro == cfg.grad_accum - 1)
            losses.append(loss)
            tokens += n
        lr = engine.lr  # the rate this update uses, before the scheduler moves it
        last = StepResult(step, sum(losses) / len(losses), tokens, 0.0)
        figures = guarded_optimizer_step(engine, callbacks, step, last.loss, ctx.nonfinite)
        last.seconds = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            ctx.writer.log({"step": step, "loss": last.loss, "lr": lr, "tokens_per_s": tokens / last.seconds,
                            "step_time_s": last.seconds, "peak_memory_mb": peak_memory_mb(engine.device), **figures})
        bar.set_postfix(loss=f"{last.loss:.4f}", tok_s=f"{tokens / last.seconds:.0f}")
        bar.update(1)
        preempted = preemption is not None and preemption.requested
        if step % cfg.save_every == 0 or step == cfg.max_steps or preempted:
            save(step)
        if preempted:
            bar.close()
            raise Preempted(step, preemption.received)
    bar.close()
    return last
