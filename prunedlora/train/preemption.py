"""Preemption: turn SLURM's warning signals into "checkpoint at the next step boundary, then exit".

SLURM sends SIGTERM on preemption (SIGKILL follows after KillWait) and, with ``--signal``, SIGUSR1/SIGUSR2
ahead of the time limit; submitit uses SIGUSR2 to requeue its jobs. ``PreemptionGuard`` records the
signal, the training loop notices it after the current optimizer step, saves a checkpoint and raises
``Preempted``. The CLI then hands the signal to whichever handler was installed before ours (submitit's
requeue, when running under hydra-submitit-launcher), or exits with ``128 + signum`` so a plain
``sbatch`` script can requeue the job; the requeued job runs the same command and resumes.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised by the loop after it checkpointed in response to a preemption signal."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(f"preempted by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.step = step
        self.signum = signum


class PreemptionGuard:
    """Context manager that records preemption signals instead of dying on them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("received %s: checkpointing after the current step", signal.Signals(signum).name)
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> PreemptionGuard:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def forward(self, signum: int) -> None:
        """After checkpointing: let the previous handler act (submitit requeues), else exit 128+signum."""
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
        raise SystemExit(128 + signum)
