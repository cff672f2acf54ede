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

``Method`` is the base class every method derives from: it holds the config and the sparsity schedule and
defines the members the recipe calls, with defaults where one exists. Two of them are for methods that need more
than the model at attach time (SALR): ``quantizes_base = True`` makes the recipe load the base unquantized and leave
``model.quantization`` to the method, and ``prepare(context: AttachContext)``, called before ``attach``, hands over
the training rows (calibration) and that quantization.

The teacher of a distilling run (``recovery.alpha < 1``, ``prunedlora.train.objective``) is the unpruned model, and
the method says where it is. ``teacher_source = "self"`` (the default): the training model itself is the teacher
inside ``teacher(model)``, a context manager that switches off what the method added (by default every adapter
wrapper is swapped for its base layer; a method that masks the base or replaced base weights overrides it), so
no copy is kept. ``teacher_source = "copy"``: the recipe loads a separate frozen copy of the base before ``attach``
(``recovery.teacher_dtype``, ``recovery.teacher_offload``), for a method whose training model is no longer the
unpruned one in any switchable way (compacted, or base weights edited in place). ``AttachContext.teacher`` tells
``prepare`` whether the run distills and how to store what the teacher needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.config import MethodConfig, SparsityConfig
from prunedlora.models.surgery import adapter_wrappers, swapped_modules

TEACHER_SOURCES = ("self", "copy")
"""``Method.teacher_source`` values (the class docstring of ``Method``)."""


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


@dataclass(frozen=True)
class TeacherStorage:
    """How teacher weights held beside the training model are stored (``recovery.teacher_*``)."""

    dtype: str = "bfloat16"
    """A ``torch`` dtype name: bfloat16, float32 or float16 (a quantized base's teacher is quantized instead)."""
    offload: bool = False
    """Keep them in CPU memory; each goes to the device only for its forward."""


@dataclass
class AttachContext:
    """What the recipe hands a method's optional ``prepare`` before ``attach``."""

    train_examples: list[dict] = field(default_factory=list)
    """Tokenized training rows (``{"input_ids", "labels"}``) in their seeded order, for calibration passes."""
    seq_len: int = 512
    """``train.seq_len``: the length of a calibration row."""
    quantization: str = "none"
    """``model.quantization`` for a method with ``quantizes_base`` (the model it gets is unquantized)."""
    teacher: TeacherStorage | None = None
    """Set when the run distills (``recovery.alpha < 1``): how to store teacher weights the method must hold (SALR:
    the dense weights it prunes). None: nothing is held, and ``Method.teacher`` may refuse."""
    run_dir: Path | None = None
    """The run directory, where a method may keep what it computed before training (LoRAPrune's one-shot base,
    ``checkpoints/pruned_base``) so that a resumed run rebuilds it instead of computing it again; None: nowhere."""
    is_main: bool = True
    """Whether this process writes the run directory (rank 0; every process when not distributed)."""
    barrier: Callable[[], None] = field(default=lambda: None)
    """Waits for every process of a distributed run (a no-op otherwise): what rank 0 wrote can then be read."""


class Method:
    """What the recipe needs from a method, with the defaults most methods keep.

    A method overrides ``attach`` and ``export`` (there is no sensible default) and whatever else it changes:
    ``prepare`` (SALR: calibration data), ``callbacks`` (the pruning methods), ``parameter_groups`` (LoRAPrune: the
    LoRA factors only; SALR: no decay on the residual), ``report`` (its figures for ``summary.json``).

    Args:
        cfg: the method's config (its schema in the registry, ``prunedlora.methods.registry``).
        sparsity: the ``sparsity`` group: what to prune and when (unused by methods that prune nothing).
    """

    quantizes_base: bool = False
    """True: the recipe loads the base unquantized and hands ``model.quantization`` to ``prepare`` (SALR prunes
    float weights and quantizes the pruned linears itself in ``attach``)."""
    teacher_source: str = "self"
    """Where a distilling run's teacher comes from: ``self`` (the training model inside ``teacher(model)``) or
    ``copy`` (a frozen copy of the base loaded by the recipe before ``attach``). A method whose answer depends on
    its config makes it a property."""

    def __init__(self, cfg: MethodConfig, sparsity: SparsityConfig) -> None:
        self.cfg = cfg
        self.sparsity = sparsity

    @property
    def name(self) -> str:
        """``method.name``."""
        return self.cfg.name

    def prepare(self, context: AttachContext) -> None:
        """Called by the recipe before ``attach``, with the training rows and the quantization; nothing by default."""

    def attach(self, model: nn.Module) -> list[str]:
        """Add adapters (and masks) to ``model``, freeze the base; returns the adapted module names."""
        raise NotImplementedError(f"{type(self).__name__} must define attach(model)")

    def callbacks(self) -> list[Callback]:
        """Callbacks for the training loop (none by default: nothing happens between steps)."""
        return []

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: by default one group of every trainable parameter."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    @contextmanager
    def teacher(self, model: nn.Module) -> Iterator[None]:
        """Inside: ``model`` computes the unpruned model's output (``teacher_source = "self"``).

        The default swaps every adapter wrapper (a module with a ``base_layer``: LoRA, DropLoRA, PrunedLoRA's rank
        masks, PEFT's AdaLoRA layers) for its base layer and puts it back on exit; forward hooks on the wrappers
        (structure masks, score captures) go with them. The caller runs the forward under ``no_grad`` in eval mode.
        A method that changed more than adding wrappers (masked or replaced base weights) overrides this.
        """
        with swapped_modules(model, {name: w.base_layer for name, w in adapter_wrappers(model).items()}):
            yield

    def teacher_held_bytes(self) -> int:
        """Bytes of teacher weights the method holds beside the model (``summary.json``); none by default."""
        return 0

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Figures for ``summary.json``: ``ranks``, ``sparsity``, ``params_effective`` where meaningful."""
        return {}

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        """Write the folders of ``formats`` (``export.formats``: hf -> ``model/``, adapter -> ``adapter/``, bitmap ->
        ``compressed/``; None: all the method writes) under ``out_dir``, with ``prunedlora.export``.

        May consume ``model`` (merging, compaction); returns figures for ``summary.json``, at least
        ``params_after_export`` and ``exports`` (``prunedlora.export.describe`` of each folder written).
        """
        raise NotImplementedError(f"{type(self).__name__} must define export(...)")
