"""Where a micro-batch's forward/backward and the optimizer update happen: plain PyTorch or DeepSpeed.

The loop (``loop.py``) is the same for both; it calls ``micro_step`` per batch, runs the callbacks
between the last backward and ``optimizer_step``, then ``zero_grad``. The two engines differ in who
scales the loss for accumulation, clips, steps the scheduler and clears gradients:

- ``TorchEngine``: we do (loss / grad_accum, clip_grad_norm_, AdamW, LambdaLR, zero_grad after the
  ``on_step_end`` callbacks).
- ``DeepSpeedEngine``: DeepSpeed does all of it inside ``engine.backward`` / ``engine.step``, which must
  be called for every micro-batch; ``on_step_end`` therefore runs after DeepSpeed cleared the gradients.

Both satisfy the ``Engine`` protocol, which is all the loop and the checkpointer know of them. Both compute a
micro-batch's loss with the run's ``Objective`` (``objective.py``: the cross-entropy, or its mix with distillation
from the unpruned model) and report its terms with the step's figures.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from prunedlora.config import DistributedConfig, TrainConfig
from prunedlora.train.checkpoint import OPTIMIZER_KEY, SCHEDULER_KEY
from prunedlora.train.objective import Objective

DEEPSPEED_TAG = "deepspeed"


class Engine(Protocol):
    """What the loop and the checkpointer ask of an engine (``TorchEngine``, ``DeepSpeedEngine``)."""

    device: torch.device

    @property
    def optimizer(self) -> Any:
        """The optimizer the callbacks see (its ``param_groups`` and state: Adam moments to prune)."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        ...

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> tuple[float, int]:
        """Forward and backward of one micro-batch (``boundary``: the step's last); returns (loss, tokens)."""
        ...

    def optimizer_step(self) -> dict[str, float]:
        """Clip, update, advance the schedule; returns figures to log (``grad_norm``, the objective's terms)."""
        ...

    def skip_step(self) -> None:
        """Drop the step's gradients without an update (a non-finite step)."""
        ...

    def zero_grad(self) -> None:
        """Clear the gradients after the step's callbacks."""
        ...

    def save(self, directory: Path) -> dict[str, Any]:
        """Optimizer and schedule state for the checkpoint (or written into ``directory``)."""
        ...

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        """Restore what ``save`` saved."""
        ...


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast with float32 master weights, on CPU and CUDA alike."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TorchEngine:
    """Single-process PyTorch training.

    With ``compile_backend`` the training forward and backward run through ``torch.compile`` (``train.compile``).
    Only the engine's training call is compiled: ``model`` itself stays the plain module, so checkpoints, export and
    evaluation (generation with a growing KV cache would recompile at every length) see the same module as eager, and
    so does a distilling objective's teacher forward (``objective.py``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, grad_accum: int, max_grad_norm: float | None,
                 device: torch.device, bf16: bool, compile_backend: str | None = None,
                 objective: Objective | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.max_grad_norm, self.device, self.bf16 = grad_accum, max_grad_norm, device, bf16
        self.forward = torch.compile(model, backend=compile_backend) if compile_backend else model
        self.objective = objective or Objective()

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> tuple[float, int]:
        """Forward and backward of one micro-batch; returns (unscaled loss, non-pad tokens)."""
        batch = _to_device(batch, self.device)
        with autocast_context(self.device, self.bf16):
            loss = self.objective.loss(self.forward, self.model, batch)
        (loss / self.grad_accum).backward()
        # .item() is a host sync; one per micro-batch is what the progress bar and the log need anyway.
        return loss.item(), int(batch["attention_mask"].sum().item())

    def optimizer_step(self) -> dict[str, float]:
        """Clip, update, advance the schedule; a non-finite gradient norm is never applied (the loop then stops
        the run or counts the step as skipped)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        grad_norm = float(norm)  # the one host sync: logged, and decides whether the update is applied
        if math.isfinite(grad_norm):
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
            self.optimizer.step()
        self._advance_schedule()
        return {"grad_norm": grad_norm, **self.objective.take_figures()}

    def skip_step(self) -> None:
        """Drop this step's gradients without an update; the schedule still advances with the step count."""
        self.objective.take_figures()  # the skipped step's terms are not logged
        self.zero_grad()
        self._advance_schedule()

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # A skipped first step advances the schedule before any optimizer.step(): on purpose, not a misuse.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path) -> dict[str, Any]:
        """Optimizer and schedule state for the checkpoint dict (nothing is written to ``directory``)."""
        return {OPTIMIZER_KEY: self.optimizer.state_dict(), SCHEDULER_KEY: self.scheduler.state_dict()}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state[OPTIMIZER_KEY])
        self.scheduler.load_state_dict(state[SCHEDULER_KEY])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class DeepSpeedEngine:
    """Training under ``deepspeed.initialize`` (ZeRO-0..3); the DeepSpeed engine owns optimizer and schedule."""

    def __init__(self, engine: Any, *, device: torch.device, bf16_autocast: bool,
                 objective: Objective | None = None) -> None:
        self.engine = engine
        self.device = device
        self.bf16 = bf16_autocast
        self.objective = objective or Objective()

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> tuple[float, int]:
        batch = _to_device(batch, self.device)
        with autocast_context(self.device, self.bf16):
            # The teacher goes through the engine too: under ZeRO-3 its forward gathers the partitioned parameters.
            loss = self.objective.loss(self.engine, self.engine, batch)
        self.engine.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
        if not boundary:
            self.engine.step()  # only advances DeepSpeed's micro-step counter; the update waits for the boundary
        return loss.item(), int(batch["attention_mask"].sum().item())

    def optimizer_step(self) -> dict[str, float]:
        self.engine.step()  # clip, update, scheduler, zero_grad
        norm = self.engine.get_global_grad_norm()
        return {**({} if norm is None else {"grad_norm": float(norm)}), **self.objective.take_figures()}

    def zero_grad(self) -> None:
        """DeepSpeed already cleared the gradients in ``step``."""

    def skip_step(self) -> None:
        raise RuntimeError("DeepSpeed applies its update inside engine.step(); a step cannot be skipped "
                           "(config validation refuses train.skip_nonfinite with DeepSpeed)")

    def save(self, directory: Path) -> dict[str, Any]:
        """DeepSpeed's own checkpoint (trainable parameters, partitioned optimizer, schedule) in ``directory``.

        Collective: every rank calls it.
        """
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
        return {}

    def load(self, directory: Path, state: dict[str, Any]) -> None:
        self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]


