"""One-shot LoRAPrune (``sparsity.schedule=one_shot``): the whole cut before the first step, then LoRA trains the
smaller model.

In ``LoraPruneMethod.attach``, before any adapter exists:

1. ``channel_taylor`` (and ``activation_taylor``'s Taylor part): one forward and backward of the dense model over the
   calibration rows with ``TaylorCapture``'s probes on ``o_proj`` / ``down_proj`` (every parameter frozen for it,
   so no weight gradient exists): ``Σ_t g ⊙ h`` of the causal-LM loss per input feature.
2. Layer by layer over the prunable layers (``per_layer``: all but the exempt ones; ``uniform``: all), with
   ``pruning.sequential``'s driver when the criterion is calibrated or ``method.refit`` is on: the layer's scores,
   its cut to the final counts (``floor(final · units)`` per kind, or the uniform plan's), the re-fit of the kept
   columns of ``o_proj`` / ``down_proj`` against the layer's output before the cut, and the physical compaction of
   the layer (``pruning.structure.compact_layer``); the driver then runs the compacted layer, so the next layer is
   calibrated and re-fitted on what the pruned one feeds it.
3. The result is persisted once (``PrunedBase``); a quantized ``model.quantization`` is applied only now.

LoRA then attaches to the compacted model (no mask, no callback): every step costs what the smaller model costs. Its
export is the same ``pruned_llama`` (``per_layer``) or plain (``uniform``) checkpoint as the progressive schedule's.
``lora_guided`` and ``true_gradient`` cannot score before the first step (B = 0, no training gradient): the config
refuses them.

The persisted base (``checkpoints/pruned_base/``, written atomically before training starts, never rotated):
``plans.json`` (each pruned layer's kept heads, KV heads and channels, and a fingerprint of what decided them: the
method's and the sparsity's options, the calibration rows and the model's shape) and ``refit.safetensors`` (the
re-fitted ``o_proj`` / ``down_proj`` weights of the pruned layers). A resumed run, or the export that DeepSpeed
rebuilds on rank 0, loads the base model, compacts it by the plans and writes the re-fitted weights: the same tensors
bit for bit, without calibrating again. Under DeepSpeed rank 0 cuts and writes, the other ranks wait and load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.events import CALIBRATED_INPUTS, criterion_reads_rows
from prunedlora.methods.loraprune.refit import RefitFigures, RefitOptions, refit_projection
from prunedlora.methods.loraprune.selection import Selector, unit_keep
from prunedlora.methods.loraprune.uniform import UniformPlan
from prunedlora.models.quantize import quantize_linear
from prunedlora.models.surgery import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, projection, replace_module
from prunedlora.pruning.calibration import CALIBRATION_BATCH, InputStats
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.refit import kept_columns
from prunedlora.pruning.sequential import calibrate_layer_by_layer
from prunedlora.pruning.structure import (
    AttentionShape,
    LayerPlan,
    StructureMask,
    compact_layer,
    decoder_layers,
    intermediate_size,
    plan_layer,
)
from prunedlora.pruning.structured_criteria import TaylorCapture, channel_scores, combine_scores, head_scores

log = logging.getLogger(__name__)

PRUNED_BASE = "pruned_base"
"""The persisted base's folder under ``run_dir/checkpoints``."""
PLANS_FILE, REFIT_FILE = "plans.json", "refit.safetensors"


@dataclass
class OneShotCut:
    """What a one-shot cut did."""

    plans: dict[int, LayerPlan]
    """Each pruned layer's plan (kept indices of the original heads and channels)."""
    refitted: list[tuple[int, str]] = field(default_factory=list)
    """(layer, projection) whose kept columns were re-fitted."""
    figures: dict[str, Any] = field(default_factory=dict)


def needs_rows(cfg: LoraPruneConfig, one_shot: bool) -> bool:
    """Whether the cuts read calibration rows: the re-fit, or a criterion that scores from them
    (``events.criterion_reads_rows``)."""
    return cfg.refit or criterion_reads_rows(cfg.criterion, one_shot)


