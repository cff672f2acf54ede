"""DropLoRA (Zhang, arXiv 2508.17337; docs/methods.md §4): LoRA with a random mask between A and B.

``h = W0 x + s B (M ⊙ A dropout(x)) / (1 - p)`` in training, ``W0 x + s B A x`` at eval. Everything but
the training forward is plain LoRA: attach, report and export (``adapter/`` in PEFT LoRA format,
``model/`` merged) reuse ``prunedlora.methods.lora.method``.

``mask_mode=element`` (default, the authors' code) needs no callback: the mask is drawn per forward from
the global RNG, which checkpoints already save. ``mask_mode=rank`` keeps one mask per module per
optimizer step; ``RankMaskSampler`` draws it before the step's first micro-batch from its own generator,
whose state it checkpoints, so a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.droplora import RankDropout, bottleneck_dropout
from prunedlora.adapters.lora import lora_modules
from prunedlora.config import SparsityConfig
from prunedlora.methods.base import Callback, Method
from prunedlora.methods.droplora.config import DropLoraConfig
from prunedlora.methods.lora.method import attach_lora, export_lora, rank_report

# Added to the run's seed (torch.initial_seed()) so the rank-mask stream differs from the global one.
RANK_MASK_SEED_OFFSET = 0x5DEECE66D


class RankMaskSampler(Callback):
    """Redraws every ``RankDropout`` mask once per optimizer step (``mask_mode=rank``, docs/methods.md §4.2).

    The mask for step ``t`` must exist before step ``t``'s first forward, and no hook fires between
    ``zero_grad`` and the next forward, so masks are drawn in ``on_train_start`` (for the first step) and
    in ``on_step_end`` (for the next step). A checkpoint written after step ``t`` therefore holds, in the
    ``keep`` buffers, the masks of step ``t + 1`` and, here, the generator state after drawing them; on
    resume ``on_train_start`` keeps those masks instead of drawing new ones.

    Args:
        modules: the ``RankDropout`` modules, in model order (the order masks are drawn in).
        seed: seed of the dedicated CPU generator.
    """

    def __init__(self, modules: list[RankDropout], seed: int) -> None:
        self.modules = modules
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.drawn = False  # whether the keep buffers hold a mask drawn by this run (or a restored one)

    def resample(self) -> None:
        """Draw a new mask for every module, in model order, from the dedicated generator."""
        for module in self.modules:
            module.resample_(self.generator)
        self.drawn = True

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        if not self.drawn:
            self.resample()

    def on_step_end(self, step: int) -> dict[str, Any]:
        self.resample()  # the mask of step + 1; the last call draws one that is never used
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = bool(state["drawn"])


class DropLoraMethod(Method):
    """``method=droplora``: LoRA with inverted dropout (rate ``method.p``) on the rank bottleneck."""

    cfg: DropLoraConfig

    def __init__(self, cfg: DropLoraConfig, sparsity: SparsityConfig) -> None:
        super().__init__(cfg, sparsity)
        self._rank_modules: list[RankDropout] = []
        self._seed = 0

    def attach(self, model: nn.Module) -> list[str]:
        """Wrap the targets in LoRA (docs/methods.md §4.3) and put a mask module on every bottleneck."""
        names = attach_lora(model, self.cfg, self.cfg.rank)
        masks = [bottleneck_dropout(self.cfg.mask_mode, m.rank, self.cfg.p) for m in lora_modules(model).values()]
        for module, mask in zip(lora_modules(model).values(), masks):
            module.bottleneck = mask
        self._rank_modules = [mask for mask in masks if isinstance(mask, RankDropout)]
        # initial_seed() is the run's train.seed (set by the recipe) and reading it consumes no random numbers,
        # so the LoRA initialisation is the same in both mask modes and in plain LoRA.
        self._seed = (torch.initial_seed() + RANK_MASK_SEED_OFFSET) % 2**63
        return names

    def callbacks(self) -> list[Callback]:
        return [RankMaskSampler(self._rank_modules, self._seed)] if self._rank_modules else []

    def report(self, model: nn.Module) -> dict[str, Any]:
        return rank_report(model)

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        """Plain LoRA artifacts (docs/methods.md §4.4): the mask is the identity outside training."""
        return export_lora(model, tokenizer, out_dir, base_model_id, formats)
