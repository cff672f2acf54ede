"""The run's checkpointer: it owns ``run_dir/checkpoints``, saving the whole training state and resuming from it.

``save(step)`` writes what ``checkpoint.py`` describes (adapter and masks, engine state, RNG, data position,
callback state, config) through a staging directory, and refuses a state that holds a non-finite tensor, so the last
good checkpoint is never rotated away by a diverged one. ``resume()`` restores the newest checkpoint that loads into
the same objects; a damaged newer one is named in the log and kept aside (``checkpoint.set_aside``), never deleted.
Under DeepSpeed every rank calls both (reading ZeRO-3 weights and DeepSpeed's own save are collective); only rank 0
writes ``state.pt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prunedlora.train import checkpoint as ckpt
from prunedlora.train.engine import barrier
from prunedlora.train.loop import LoopContext
from prunedlora.train.nonfinite import nonfinite_tensors

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores one run's training state (see the module docstring).

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints``).
        ctx: the loop's parts whose state a checkpoint holds (model, engine, batches, callbacks; the writer is
            truncated on resume, ``nonfinite`` refuses a poisoned state).
        config: the resolved config, saved with each checkpoint.
        keep: checkpoints kept on disk.
        distributed: every rank calls ``save`` and ``resume`` (collectives); ``is_main`` writes.
    """

    def __init__(self, run_dir: Path, ctx: LoopContext, config: dict[str, Any], *, keep: int, distributed: bool,
                 is_main: bool) -> None:
        self.root = run_dir / "checkpoints"
        self.ctx, self.config, self.keep, self.distributed, self.is_main = ctx, config, keep, distributed, is_main

    def save(self, step: int) -> None:
        ctx = self.ctx
        adapter = ckpt.adapter_state_dict(ctx.model)  # collective under ZeRO-3
        if bad := nonfinite_tensors(adapter):  # never let a poisoned state rotate the last good one away
            raise ctx.nonfinite.refuse_checkpoint(step, bad)
        staging = ckpt.staging_dir(self.root, step)
        state = {
            ckpt.STEP_KEY: step,
            ckpt.ADAPTER_KEY: adapter,
            **ctx.engine.save(staging),  # DeepSpeed writes its partitions here, every rank
            ckpt.RNG_KEY: ckpt.rng_state(),
            ckpt.DATA_KEY: ctx.batches.state_dict(),
            ckpt.CALLBACKS_KEY: [cb.state_dict() for cb in ctx.callbacks],
            ckpt.CONFIG_KEY: self.config,
        }
        barrier(self.distributed)
        if self.is_main:
            ckpt.commit_checkpoint(self.root, step, state, self.keep)

    def resume(self) -> int:
        """Restore the newest checkpoint that loads, if any; returns the completed step count (0 for a fresh run).

        Raises:
            CheckpointUnreadable: there are checkpoints and none of them loads.
        """
        found = ckpt.load_newest(self.root)
        if found is None:
            return 0
        latest, state, skipped = found
        for path, reason in skipped:  # only rank 0 renames; the others find the same checkpoint either way
            kept = ckpt.set_aside(path) if self.is_main else path
            log.warning("%s; skipped it (kept as %s) and resuming from the newest checkpoint that loads, %s",
                        reason, kept, latest.name)
        ctx = self.ctx
        # Under DeepSpeed its own checkpoint restores the trainable parameters; ours adds what it lacks (masks).
        ckpt.load_adapter_state_dict(ctx.model, state[ckpt.ADAPTER_KEY], trainable_too=not self.distributed)
        ctx.engine.load(latest, state)
        ctx.batches.load_state_dict(state[ckpt.DATA_KEY])
        for cb, cb_state in zip(ctx.callbacks, state[ckpt.CALLBACKS_KEY], strict=True):
            cb.load_state_dict(cb_state)
        ckpt.set_rng_state(state[ckpt.RNG_KEY])
        step = int(state[ckpt.STEP_KEY])
        ctx.writer.truncate_after(step)
        log.info("resuming from %s (step %d)", latest, step)
        return step
