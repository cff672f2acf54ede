"""PrunedLoRA's pruning callback (docs/methods.md §3.3 step 4): mask, schedule, score, allocate, recover, prune.

In ``on_before_optimizer_step`` (complete, unclipped gradients of the step): (i) mask A's rows, B's columns and
their gradients; (ii) at a pruning event (step ``k * every``, ``k >= 1``; never step 0) where the schedule asks for
more sparsity, score the active components with the criterion's function (``prunedlora.pruning.criteria``'s
``RANK_CRITERIA`` record of ``method.criterion``), choose the lowest per module (``allocation=uniform``) or across
modules (``allocation=global``), apply the criterion's recovery update and clear their mask bits; (iii) zero their
slices of Adam's ``exp_avg``/``exp_avg_sq`` and re-mask weights and gradients before the update (§3.3 step 4.3, §8
item 6). ``on_step_end`` re-masks the weights.

The schedule ramps to ``1 - target / r0`` of r0: ``sparsity.final`` unless ``method.rank`` sets the target
(``PrunedLoraConfig.final_rank``); the user's ``sparsity`` is read as given, never rewritten.

Weights, gradients and Adam moments are read and written through ``prunedlora.distributed``, so the callback runs
unchanged under DeepSpeed ZeRO-2/3.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.lora import LoRALinear
from prunedlora.config import SparsityConfig
from prunedlora.distributed import (
    full_grad,
    full_param,
    is_deepspeed_param,
    optimizer_state,
    set_full_grad,
    set_full_param,
    set_optimizer_state,
)
from prunedlora.methods.base import Callback
from prunedlora.methods.prunedlora.config import PrunedLoraConfig
from prunedlora.pruning.criteria import RANK_CRITERIA
from prunedlora.pruning.rank_criteria import lowest, select_global
from prunedlora.pruning.schedules import is_event, target_fraction

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE = "geometric"
"""What ``sparsity.schedule=auto`` means for PrunedLoRA: the same fraction of the remaining rank every K1 = every
steps, the target reached by ``sparsity.end_frac`` of the steps (the paper's K2-per-event is ``constant``)."""
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
"""Per-parameter AdamW state whose pruned slices are zeroed (docs/methods.md §8 item 6)."""


# ------------------------------------------------------------------------------------ statistics
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
    """Masks, schedules and prunes the rank components of every adapter (docs/methods.md §3.3 step 4).

    Args:
        modules: the LoRA wrappers by name, at rank r0.
        cfg: the method config (criterion, allocation, min_rank, damping, recovery, recovery_factor).
        sparsity: the ``sparsity`` group as the user set it (schedule, cadence).
        target: the final rank per module (uniform) or on average (global): ``PrunedLoraConfig.final_rank``. The
            schedule ramps to ``final = 1 - target / r0`` of r0 (``sparsity.final`` unless ``method.rank`` is set).
        stats: bottleneck statistics (criteria that need ``bottleneck_gram`` only).
    """

    def __init__(self, modules: dict[str, LoRALinear], cfg: PrunedLoraConfig, sparsity: SparsityConfig,
                 target: int, stats: BottleneckStats | None = None) -> None:
        self.modules, self.cfg, self.sparsity, self.target, self.stats = modules, cfg, sparsity, target, stats
        self.r0 = cfg.init_rank
        self.final = 1.0 - target / self.r0  # the fraction of r0 pruned at the end: what the schedule ramps to
        self.criterion = RANK_CRITERIA[cfg.criterion]
        self.score = RANK_CRITERIA.function(cfg.criterion)
        self.optimizer: torch.optim.Optimizer | None = None
        self.max_steps = 1
        self.active = {name: m.active_rank for name, m in modules.items()}  # host-side copy: no per-step sync
        self.events = 0
        self.last_event_step = 0

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        self.optimizer, self.max_steps = optimizer, max_steps
        self.active = {name: m.active_rank for name, m in self.modules.items()}  # masks may come from a checkpoint
        reached = self._fraction(max_steps)
        if reached < self.final - 1e-9:
            log.warning("prunedlora: the sparsity schedule prunes %.3g of r0=%d by train.max_steps=%d, short of "
                        "the target rank %d (%.3g); raise train.max_steps or sparsity.per_event, or lower "
                        "sparsity.every", reached, self.r0, max_steps, self.target, self.final)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        self._mask(grads=True)  # (i)
        fraction = self._fraction(step)
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
    def _fraction(self, step: int) -> float:
        """The schedule's target fraction of r0 at ``step``, ramping to ``self.final``."""
        return target_fraction(self.sparsity, step, self.max_steps, units=self.r0, default=DEFAULT_SCHEDULE,
                               final=self.final)

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
        # Absolute saliencies (output-OBS: output errors, the scaling s = alpha / r0 shared by every module) are
        # compared as they are by a global budget; the other criteria's are divided by their module's mean.
        chosen = select(saliencies, capacity, budget, relative=not self.criterion.absolute)
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
        return self.score(B, A, G_B, G_A, **self._options(name, idx))  # (r',)

    def _options(self, name: str, idx: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of the criterion's functions: the method's knobs and the active set's statistics."""
        return {"damping": self.cfg.damping, "rel_damping": self.cfg.rel_damping,
                "newton_scale": self.cfg.newton_scale, "recovery_factor": self.cfg.recovery_factor,
                **self._stats(name, idx)}

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
        """The criterion's recovery (if any), clear mask bits, zero Adam moments; returns the pruned r0-indices."""
        module = self.modules[name]
        if self.cfg.recovery and self.criterion.recovery is not None:
            recover = RANK_CRITERIA.resolve(self.criterion.recovery)
            b_new, a_new = recover(B, A, G_B, G_A, order, **self._options(name, idx))  # (d_out, r'), (r', d_in)
            if b_new is not None:
                b_full = full_param(module.lora_B.weight).clone()
                b_full[:, idx] = b_new.to(B.dtype)
                set_full_param(module.lora_B.weight, b_full)
            if a_new is not None:
                a_full = full_param(module.lora_A.weight).clone()
                a_full[idx] = a_new.to(A.dtype)
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
