"""A diverging run stops cleanly: no update, checkpoint or export is ever made from a non-finite state.

Three places look: the loop checks each step's loss before any callback or update sees its gradients; the
engine refuses to apply an update whose gradient norm is not finite; the checkpointer refuses to write a state
holding a non-finite tensor (a callback may have poisoned weights after a finite step). Each of them hands the
step to :class:`NonFiniteGuard`, which stops the run with :class:`TrainingDiverged` or, with
``train.skip_nonfinite=N``, drops up to N such steps. The newest checkpoint is then the last good state, and the
error names it: re-running the same command resumes from it (``train.skip_nonfinite`` may change between starts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from prunedlora.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the state to checkpoint stopped being finite; nothing was saved after it."""


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]


class NonFiniteGuard:
    """Stops the run at a non-finite step, or lets ``allowed`` of them be skipped (counted per start of the run)."""

    def __init__(self, allowed: int = 0, checkpoints: Path | None = None) -> None:
        self.allowed = allowed
        self.checkpoints = checkpoints
        self.skipped = 0

    def skip(self, step: int, loss: float, grad_norm: float | None = None) -> dict[str, Any]:
        """The figures to log for a skipped step; raises :class:`TrainingDiverged` when no skip is left."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4f})"
        if self.skipped >= self.allowed:
            raise TrainingDiverged(f"training diverged at step {step}: {what}. {self._advice()}")
        self.skipped += 1
        log.warning("step %d: %s is not finite; skipped without an update (%d of train.skip_nonfinite=%d)",
                    step, what, self.skipped, self.allowed)
        return {"nonfinite_skipped": self.skipped}

    def refuse_checkpoint(self, step: int, bad: list[str]) -> TrainingDiverged:
        """The error for a state that cannot be checkpointed (raised by the caller before anything is written)."""
        return TrainingDiverged(f"training diverged at step {step}: {len(bad)} tensor(s) of the state to checkpoint "
                                f"are not finite (first: {bad[0]}); not saved. {self._advice()}")

    def _advice(self) -> str:
        last = latest_checkpoint(self.checkpoints) if self.checkpoints is not None else None
        where = (f"The last good checkpoint is {last}; nothing was exported." if last is not None else
                 "No checkpoint was written before it; nothing was exported.")
        return (f"{where} Lower train.lr or raise train.warmup_ratio (a new run directory), or re-run the same "
                "command with train.skip_nonfinite=N to resume from the last good checkpoint and step past up to N "
                "such steps.")
