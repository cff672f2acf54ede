"""Preemption: turn SLURM's warning signals into "checkpoint at the next step boundary, then exit".

SLURM sends SIGTERM on preemption (SIGKILL follows after KillWait) and, with ``--signal``, SIGUSR1/SIGUSR2
ahead of the time limit; submitit uses SIGUSR2 to requeue its jobs. ``PreemptionGuard`` records the
signal, the training loop notices it after the current optimizer step, saves a checkpoint and raises
``Preempted``. The CLI then hands the signal to whichever handler was installed before ours (submitit's
requeue, when running under hydra-submitit-launcher), or exits with ``128 + signum`` so a plain
``sbatch`` script can requeue the job; the requeued job runs the same command and resumes.

Ctrl-C (SIGINT) is handled the same way: the step in progress finishes, a checkpoint is saved, one line
gives the command that resumes, and the process exits 130. A second Ctrl-C aborts at once (Python's
``KeyboardInterrupt``, reported by the CLI in one line, exit 130) without saving.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class Preempted(Exception):
    """Raised by the loop after it checkpointed in response to a preemption signal."""

    def __init__(self, step: int, signum: int) -> None:
        cause = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        super().__init__(f"interrupted by {cause} after step {step}; checkpoint saved")
        self.step = step
        self.signum = signum


def resume_command(run_dir: Path, argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same arguments, with the run directory made explicit.

    The default run directory carries the start time, so re-running the bare command would start afresh.
    """
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if not a.lstrip("+").startswith("hydra.run.dir=")]
    return shlex.join([Path(argv[0]).name, *args, f"hydra.run.dir={run_dir}"])


class PreemptionGuard:
    """Context manager that records preemption signals instead of dying on them."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
        if self.received is None:
            if signum == signal.SIGINT:
                log.warning("Ctrl-C: saving a checkpoint after the current step (Ctrl-C again aborts without saving)")
            else:
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
        """After checkpointing: let the previous handler act (submitit requeues), else exit 128+signum.

        SIGINT always exits 130: its previous handler is Python's, which would raise ``KeyboardInterrupt``.
        """
        previous = self._previous.get(signum)
        if callable(previous) and signum != signal.SIGINT:
            previous(signum, None)
        raise SystemExit(128 + signum)