def taylor_sums(model: nn.Module, rows: torch.Tensor, layers: dict[int, nn.Module],
                batch_size: int = CALIBRATION_BATCH) -> dict[tuple[int, str], torch.Tensor]:
    """``Σ_t g ⊙ h`` per input feature of ``o_proj`` / ``down_proj`` of ``layers`` over the causal-LM loss of ``rows``,
    summed over batches (step 1 of the module docstring)."""
    capture = TaylorCapture(layers)
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)  # only the probes need a gradient: no d_out x d_in gradient is ever formed
        for batch in rows.split(batch_size):
            batch = batch.to(device)
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return capture.take()
    finally:
        capture.remove()
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def _layer_scores(cfg: LoraPruneConfig, i: int, layer: nn.Module, mask: StructureMask, stats: dict[str, InputStats],
                  taylor: dict | None) -> dict[str, torch.Tensor | None]:
    """Layer ``i``'s vectors by each part of the criterion, averaged for a combination."""
    parts = STRUCTURED_CRITERIA[cfg.criterion].parts
    vectors: dict[str, list] = {"heads": [], "channels": []}
    for name in parts:
        part = STRUCTURED_CRITERIA[name]
        if part.calibrated:
            scores = STRUCTURED_CRITERIA.function(name)(layer, stats, heads=cfg.prune_heads,
                                                        channels=cfg.prune_channels, power=cfg.score_power,
                                                        policy=cfg.gqa_policy)
        elif part.scores_groups:
            scores = TaylorCapture.layer_scores(taylor or {}, i, mask.shape, cfg)
        else:
            scores = {"heads": head_scores(layer.self_attn, mask.shape, name, cfg.score_power, cfg.gqa_policy),
                      "channels": channel_scores(layer.mlp, name, cfg.score_power)}
        for kind in vectors:
            vectors[kind].append(scores.get(kind))
    if len(parts) == 1:
        return {kind: found[0] for kind, found in vectors.items()}
    return {kind: combine_scores(found) for kind, found in vectors.items()}


def one_shot_cut(model: nn.Module, rows: torch.Tensor | None, cfg: LoraPruneConfig, plan: UniformPlan | None,
                 final: float, prunable: list[int]) -> OneShotCut:
    """Score, cut, re-fit and compact the prunable layers of ``model`` in place (module docstring, steps 1-2)."""
    started = time.perf_counter()
    layers = decoder_layers(model)
    device = layers[0].input_layernorm.weight.device
    masks = {i: StructureMask(AttentionShape.of(layers[i].self_attn), intermediate_size(layers[i].mlp)).to(device)
             for i in prunable}
    selector = Selector(cfg, plan, final)
    head_units, channels = selector.counts(final, masks[prunable[0]]) if prunable else (0, 0)
    parts = [STRUCTURED_CRITERIA[name] for name in STRUCTURED_CRITERIA[cfg.criterion].parts]
    taylor = taylor_sums(model, rows, {i: layers[i] for i in prunable}) \
        if prunable and any(p.scores_groups for p in parts) else None
    cut, refits, options = OneShotCut({}), RefitFigures(), RefitOptions.of(cfg)

    def on_layer(i: int, layer: nn.Module, stats: dict[str, InputStats]) -> bool:
        mask = masks[i]
        scores = _layer_scores(cfg, i, layer, mask, stats, taylor)
        for kind, like in (("heads", unit_keep(mask, cfg.gqa_policy)), ("channels", mask.channel_mask)):
            scores[kind] = torch.zeros_like(like) if scores.get(kind) is None else scores[kind]
        heads, chans = selector.select(mask, scores, head_units, channels)
        if cfg.refit:
            for name, changed, keep in (("o_proj", heads, kept_columns(mask.head_mask, mask.shape.head_dim)),
                                        ("down_proj", chans, kept_columns(mask.channel_mask, 1))):
                if changed:
                    refits.add(refit_projection(projection(layer, name), stats.pop(name).gram, keep, options))
                    cut.refitted.append((i, name))
        cut.plans[i] = plan_layer(mask.shape, mask.head_mask, mask.channel_mask)
        compact_layer(layer, cut.plans[i])
        return True

    if prunable and (cfg.refit or any(p.calibrated for p in parts)):
        calibrate_layer_by_layer(model, rows, CALIBRATED_INPUTS, on_layer, gram=cfg.refit, layers=prunable)
    else:
        with torch.no_grad():
            for i in prunable:
                on_layer(i, layers[i], {})
    cut.figures = {**refits.to_dict(), "one_shot_s": time.perf_counter() - started}
    log.info("loraprune one-shot: %d layers cut to %d head units and %d channels removed each%s in %.1f s",
             len(prunable), head_units, channels, f", {refits.refits} re-fits" if refits.refits else "",
             cut.figures["one_shot_s"])
    return cut


