"""SALR (Zhang et al., AAAI 2026, arXiv 2601.16991; docs/methods.md §6): sparse base + SVD residual + task LoRA.

``attach`` prunes every target linear once, before training (docs/methods.md §7), by ``method.base_criterion``:
``magnitude`` (the paper's, ``prunedlora.pruning.magnitude``), ``wanda`` or ``sparsegpt``
(``prunedlora.pruning.activation_aware``, from one dense calibration pass over rows of the training data,
``prunedlora.pruning.calibration``; docs/methods.md Decisions item 0). Then the residual ``E = W0 - W_s`` in
float32, its rank-``r_res`` SVD as the trainable residual adapter, the pruned weight written in place (the
frozen base is never reshaped, Decisions item 5), and a ``SalrLinear`` around it. With
``model.quantization=nf4|fp4|int8`` the base was loaded in float (``quantizes_base``): the pruned linears are
quantized only now, so the residual comes from the float weights and the pruned entries stay exactly zero.
No callbacks: nothing changes during training.

This folder: ``config.py`` (options, registration), ``method.py`` (attach, report), ``export.py`` (``model/``,
``adapter/``, ``compressed/``: never merged, a dense ``BA`` would destroy the sparsity, §6.4 item 7) and ``formats.py``
(the base's formats in training; ``prunedlora.export.compressed.load_salr_export`` rebuilds a model from
``compressed/`` alone). The base
criteria are records of ``prunedlora.pruning.criteria.BASE_CRITERIA`` (``prunedlora.pruning.base_criteria``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.salr import SalrLinear, residual_factors, salr_modules
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods.base import AttachContext, Method
from prunedlora.methods.salr.config import SalrConfig
from prunedlora.methods.salr.export import SALR_FOLDERS, export_salr
from prunedlora.methods.salr.formats import BASE_FORMATS, sparse_base_weight
from prunedlora.models.quantize import quantize_linear
from prunedlora.models.surgery import replace_module, target_module_names
from prunedlora.pruning.base_criteria import pruned_weights
from prunedlora.pruning.calibration import InputStats, calibration_rows, collect_input_stats
from prunedlora.pruning.criteria import BASE_CRITERIA, CALIBRATION_NEEDS
from prunedlora.pruning.magnitude import sparsity_of

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- attach
def target_linears(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Module]:
    """Modules whose last name component is targeted (``all-linear``: every linear but ``lm_head``).

    Raises:
        ConfigError: nothing matches, or a target is not a float ``nn.Linear`` (a base quantized at load).
    """
    def candidate(module: nn.Module) -> bool:
        return hasattr(module, "in_features") and not isinstance(module, SalrLinear)

    targets = {name: model.get_submodule(name) for name in target_module_names(model, target_modules, candidate)}
    for name, module in targets.items():
        weight = getattr(module, "weight", None)
        if type(module) is not nn.Linear or weight is None or not weight.is_floating_point():
            raise ConfigError(
                f"salr prunes the base weight in place, but {name} is a {type(module).__name__}: packed "
                "quantized weights (bitsandbytes 4/8-bit) cannot be edited. With model.quantization=nf4|fp4|int8 "
                "the training recipe loads the base in float and salr quantizes it after pruning; load the model "
                "unquantized when attaching salr yourself (SalrMethod.prepare(quantization=...) quantizes it).")
    return targets


def _check_residual_rank(targets: dict[str, nn.Module], residual_rank: int) -> None:
    """The SVD residual rank must fit every target matrix (checked before anything is pruned)."""
    smallest = min(min(m.in_features, m.out_features) for m in targets.values())
    if residual_rank > smallest:
        name = next(n for n, m in targets.items() if min(m.in_features, m.out_features) == smallest)
        raise ConfigError(f"method.residual_rank={residual_rank} exceeds min(d_out, d_in)={smallest} of {name}; "
                          f"set it to at most {smallest}")


@torch.no_grad()
def sparsify_linear(linear: nn.Linear, sparse: torch.Tensor, residual_rank: int, svd: str
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Write the pruned weight ``sparse`` into ``linear`` and return the residual factors and their statistics.

    ``E = W0 - W_s`` is taken after the write, in the base's own dtype, so the adapter starts from exactly
    what pruning removed (for magnitude and Wanda the pruned entries; SparseGPT also moves the kept ones).

    Returns:
        ``B_res (d_out, r_res)``, ``A_res (r_res, d_in)`` (float32, docs/methods.md §6.2 item 3) and
        ``{"sparsity", "numel", "residual_norm2", "residual_error2"}``: ``‖E‖_F²`` and ``‖E - B_res A_res‖_F²``.
    """
    w0 = linear.weight.float()  # a copy unless the base is float32; then cloned below
    w0 = w0.clone() if w0.data_ptr() == linear.weight.data_ptr() else w0
    linear.weight.copy_(sparse)
    linear.weight.masked_fill_(sparse == 0, 0.0)  # +0.0 (never -0.0: the bitmap format would store it)
    e = w0 - linear.weight.float()  # (d_out, d_in)
    b_res, a_res = residual_factors(e, residual_rank, svd)
    stats = {"sparsity": sparsity_of(linear.weight), "numel": linear.weight.numel(),
             "residual_norm2": float(e.square().sum()), "residual_error2": float((e - b_res @ a_res).square().sum())}
    return b_res, a_res, stats


