"""PrunedLoRA (Yu et al., arXiv 2510.00192; methods.md §3): start LoRA at rank r0, prune rank components
while training down to a target rank, and never bring them back.

The method in four steps, as this file reads:

1. **Attach** (§3.3 steps 1-2). LoRA at ``r0 = method.init_rank`` on q, k, v, o with a rank mask per
   module (``LoRALinear.rank_mask``, all ones). The scaling is fixed at ``alpha / r0`` for the whole run
   (Decisions item 1). The target rank is ``method.rank`` if set, else ``r0 (1 - sparsity.final)``;
   the schedule's final fraction is ``1 - target / r0`` either way, so ``method.rank`` wins.
2. **Callback**, in ``on_before_optimizer_step`` (complete, unclipped gradients of the step; §3.3 step 4):
   (i) mask A's rows, B's columns and their gradients; (ii) at a pruning event (step ``k * every``,
   ``k >= 1``; never step 0) where the schedule asks for more sparsity, score the active components
   (``prunedlora.pruning.rank_criteria``), choose the lowest per module (``allocation=uniform``) or
   across modules (``allocation=global``), apply the recovery update and clear their mask bits; (iii)
   zero their slices of Adam's ``exp_avg``/``exp_avg_sq`` and re-mask weights and gradients before the
   update (§3.3 step 4.3, §8 item 6). ``on_step_end`` re-masks the weights.

   The default ``criterion=obs`` is OBS on the adapter's output (methods.md Decisions item 0, the
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.lora import LoRALinear, lora_modules
from prunedlora.config import ConfigError, PrunedLoraConfig, SparsityConfig
from prunedlora.distributed import (
    full_grad,
    full_param,
    is_deepspeed_param,
    optimizer_state,
    set_full_grad,
    set_full_param,
    set_optimizer_state,
)
from prunedlora.methods.base import Callback, default_parameter_groups
from prunedlora.methods.lora import attach_lora, export_lora, rank_report
from prunedlora.plots import rank_heatmap
from prunedlora.pruning.rank_criteria import (
    ABSOLUTE_CRITERIA,
    CRITERIA,
    lowest,
    obs_prune,
    output_hessian_inverse,
    output_obs_prune,
    select_global,
)
from prunedlora.pruning.schedules import is_event, target_fraction

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = "geometric"
"""What ``sparsity.schedule=auto`` means for PrunedLoRA: the same fraction of the remaining rank every K1 = every
steps, the target reached by ``sparsity.end_frac`` of the steps (the paper's K2-per-event is ``constant``)."""
STATS_CRITERIA = ("obs", "activation")
"""Criteria that read the bottleneck statistics (the forward hooks are registered for these only)."""
HEATMAP_FILE = "rank_allocation.png"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
"""Per-parameter AdamW state whose pruned slices are zeroed (methods.md §8 item 6)."""


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


def sparsity_for_target(sparsity: SparsityConfig, init_rank: int, target: int) -> SparsityConfig:
    """The schedule with ``final = 1 - target / r0`` (and ``initial`` capped at it): the target rank wins."""
    final = 1.0 - target / init_rank
    return replace(sparsity, final=final, initial=min(sparsity.initial, final))


class BottleneckStats:
    """Token statistics of the bottleneck ``z = m ⊙ A x`` for ``criterion=obs`` and ``activation``.

    A forward hook on every ``LoRALinear.bottleneck`` adds ``Σ_tokens z zᵀ`` (r0, r0; float64, the whole
    matrix, as output-OBS needs the correlations between components) and the token count in training mode,
    over all micro-batches since the last event; the callback clears them after each event. Its diagonal is
    the ``Σ z²`` behind ``criterion=activation``. Padding tokens count too (the hook cannot see the
    attention mask). Registered only for these criteria, so the others pay nothing.
    """

    def __init__(self, modules: dict[str, LoRALinear]) -> None:
        self.gram_sum = {n: torch.zeros(m.rank, m.rank, dtype=torch.float64, device=m.rank_mask.device)
                         for n, m in modules.items()}
        self.tokens = dict.fromkeys(modules, 0)
        self.handles = [m.bottleneck.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module.training:
                z = inputs[0].detach()  # (..., r0), already masked
                z = z.reshape(-1, z.shape[-1]).double()
                self.gram_sum[name] += z.mT @ z
                self.tokens[name] += z.shape[0]  # Python int: no host sync
        return hook

    def gram(self, name: str) -> torch.Tensor:
        """(r0, r0) ``E[z zᵀ]`` over the tokens seen since the last event."""
        return self.gram_sum[name] / max(self.tokens[name], 1)

    def rms(self, name: str) -> torch.Tensor:
        """(r0,) root-mean-square of ``(A x)_j`` over the tokens seen since the last event."""
        return self.gram(name).diagonal().sqrt()

    def clear(self) -> None:
        for buf in self.gram_sum.values():
            buf.zero_()
        self.tokens = dict.fromkeys(self.tokens, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"gram_sum": {n: t.cpu().clone() for n, t in self.gram_sum.items()}, "tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, buf in self.gram_sum.items():
            buf.copy_(state["gram_sum"][name])
        self.tokens = dict(state["tokens"])


# ------------------------------------------------------------------------------------ 2. allocation
def uniform_plan(active: dict[str, int], r0: int, target: int, min_rank: int,
                 fraction: float) -> tuple[dict[str, int], int]:
    """Every module keeps ``max(target, r0 - round(fraction r0))``; returns (per-module removals, total)."""
    keep = max(target, r0 - round(fraction * r0))
    capacity = {name: rank - keep for name, rank in active.items() if rank > keep}
    return capacity, sum(capacity.values())


def global_plan(active: dict[str, int], r0: int, target: int, min_rank: int,
                fraction: float) -> tuple[dict[str, int], int]:
    """One budget: keep ``max(n target, n r0 - round(fraction n r0))`` overall (§8 item 3).

    Returns (how many each module may lose before its ``min_rank`` floor, total to remove now).
    """
    n = len(active)
    keep_total = max(n * target, n * r0 - round(fraction * n * r0))
    budget = max(0, sum(active.values()) - keep_total)
    capacity = {name: rank - min_rank for name, rank in active.items() if rank > min_rank} if budget else {}
    return capacity, budget


def uniform_select(saliencies: dict[str, torch.Tensor], capacity: dict[str, int], budget: int,
                   relative: bool = True) -> dict[str, list[int]]:
    """The ``capacity[m]`` lowest saliencies of each module, lowest first (``relative`` cannot change an order
    within one module; it is accepted so both allocations share one signature)."""
    return {name: lowest(s, capacity[name]) for name, s in saliencies.items()}


ALLOCATIONS = {
    "uniform": (uniform_plan, uniform_select),
    "global": (global_plan, select_global),
}


# -------------------------------------------------------------------------------------- 2. callback
# Tensors are read and written through prunedlora.distributed, so the same code runs in plain PyTorch
# (where these are the parameter, its .grad and optimizer.state) and under DeepSpeed ZeRO.
def _zero_slices(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, index: torch.Tensor, dim: int) -> None:
    """Zero ``index`` along ``dim`` of the parameter's Adam moments; no state yet (step 1) is fine."""
    for key in ADAM_MOMENTS if optimizer is not None else ():
        state = optimizer_state(optimizer, param, key)
        if state is not None:
            set_optimizer_state(optimizer, param, key, state.index_fill(dim, index.to(state.device), 0.0))


def _multiply(param: nn.Parameter, factor: torch.Tensor, grads: bool) -> None:
    """``param *= factor`` (and its gradient), broadcasting ``factor``."""
    if not is_deepspeed_param(param):  # plain PyTorch: in place, no copies (this runs every step)
        param.data.mul_(factor)
        if grads and param.grad is not None:
            param.grad.mul_(factor)
        return
    set_full_param(param, full_param(param) * factor)
    grad = full_grad(param) if grads else None
    if grad is not None:
        set_full_grad(param, grad * factor)


class PrunedLoraCallback(Callback):
    """Masks, schedules and prunes the rank components of every adapter (methods.md §3.3 step 4).

    Args:
        modules: the LoRA wrappers by name, at rank r0.
        cfg: the method config (criterion, allocation, min_rank, damping, recovery, recovery_factor).
        sparsity: the schedule, with ``final`` already set to ``1 - target / r0``.
        target: the final rank per module (uniform) or on average (global).
        stats: bottleneck statistics (``criterion=obs`` and ``activation`` only).
    """

    def __init__(self, modules: dict[str, LoRALinear], cfg: PrunedLoraConfig, sparsity: SparsityConfig,
                 target: int, stats: BottleneckStats | None = None) -> None:
        self.modules, self.cfg, self.sparsity, self.target, self.stats = modules, cfg, sparsity, target, stats
        self.r0 = cfg.init_rank
        self.optimizer: torch.optim.Optimizer | None = None
        self.max_steps = 1
        self.active = {name: m.active_rank for name, m in modules.items()}  # host-side copy: no per-step sync
        self.events = 0
        self.last_event_step = 0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.optimizer, self.max_steps = optimizer, max_steps
        self.active = {name: m.active_rank for name, m in self.modules.items()}  # masks may come from a checkpoint
        reached = target_fraction(self.sparsity, max_steps, max_steps, units=self.r0, default=DEFAULT_SCHEDULE)
        if reached < self.sparsity.final - 1e-9:
            log.warning("prunedlora: the sparsity schedule prunes %.3g of r0=%d by train.max_steps=%d, short of "
                        "the target rank %d (%.3g); raise train.max_steps or sparsity.per_event, or lower "
                        "sparsity.every", reached, self.r0, max_steps, self.target, self.sparsity.final)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        self._mask(grads=True)  # (i)
        fraction = target_fraction(self.sparsity, step, self.max_steps, units=self.r0, default=DEFAULT_SCHEDULE)
        pruned = self._prune(fraction) if is_event(self.sparsity, step) else {}  # (ii)
        if pruned:
            self.events, self.last_event_step = self.events + 1, step
            self._mask(grads=True)  # (iii) newly pruned slices: weights and gradients, before the update
        if is_event(self.sparsity, step) and self.stats is not None:
            self.stats.clear()
        return self._figures(fraction, sum(len(v) for v in pruned.values()))

    def on_step_end(self, step: int) -> dict[str, Any]:
        self._mask(grads=False)  # belt and braces: the update moved nothing, but masks are the contract
        return {}

    # -------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def _mask(self, grads: bool) -> None:
        """Multiply A's rows and B's columns (and their gradients) by the mask; skip unpruned modules."""
        for name, module in self.modules.items():
            if self.active[name] == self.r0:
                continue
            mask = module.rank_mask  # (r0,)
            _multiply(module.lora_A.weight, mask[:, None], grads)  # A (r0, d_in): rows
            _multiply(module.lora_B.weight, mask[None, :], grads)  # B (d_out, r0): columns

    @torch.no_grad()
    def _prune(self, fraction: float) -> dict[str, torch.Tensor]:
        """One pruning event; returns module name -> pruned component indices (global, in r0)."""
        plan, select = ALLOCATIONS[self.cfg.allocation]
        capacity, budget = plan(self.active, self.r0, self.target, self.cfg.min_rank, fraction)
        if budget == 0:
            return {}
        slices = {name: self._active_slices(name) for name in capacity}
        saliencies = {name: self._saliency(name, *sl) for name, sl in slices.items()}
        # Output-OBS saliencies are output errors (the scaling s = alpha / r0 is shared by every module), so a
        # global budget compares them as they are; the other criteria are divided by their module's mean.
        chosen = select(saliencies, capacity, budget, relative=self.cfg.criterion not in ABSOLUTE_CRITERIA)
        return {name: self._remove(name, order, *slices[name]) for name, order in chosen.items() if order}

    def _active_slices(self, name: str) -> tuple[torch.Tensor, ...]:
        """(S, B[:, S], A[S], G_B[:, S], G_A[S]) with S the active indices (r',)."""
        module = self.modules[name]
        idx = module.active_indices()  # (r',)
        a, b = full_param(module.lora_A.weight), full_param(module.lora_B.weight)  # (r0, d_in), (d_out, r0)
        g_a, g_b = full_grad(module.lora_A.weight), full_grad(module.lora_B.weight)
        g_a = g_a if g_a is not None else torch.zeros_like(a)
        g_b = g_b if g_b is not None else torch.zeros_like(b)
        return idx, b[:, idx], a[idx], g_b[:, idx], g_a[idx]

    def _saliency(self, name: str, idx: torch.Tensor, B: torch.Tensor, A: torch.Tensor, G_B: torch.Tensor,
                  G_A: torch.Tensor) -> torch.Tensor:
        return CRITERIA[self.cfg.criterion](B, A, G_B, G_A, damping=self.cfg.damping,
                                            rel_damping=self.cfg.rel_damping, **self._stats(name, idx))  # (r',)

    def _stats(self, name: str, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bottleneck statistics of the active set: ``gram`` (r', r') and ``act_rms`` (r',)."""
        if self.stats is None:
            return {}
        if self.stats.tokens[name] == 0:
            raise RuntimeError(f"prunedlora: no training tokens reached {name} since the last event, so "
                               f"criterion={self.cfg.criterion} has no bottleneck statistics")
        gram = self.stats.gram(name)[idx][:, idx]
        return {"gram": gram, "act_rms": gram.diagonal().sqrt()}

    def _remove(self, name: str, order: list[int], idx: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                G_B: torch.Tensor, G_A: torch.Tensor) -> torch.Tensor:
        """Recovery (obs, obs_grad), clear mask bits, zero Adam moments; returns the pruned r0-indices."""
        module = self.modules[name]
        if self.cfg.recovery and self.cfg.criterion == "obs":  # B re-fit on the output; A's rows only masked
            h_inv = output_hessian_inverse(self._stats(name, idx)["gram"], self.cfg.rel_damping)
            b_full = full_param(module.lora_B.weight).clone()
            b_full[:, idx] = output_obs_prune(B, h_inv, order).to(B.dtype)  # (d_out, r')
            set_full_param(module.lora_B.weight, b_full)
        elif self.cfg.recovery and self.cfg.criterion == "obs_grad":
            b_new, a_new = obs_prune(B, A, G_B, G_A, order, self.cfg.newton_scale, self.cfg.damping,
                                     self.cfg.recovery_factor)
            b_full, a_full = full_param(module.lora_B.weight).clone(), full_param(module.lora_A.weight).clone()
            b_full[:, idx], a_full[idx] = b_new.to(B.dtype), a_new.to(A.dtype)  # (d_out, r'), (r', d_in)
            set_full_param(module.lora_B.weight, b_full)
            set_full_param(module.lora_A.weight, a_full)
        gone = idx[torch.tensor(order, device=idx.device)]  # (k,) indices in r0
        module.rank_mask[gone] = 0.0
        _zero_slices(self.optimizer, module.lora_A.weight, gone, dim=0)
        _zero_slices(self.optimizer, module.lora_B.weight, gone, dim=1)
        self.active[name] -= len(order)
        return gone

    def _figures(self, fraction: float, pruned: int) -> dict[str, Any]:
        ranks = list(self.active.values())
        actual = 1.0 - sum(ranks) / (len(ranks) * self.r0)
        figures: dict[str, Any] = {
            "active_rank_mean": sum(ranks) / len(ranks), "active_rank_min": min(ranks),
            "sparsity_target": fraction, "sparsity_actual": actual, "pruned_this_step": pruned,
        }
        if pruned:
            figures["active_rank"] = dict(self.active)
        return figures

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Schedule position and activation statistics; the masks are model buffers (checkpointed there)."""
        state: dict[str, Any] = {"events": self.events, "last_event_step": self.last_event_step}
        if self.stats is not None:
            state["activation"] = self.stats.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events, self.last_event_step = int(state["events"]), int(state["last_event_step"])
        if self.stats is not None:
            self.stats.load_state_dict(state["activation"])


# ----------------------------------------------------------------------------------------- method
class PrunedLoraMethod:
    """``method=prunedlora``."""

    name = "prunedlora"

    def __init__(self, cfg: PrunedLoraConfig, sparsity: SparsityConfig) -> None:
        self.cfg = cfg
        self.target = cfg.final_rank(sparsity.final)
        self.sparsity = sparsity_for_target(sparsity, cfg.init_rank, self.target)
        self._callback: PrunedLoraCallback | None = None

    def attach(self, model: nn.Module) -> list[str]:
        """LoRA at r0 with scaling alpha / r0 (§3.3 steps 1-2), then the pruning callback."""
        names = attach_lora(model, self.cfg, self.cfg.init_rank)
        modules = lora_modules(model)
        check_rank_fits(modules, self.cfg.init_rank)
        stats = BottleneckStats(modules) if self.cfg.criterion in STATS_CRITERIA else None
        self._callback = PrunedLoraCallback(modules, self.cfg, self.sparsity, self.target, stats)
        log.info("prunedlora: r0=%d -> target %d (%s allocation, %s criterion), scaling %.4g fixed",
                 self.cfg.init_rank, self.target, self.cfg.allocation, self.cfg.criterion,
                 next(iter(modules.values())).scaling)
        if self.cfg.newton_scale > 0 and self.cfg.criterion == "obs_grad" and self.cfg.recovery:
            log.warning("method.newton_scale=%g: the Newton term -nu H^-1 g scales like 1/|G| with a gradient-Gram "
                        "Hessian and can blow up (methods.md §3.2); 0 is the validated default", self.cfg.newton_scale)
        return names

    def callbacks(self) -> list[Callback]:
        if self._callback is None:
            raise RuntimeError("PrunedLoraMethod.callbacks() called before attach()")
        return [self._callback]

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return default_parameter_groups(model, weight_decay)

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