# ------------------------------------------------------------------------------------ setup
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join (or, in a single process, create) the process group DeepSpeed needs; returns (rank, world size).

    Under ``torchrun`` the rendezvous comes from its environment; a plain single process gets a loopback
    group of one on a fresh port.
    """
    import os

    import deepspeed  # lazy: optional extra, slow to import

    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def release_between_jobs() -> None:
    """Free what one job of a one-process (basic launcher) multirun held before the next job starts.

    Model, optimizer and engine are locals of the recipe and go with it; cached GPU blocks are returned
    here. The DeepSpeed process group of a one-process run is kept and reused by the next job: DeepSpeed
    caches its communication backend, so a destroyed group could not be created again in this process.
    """
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def deepspeed_config(user: dict[str, Any], *, batch_size: int, grad_accum: int, max_grad_norm: float | None,
                     world_size: int) -> dict[str, Any]:
    """The user's DeepSpeed JSON with the batch keys filled from ``train`` (explicit user values win)."""
    config = dict(user)
    config.setdefault("train_micro_batch_size_per_gpu", batch_size)
    config.setdefault("gradient_accumulation_steps", grad_accum)
    config.setdefault("train_batch_size", batch_size * grad_accum * world_size)
    config.setdefault("gradient_clipping", max_grad_norm or 0.0)
    config.setdefault("zero_allow_untested_optimizer", True)  # our client torch AdamW
    config.setdefault("steps_per_print", 10**9)
    return config


def build_deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict[str, Any], *,
                           device: torch.device, bf16_autocast: bool,
                           objective: Objective | None = None) -> DeepSpeedEngine:
    """``deepspeed.initialize`` around our model, optimizer and schedule (after all parameters exist)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return DeepSpeedEngine(engine, device=device, bf16_autocast=bf16_autocast, objective=objective)


def build_engine(train: TrainConfig, distributed: DistributedConfig, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                 device: torch.device, world_size: int, objective: Objective | None = None) -> Engine:
    """The engine ``train`` and ``distributed`` ask for, around an existing model, optimizer and schedule
    (``objective``: the loss of a micro-batch; None: the model's cross-entropy)."""
    if distributed.name == "none":
        return TorchEngine(model, optimizer, scheduler, grad_accum=train.grad_accum,
                           max_grad_norm=train.max_grad_norm, device=device, bf16=train.bf16,
                           compile_backend=train.compile_backend if train.compile else None, objective=objective)
    config = deepspeed_config(distributed.deepspeed, batch_size=train.batch_size, grad_accum=train.grad_accum,
                              max_grad_norm=train.max_grad_norm, world_size=world_size)
    return build_deepspeed_engine(model, optimizer, scheduler, config, device=device, bf16_autocast=train.bf16,
                                  objective=objective)


def broadcast_from_rank0(obj: Any, distributed: bool) -> Any:
    """Rank 0's value of ``obj`` on every rank (``obj`` itself in a single process)."""
    if not distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(distributed: bool) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if distributed:
        import torch.distributed as dist

        dist.barrier()