def quantize_decoder(model: nn.Module, quantization: str) -> None:
    """``model.quantization`` applied to the seven projections of every decoder layer (after the cut)."""
    for i, layer in enumerate(decoder_layers(model)):
        for name in ATTENTION_PROJECTIONS + MLP_PROJECTIONS:
            owner = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
            replace_module(layer, f"{owner}.{name}", quantize_linear(projection(layer, name), quantization))


def fingerprint(cfg: LoraPruneConfig, sparsity: SparsityConfig, rows: torch.Tensor | None, model: nn.Module) -> str:
    """What decides the cut: the options, the calibration rows and the model's shape and dtype."""
    config = model.config.to_dict()
    shape = {key: config.get(key) for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}
    rows_digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest() if rows is not None else None
    what = {"method": asdict(cfg), "sparsity": asdict(sparsity), "rows": rows_digest, "shape": shape,
            "dtype": str(next(model.parameters()).dtype)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class PrunedBase:
    """``run_dir/checkpoints/pruned_base/``: the one-shot cut, saved once and loaded on resume (module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "checkpoints" / PRUNED_BASE

    def exists(self) -> bool:
        return (self.path / PLANS_FILE).is_file()

    def save(self, model: nn.Module, cut: OneShotCut, digest: str) -> None:
        """Write the plans and the re-fitted weights into a staging folder, flush it, rename it into place."""
        layers = decoder_layers(model)
        tmp = self.path.with_name(f".tmp_{PRUNED_BASE}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = {f"{i}.{name}": projection(layers[i], name).weight.detach().cpu().contiguous()
                   for i, name in cut.refitted}
        save_file(weights, tmp / REFIT_FILE)
        plans = {"fingerprint": digest, "layers": {str(i): p.to_dict() for i, p in sorted(cut.plans.items())},
                 "refitted": [f"{i}.{name}" for i, name in cut.refitted], "figures": cut.figures}
        (tmp / PLANS_FILE).write_text(json.dumps(plans, indent=1) + "\n")
        for path in (tmp / REFIT_FILE, tmp / PLANS_FILE, tmp):
            _fsync(path)
        if self.path.exists():  # only ever a leftover of the same cut: load() refuses any other
            shutil.rmtree(self.path)
        tmp.rename(self.path)
        _fsync(self.path.parent)
        log.info("loraprune one-shot: pruned base saved in %s", self.path)

    def load(self, model: nn.Module, digest: str) -> OneShotCut:
        """Compact ``model`` (the unpruned base) by the saved plans and write the re-fitted weights.

        Raises:
            ConfigError: the folder was cut for another configuration, rows or model.
        """
        saved = json.loads((self.path / PLANS_FILE).read_text())
        if saved["fingerprint"] != digest:
            raise ConfigError(f"{self.path} holds a one-shot cut of another configuration, calibration data or model "
                              "than this run's; train this config in a new run directory (hydra.run.dir=<path>), "
                              "or move that folder away to cut again")
        layers = decoder_layers(model)
        cut = OneShotCut({int(i): LayerPlan(**p) for i, p in saved["layers"].items()}, figures=saved["figures"])
        for i, plan in cut.plans.items():
            compact_layer(layers[i], plan)
        weights = load_file(self.path / REFIT_FILE)
        with torch.no_grad():
            for key in saved["refitted"]:
                i, name = key.split(".", 1)
                projection(layers[int(i)], name).weight.copy_(weights[key])
                cut.refitted.append((int(i), name))
        log.info("loraprune one-shot: pruned base loaded from %s (no calibration)", self.path)
        return cut


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the files themselves were synced
        if not path.is_dir():
            raise
    finally:
        os.close(fd)
