"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from prunedlora.config import ConfigError, TrainConfig


def _adamw(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


def _adamw8bit(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb  # lazy: heavy, optional
    except ImportError as exc:
        raise ConfigError(
            "train.optimizer=adamw8bit needs bitsandbytes; install the extra with "
            "`pip install 'prunedlora[bnb]'` or use train.optimizer=adamw."
        ) from exc
    return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps)


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
}


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer`` over the method's parameter groups."""
    return OPTIMIZERS[cfg.optimizer](groups, cfg)


def _decay(name: str, progress: float) -> float:
    """Multiplier after warm-up; ``progress`` runs from 0 to 1."""
    schedules = {
        "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
        "linear": lambda p: 1.0 - p,
        "constant": lambda p: 1.0,
    }
    return schedules[name](progress)


def warmup_steps(cfg: TrainConfig) -> int:
    return int(math.ceil(cfg.warmup_ratio * cfg.max_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine, linear or constant to the end."""
    warmup = warmup_steps(cfg)
    decay_steps = max(1, cfg.max_steps - warmup)

    def multiplier(step: int) -> float:
        # LambdaLR calls this with the number of completed steps: step 0 is the first update.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return _decay(cfg.scheduler, min(1.0, (step - warmup) / decay_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