class SalrMethod(Method):
    """``method=salr`` (docs/methods.md §6.4). No callbacks: the base is pruned once, before training
    (docs/methods.md §7)."""

    cfg: SalrConfig
    quantizes_base = True
    """The recipe loads the base unquantized and hands ``model.quantization`` to ``prepare``: pruning needs float
    weights, so the pruned linears are quantized after ``attach`` prunes them."""

    def __init__(self, cfg: SalrConfig, sparsity: SparsityConfig) -> None:
        super().__init__(cfg, sparsity)
        self.base_sparsity = sparsity.final if cfg.pattern != "2:4" else 0.5
        self.init_stats: dict[str, dict[str, float]] = {}
        self.context = AttachContext()

    def prepare(self, context: AttachContext) -> None:
        """What ``attach`` needs beyond the model: calibration data (wanda, sparsegpt), the quantization."""
        if context.quantization != "none" and self.cfg.base_format != "dense":
            raise ConfigError(f"method.base_format={self.cfg.base_format} with model.quantization="
                              f"{context.quantization}: a quantized sparse base runs in bitsandbytes' own layers; use "
                              "method.base_format=dense")
        self.context = context

    def _calibration(self, model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, InputStats] | None:
        """The input statistics the base criterion needs (its record's calibration needs), from a calibration pass."""
        criterion, ctx = self.cfg.base_criterion, self.context
        needs = BASE_CRITERIA[criterion].needs & CALIBRATION_NEEDS
        if not needs or self.base_sparsity == 0:
            return None
        if not ctx.train_examples:
            without = " or ".join(c.name for c in BASE_CRITERIA if not c.needs & CALIBRATION_NEEDS)
            raise ConfigError(f"method.base_criterion={criterion} prunes from a calibration pass over training data, "
                              f"but none was given (SalrMethod.prepare); use method.base_criterion={without}, or "
                              "pass the training examples")
        rows = calibration_rows(ctx.train_examples, self.cfg.calibration_sequences, ctx.seq_len)
        return collect_input_stats(model, targets, rows, gram="input_gram" in needs)

    def attach(self, model: nn.Module) -> list[str]:
        """Calibrate (wanda, sparsegpt), prune, build the residual adapters, (quantize,) wrap; only the adapters
        stay trainable."""
        cfg, quantization = self.cfg, self.context.quantization
        targets = target_linears(model, cfg.target_modules)
        _check_residual_rank(targets, cfg.residual_rank)
        stats = self._calibration(model, targets)
        for param in model.parameters():
            param.requires_grad_(False)
        started, cpu = time.perf_counter(), time.process_time()
        weights = pruned_weights(targets, cfg.base_criterion, self.base_sparsity, cfg.scope, cfg.pattern, stats)
        for name, sparse in weights:
            linear = targets[name]
            b_res, a_res, self.init_stats[name] = sparsify_linear(linear, sparse, cfg.residual_rank, cfg.svd)
            base = quantize_linear(linear, quantization) if quantization != "none" else \
                BASE_FORMATS[cfg.base_format](linear)
            wrapper = SalrLinear(base, cfg.residual_rank, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
            wrapper.set_residual(b_res, a_res)
            wrapper.residual_A.weight.requires_grad_(cfg.residual_trainable)
            wrapper.residual_B.weight.requires_grad_(cfg.residual_trainable)
            replace_module(model, name, wrapper)
        if self.base_sparsity == 0 and cfg.residual_rank:
            log.warning("sparsity.final=0: the residual is zero, so the residual adapter stays zero")
        log.info("salr: pruned %d matrices to %.3f sparsity (%s, %s, %s; %.1f s wall, %.1f s CPU), residual rank %d, "
                 "task rank %d%s", len(targets), self._achieved(), cfg.base_criterion, cfg.scope, cfg.pattern,
                 time.perf_counter() - started, time.process_time() - cpu, cfg.residual_rank, cfg.rank,
                 f", base quantized to {quantization}" if quantization != "none" else "")
        return list(targets)

    def _achieved(self) -> float:
        numel = sum(s["numel"] for s in self.init_stats.values())
        return sum(s["sparsity"] * s["numel"] for s in self.init_stats.values()) / max(1, numel)

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Task LoRA with ``weight_decay``; the residual adapter without (decay erodes it, §6.4 item 4)."""
        residual = [p for n, p in model.named_parameters() if p.requires_grad and ".residual_" in n]
        task = [p for n, p in model.named_parameters() if p.requires_grad and ".residual_" not in n]
        groups = [{"params": task, "weight_decay": weight_decay}, {"params": residual, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def report(self, model: nn.Module) -> dict[str, Any]:
        return salr_report(model, self.init_stats)

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        return export_salr(model, tokenizer, out_dir, formats or tuple(SALR_FOLDERS))


# -------------------------------------------------------------------------------------------- report
def salr_report(model: nn.Module, init_stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Figures for ``summary.json``: ranks, achieved sparsity (overall and per matrix), residual recovery.

    ``residual_error_ratio`` is ``Σ‖E - E_r‖² / Σ‖E‖²`` at initialisation, the quantity bounded by
    ``1 - r/n`` per matrix (docs/methods.md §6.2 item 3).
    """
    wrappers = salr_modules(model)
    zeros = {name: int((sparse_base_weight(w.base_layer) == 0).sum()) for name, w in wrappers.items()}
    numel = {name: w.in_features * w.out_features for name, w in wrappers.items()}
    norm2 = sum(s["residual_norm2"] for s in init_stats.values())
    return {
        "ranks": {name: w.total_rank for name, w in wrappers.items()},
        "residual_rank": max((w.residual_rank for w in wrappers.values()), default=0),
        "sparsity": sum(zeros.values()) / max(1, sum(numel.values())),
        "sparsity_per_matrix": {name: zeros[name] / numel[name] for name in wrappers},
        "params_adapter_effective": sum(w.total_rank * (w.in_features + w.out_features) for w in wrappers.values()),
        "residual_error_ratio": sum(s["residual_error2"] for s in init_stats.values()) / norm2 if norm2 else 0.0,
    }
