"""PrunedLoRA (Yu et al., arXiv 2510.00192; docs/methods.md §3): start LoRA at rank r0, prune rank components
while training down to a target rank, and never bring them back.

The method in four steps (this folder: ``config.py`` the options, ``callback.py`` step 2, ``method.py`` the rest):

1. **Attach** (§3.3 steps 1-2). LoRA at ``r0 = method.init_rank`` on q, k, v, o with a rank mask per
   module (``LoRALinear.rank_mask``, all ones). The scaling is fixed at ``alpha / r0`` for the whole run
   (Decisions item 1). The target rank is ``method.rank`` if set, else ``r0 (1 - sparsity.final)``
   (``PrunedLoraConfig.final_rank``, logged at attach); the schedule ramps to ``1 - target / r0`` of r0 either
   way, so ``method.rank`` wins, and ``sparsity.final`` is never rewritten.
2. **Callback** (``callback.py``), in ``on_before_optimizer_step`` (complete, unclipped gradients of the step;
   §3.3 step 4): mask, and at a pruning event score the active components with the criterion's function
   (``prunedlora.pruning.criteria.RANK_CRITERIA``), choose the lowest per module (``allocation=uniform``) or
   across modules (``allocation=global``), apply the criterion's recovery update and clear their mask bits.

   The default ``criterion=obs`` is OBS on the adapter's output (docs/methods.md Decisions item 0, the
   erratum): ``H = E[z zᵀ]`` of the bottleneck ``z = m ⊙ A x`` over the tokens since the last event,
   ``S_j = ‖b_j‖² / [H⁻¹]_jj``, recovery on B only. ``criterion=obs_grad`` is the paper's gradient-Gram
   variant (§3.2), whose recovery moves one factor (``method.recovery_factor``; ``both`` reproduces the
   paper and double counts). The default schedule (``auto``) is ``geometric``: the same fraction of the
   remaining rank per event, the target reached by ``sparsity.end_frac`` (0.6) of the steps.
   With zero weight, gradient and moments, AdamW (decay included) leaves a pruned component at exactly
   zero, so nothing is ever reactivated.
3. **Report**: final rank per module, achieved sparsity (fraction of ``n_modules * r0`` pruned), r0 and
   the target.
4. **Export** (§3.5): the PEFT adapter with active ranks only (``lora_alpha`` rescaled, ``rank_pattern``
   when ranks differ), the merged model, and ``rank_allocation.png`` (layer × module heatmap).

Weights, gradients and Adam moments are read and written through ``prunedlora.distributed``, so the
callback runs unchanged under DeepSpeed ZeRO-2/3 (the slow tests check losses, ranks and the adapter
against plain PyTorch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import LoRALinear, lora_modules
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods.base import Callback, Method
from prunedlora.methods.lora.method import attach_lora, export_lora, rank_report
from prunedlora.methods.prunedlora.callback import BottleneckStats, PrunedLoraCallback
from prunedlora.methods.prunedlora.config import PrunedLoraConfig
from prunedlora.plots import rank_heatmap
from prunedlora.pruning.criteria import RANK_CRITERIA

log = logging.getLogger(__name__)

HEATMAP_FILE = "rank_allocation.png"


# ----------------------------------------------------------------------------------------- 1. attach
def check_rank_fits(modules: dict[str, LoRALinear], init_rank: int) -> None:
    """r0 must not exceed ``min(d_in, d_out)`` of any adapted module (§3.3; the extra ranks are void).

    Raises:
        ConfigError: naming every offending module, its shape and the largest r0 that fits.
    """
    too_small = {n: min(m.in_features, m.out_features) for n, m in modules.items()
                 if init_rank > min(m.in_features, m.out_features)}
    if too_small:
        limit = min(too_small.values())
        where = ", ".join(f"{n} (min(d_in, d_out)={d})" for n, d in too_small.items())
        raise ConfigError(f"method.init_rank={init_rank} exceeds min(d_in, d_out) of {where}; set method.init_rank "
                          f"to at most {limit} or drop these modules from method.target_modules")


# ----------------------------------------------------------------------------------------- method
class PrunedLoraMethod(Method):
    """``method=prunedlora``."""

    cfg: PrunedLoraConfig

    def __init__(self, cfg: PrunedLoraConfig, sparsity: SparsityConfig) -> None:
        super().__init__(cfg, sparsity)
        self.target = cfg.final_rank(sparsity.final)
        self._callback: PrunedLoraCallback | None = None

    def attach(self, model: nn.Module) -> list[str]:
        """LoRA at r0 with scaling alpha / r0 (§3.3 steps 1-2), then the pruning callback."""
        names = attach_lora(model, self.cfg, self.cfg.init_rank)
        modules = lora_modules(model)
        check_rank_fits(modules, self.cfg.init_rank)
        criterion = RANK_CRITERIA[self.cfg.criterion]
        stats = BottleneckStats(modules) if "bottleneck_gram" in criterion.needs else None
        self._callback = PrunedLoraCallback(modules, self.cfg, self.sparsity, self.target, stats)
        source = (f"method.rank={self.cfg.rank}, not sparsity.final={self.sparsity.final}" if self.cfg.rank is not None
                  else f"r0 (1 - sparsity.final={self.sparsity.final})")
        log.info("prunedlora: r0=%d -> target %d (%s: the schedule prunes %.4g of r0) by %s allocation, %s criterion, "
                 "scaling %.4g fixed", self.cfg.init_rank, self.target, source, self._callback.final,
                 self.cfg.allocation, self.cfg.criterion, next(iter(modules.values())).scaling)
        if self.cfg.newton_scale > 0 and self.cfg.recovery and "newton_scale" in criterion.options:
            log.warning("method.newton_scale=%g: the Newton term -nu H^-1 g scales like 1/|G| with a gradient-Gram "
                        "Hessian and can blow up (docs/methods.md §3.2); 0 is the validated default",
                        self.cfg.newton_scale)
        return names

    def callbacks(self) -> list[Callback]:
        if self._callback is None:
            raise RuntimeError("PrunedLoraMethod.callbacks() called before attach()")
        return [self._callback]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """``ranks``, ``params_adapter_effective``, ``sparsity`` (fraction of n r0 pruned), r0, target."""
        report = rank_report(model)
        ranks = report["ranks"]
        report["sparsity"] = 1.0 - sum(ranks.values()) / (len(ranks) * self.cfg.init_rank)
        report["init_rank"] = self.cfg.init_rank
        report["target_rank"] = self.target
        return report

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        """Heatmap of the final ranks, then the active-rank PEFT adapter and the merged model (§3.5)."""
        ranks = {name: m.active_rank for name, m in lora_modules(model).items()}
        title = f"PrunedLoRA final ranks: r0={self.cfg.init_rank}, target {self.target}, {self.cfg.allocation}"
        rank_heatmap(ranks, out_dir / HEATMAP_FILE, title, max_rank=self.cfg.init_rank)
        return export_lora(model, tokenizer, out_dir, base_model_id, formats)
