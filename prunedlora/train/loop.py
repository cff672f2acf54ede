"""The training loop: short, flat, and the only place that decides what happens in a step.

One optimizer step = ``grad_accum`` micro-batches (forward, backward) -> callbacks'
``on_before_optimizer_step`` (pruning sees the complete, unclipped gradients) -> gradient clipping ->
``optimizer.step()`` -> scheduler -> callbacks' ``on_step_end`` -> ``zero_grad``. ``step`` counts
optimizer steps (1-based once taken); logs and checkpoints use it only.
"""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prunedlora.config import TrainConfig
from prunedlora.data.batching import ResumableBatches
from prunedlora.methods.base import Callback
from prunedlora.train.preemption import Preempted, PreemptionGuard


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    seconds: float


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (and to wandb when given a run)."""

    def __init__(self, path: Path, wandb_run: Any = None) -> None:
        self.path = path
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run redoes them."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast with float32 master weights, on CPU and CUDA alike."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def forward_backward(
    model: nn.Module, batch: dict[str, torch.Tensor], grad_accum: int, device: torch.device, bf16: bool
) -> tuple[float, int]:
    """One micro-batch: forward, loss scaled for accumulation, backward. Returns (loss, tokens)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast_context(device, bf16):
        loss = model(**batch).loss
    (loss / grad_accum).backward()
    # .item() is a host sync; one per micro-batch is what the progress bar and the log need anyway.
    return loss.item(), int(batch["attention_mask"].sum().item())


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    callbacks: list[Callback],
    step: int,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """Callbacks, clipping, update, callbacks, zero_grad. Returns the callbacks' figures and grad norm."""
    figures: dict[str, Any] = {}
    for cb in callbacks:
        figures.update(cb.on_before_optimizer_step(step))
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        figures["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    scheduler.step()
    for cb in callbacks:
        figures.update(cb.on_step_end(step))
    optimizer.zero_grad(set_to_none=True)
    return figures


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: ResumableBatches,
    callbacks: list[Callback],
    cfg: TrainConfig,
    *,
    device: torch.device,
    start_step: int,
    writer: MetricsWriter,
    save: Callable[[int], None],
    progress: bool = True,
    preemption: PreemptionGuard | None = None,
) -> StepResult | None:
    """Train from ``start_step`` (completed steps) to ``cfg.max_steps``; returns the last step's result.

    ``save(step)`` is called every ``cfg.save_every`` steps and after the last one. When ``preemption``
    has caught a signal, the loop saves after the current step and raises ``Preempted``.
    """
    model.train()
    for cb in callbacks:
        cb.on_train_start(model, optimizer, cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    last: StepResult | None = None
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        losses, tokens = [], 0
        for _ in range(cfg.grad_accum):
            loss, n = forward_backward(model, batches.next_batch(), cfg.grad_accum, device, cfg.bf16)
            losses.append(loss)
            tokens += n
        lr = optimizer.param_groups[0]["lr"]  # the rate this update uses, before the scheduler moves it
        figures = optimizer_step(model, optimizer, scheduler, callbacks, step, cfg.max_grad_norm)
        last = StepResult(step, sum(losses) / len(losses), tokens, time.perf_counter() - t0)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            writer.log({"step": step, "loss": last.loss, "lr": lr, "tokens_per_s": tokens / last.seconds,
                        "step_time_s": last.seconds, "peak_memory_mb": peak_memory_mb(device), **figures})
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
