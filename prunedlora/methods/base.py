"""The small interface every method plugs in through.

A method attaches itself to a loaded model (adapters, masks, sparse bases), hands the training loop a
list of callbacks, reports its figures (ranks, sparsity, effective parameters) and exports what a
user deploys. The training loop knows nothing else about methods.

Callback hooks are named after loop events and fire once per *optimizer* step, whatever the gradient
accumulation:

1. ``on_train_start(model, optimizer, max_steps)``: once, after the optimizer exists and any
   checkpoint was restored.
2. ``on_before_optimizer_step(step)``: gradients of the whole step are complete (accumulated over
   micro-batches, unscaled, unclipped). Pruning methods score, prune and re-mask weights, gradients and
   optimizer state here. ``step`` is the 1-based index of the optimizer step about to happen.
3. ``on_step_end(step)``: after ``optimizer.step()`` and before ``zero_grad()`` (AdaLoRA's allocation
   reads gradients here).

Hooks return a dict of figures to log (possibly empty); a callback owns its state and exposes it through
``state_dict`` / ``load_state_dict`` so checkpoints resume it exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Callback:
    """No-op base: subclasses override the hooks they need."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        """Called once before the first step (also after a resume)."""

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        """Gradients are complete; prune or re-mask here. Returns figures to log."""
        return {}

    def on_step_end(self, step: int) -> dict[str, Any]:
        """After the optimizer update, before gradients are cleared. Returns figures to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class Method(Protocol):
    """What the recipe needs from a method."""

    name: str

    def attach(self, model: nn.Module) -> list[str]:
        """Add adapters (and masks) to ``model``, freeze the base; returns the adapted module names."""
        ...

    def callbacks(self) -> list[Callback]:
        """Callbacks for the training loop (empty for plain LoRA)."""
        ...

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups over the trainable parameters."""
        ...

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Figures for ``summary.json``: ``ranks``, ``sparsity``, ``params_effective`` where meaningful."""
        ...

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str) -> dict[str, Any]:
        """Write ``adapter/`` (where the method has one) and ``model/`` under ``out_dir``.

        May consume ``model`` (merging, compaction); returns figures for ``summary.json``, at least
        ``params_after_export``.
        """
        ...


def default_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """One group of all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": weight_decay}]
