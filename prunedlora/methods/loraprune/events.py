"""A progressive LoRAPrune event that needs a calibration pass: a calibrated criterion (``activation``,
``activation_taylor``) or ``method.refit``.

The event runs ``pruning.sequential.calibrate_layer_by_layer`` over the prunable layers of the current model (masks
and adapters on, evaluation mode, no gradient) with ``method.calibration_sequences`` rows of the training data. For
each layer in turn it collects the input statistics of ``o_proj`` and ``down_proj`` (their norms; with the re-fit
their Gram matrices too), scores the layer (``LoraPruneCallback.event_scores``: the calibrated scores of this pass,
the EMA of the per-step ones), cuts its masks to the event's counts, re-fits the kept columns of the projections whose
inputs lost columns (``refit.py``) and hands the layer back; the driver runs it again, so the next layer is
calibrated on what the cut layer now feeds it (SparseGPT's sequential order). Only one layer's statistics exist at a
time. Events at which the scheduled counts do not rise skip the pass.

Cost: about two forwards of the decoder over the calibration rows per event (one to collect, one to propagate each
cut layer; the LM head never runs); the README's LoRAPrune section gives the measured seconds. The re-fitted base
weights are kept in the callback's state (the checkpoint holds no base weight otherwise), so a resumed run continues
from them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunedlora.config import ConfigError
from prunedlora.methods.loraprune.config import SCORES_BEFORE_TRAINING_NEVER, LoraPruneConfig
from prunedlora.methods.loraprune.refit import RefitFigures, RefitOptions, refit_projection
from prunedlora.models.surgery import projection
from prunedlora.pruning.calibration import InputStats
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.refit import kept_columns
from prunedlora.pruning.sequential import calibrate_layer_by_layer
from prunedlora.pruning.structure import StructureMask, decoder_layers
from prunedlora.pruning.structured_criteria import base_linear

if TYPE_CHECKING:
    from prunedlora.methods.loraprune.callback import LoraPruneCallback

log = logging.getLogger(__name__)

CALIBRATED_INPUTS = ("o_proj", "down_proj")
"""The projections whose inputs an event calibrates: the groups' outputs (heads, channels)."""


def criterion_reads_rows(criterion: str, one_shot: bool) -> bool:
    """Whether ``criterion`` scores from the calibration rows: a calibrated one always; one-shot, also one captured
    from gradients (the cut has no training step: its backward pass runs over the rows)."""
    parts = [STRUCTURED_CRITERIA[name] for name in STRUCTURED_CRITERIA[criterion].parts]
    return any(p.calibrated or (one_shot and p.scores_groups) for p in parts)


def missing_calibration(cfg: LoraPruneConfig, one_shot: bool = False) -> ConfigError:
    """The refusal of a cut that reads calibration rows (``criterion_reads_rows``, ``method.refit``) but was given
    none; its fix names a criterion that reads none under the same schedule (the default when it does)."""
    wants = [f"method.criterion={cfg.criterion}"] if criterion_reads_rows(cfg.criterion, one_shot) else []
    wants += ["method.refit=true"] if cfg.refit else []
    free = [c.name for c in STRUCTURED_CRITERIA if not criterion_reads_rows(c.name, one_shot)
            and not (one_shot and c.needs & SCORES_BEFORE_TRAINING_NEVER)]
    fix = LoraPruneConfig.criterion if LoraPruneConfig.criterion in free else " or ".join(free)  # the default first
    schedule = "sparsity.schedule=one_shot" if one_shot else "a progressive schedule"
    return ConfigError(f"{' and '.join(wants)} with {schedule} calibrate on rows of the training data, but none "
                       "were given (the training recipe hands them to LoraPruneMethod.prepare; call it with "
                       "AttachContext(train_examples=..., seq_len=...) before attach); or use method.refit=false with "
                       f"method.criterion={fix}")


class EventPass:
    """The calibration pass of the events of one run (module docstring).

    Args:
        model: the model whose prunable layers carry ``masks``.
        masks: ``StructureMask`` by layer index.
        cfg: the method config (re-fit options, what is pruned).
        rows: ``(n, seq_len)`` calibration token ids.

    Raises:
        ConfigError: ``rows`` is None or empty (``missing_calibration``).
    """

    def __init__(self, model: nn.Module, masks: dict[int, StructureMask], cfg: LoraPruneConfig,
                 rows: torch.Tensor | None) -> None:
        if rows is None or rows.numel() == 0:
            raise missing_calibration(cfg)
        self.model, self.masks, self.cfg, self.rows = model, masks, cfg, rows
        self.options = RefitOptions.of(cfg)
        self.rewritten: set[tuple[int, str]] = set()
        """(layer, projection) whose base weight a re-fit has rewritten."""

    def run(self, callback: LoraPruneCallback, head_units: int, channels: int,
            optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Cut every masked layer to the counts, layer by layer; returns the event's figures."""
        started = time.perf_counter()
        figures = RefitFigures()

        def on_layer(i: int, layer: nn.Module, stats: dict[str, InputStats]) -> bool:
            mask = self.masks[i]
            scores = callback.event_scores(i, layer, stats)
            heads, chans = callback.selector.select(mask, scores, head_units, channels)
            if self.cfg.refit:
                for name, changed, keep in (("o_proj", heads, kept_columns(mask.head_mask, mask.shape.head_dim)),
                                            ("down_proj", chans, kept_columns(mask.channel_mask, 1))):
                    if changed:
                        figures.add(refit_projection(projection(layer, name), stats.pop(name).gram, keep,
                                                     self.options, optimizer))
                        self.rewritten.add((i, name))
            return heads or chans

        calibrate_layer_by_layer(self.model, self.rows, CALIBRATED_INPUTS, on_layer, gram=self.cfg.refit,
                                 layers=sorted(self.masks))
        seconds = time.perf_counter() - started
        log.info("loraprune event: calibration pass over %d x %d tokens%s in %.1f s", *self.rows.shape,
                 f", {figures.refits} re-fits" if figures.refits else "", seconds)
        return {**figures.to_dict(), "event_pass_s": seconds}

    # ---------------------------------------------------------------- the re-fitted base in the checkpoint
    def _weight(self, i: int, name: str) -> torch.Tensor:
        return base_linear(projection(decoder_layers(self.model)[i], name)).weight

    def rewritten_state(self) -> dict[str, torch.Tensor]:
        """The base weights the re-fits rewrote, by ``"<layer>.<projection>"``, on CPU."""
        return {f"{i}.{name}": self._weight(i, name).detach().cpu().clone() for i, name in sorted(self.rewritten)}

    @torch.no_grad()
    def load_rewritten(self, state: dict[str, torch.Tensor]) -> None:
        """Write back what ``rewritten_state`` returned (resume)."""
        for key, value in state.items():
            i, name = key.split(".", 1)
            self._weight(int(i), name).copy_(value)
            self.rewritten.add((int(i), name))
