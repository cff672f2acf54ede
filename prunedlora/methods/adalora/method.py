"""AdaLoRA baseline (Zhang et al., ICLR 2023; docs/methods.md §2) behind our ``Method`` interface.

PEFT's implementation does the work; this module wires it into our loop, which calls the plain model and
knows nothing about PEFT:

- ``attach`` injects PEFT's ``SVDLinear`` layers in place with ``peft.get_peft_model``. Our loop keeps
  calling the original model object; the returned ``PeftModel`` is kept only as a handle: its
  ``base_model`` (the ``AdaLoraModel``) has ``update_and_allocate`` and its state dict is what PEFT
  saves.
- ``total_step``, ``tinit`` and ``tfinal`` depend on ``train.max_steps``, which a method first sees in
  ``on_train_start``. PEFT's config needs ``total_step`` at construction, so it gets a provisional one
  (``PROVISIONAL_TOTAL_STEP``) and ``on_train_start`` sets the three real values on the live config
  (``RankAllocator.set_total_step``, the config's public fields). The budget schedule reads them at
  every step, and the allocator computes nothing else from them at construction.
- ``AdaLoraAllocator.on_step_end`` calls ``update_and_allocate(step)`` after ``optimizer.step()`` and
  before ``zero_grad()`` (§2 Procedure); PEFT's known failure is that nobody calls it (PEFT #432, #1801).
- PEFT adds the orthogonality regulariser inside ``AdaLoraModel.forward``, which our loop bypasses.
  ``on_before_optimizer_step`` back-propagates ``γ R`` once per optimizer step instead: the loop's loss is
  ``Σ_k loss_k / K`` over K micro-batches, and ``Σ_k γ R / K = γ R`` because the factors do not change
  within a step, so the gradients equal PEFT's.
- Checkpoints hold our trainable parameters (P, λ, Q, so the λ masks too) but not PEFT's allocator:
  its importance EMAs and the rank pattern go into the callback's ``state_dict``. ``ranknum`` is always
  ``init_r`` and needs no saving.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.export import count_parameters, describe, save_pretrained_dir
from prunedlora.export.hf import CLIENT as HF_CLIENT
from prunedlora.methods.adalora.config import AdaLoraConfig
from prunedlora.methods.base import Callback, Method
from prunedlora.models.surgery import dequantize_linears, dequantized_weight, replace_module, target_module_names

log = logging.getLogger(__name__)

ADALORA_CLIENT = 'PeftModel.from_pretrained(base, "adapter")'
ADAPTER = "default"
"""PEFT's adapter name; parameter names end in ``.lora_A.default`` etc."""
PROVISIONAL_TOTAL_STEP = 1
"""PEFT's config requires ``total_step > tinit + tfinal`` at construction; ``on_train_start`` sets the real one."""
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")
# Each factor's Gram matrix, (r, r): Q Qᵀ for Q = lora_A (r, in), Pᵀ P for P = lora_B (out, r).
_GRAMS = {"lora_A": lambda q: q @ q.T, "lora_B": lambda p: p.T @ p}


# -------------------------------------------------------------------------------------------- schedule
def schedule_steps(max_steps: int, tinit_frac: float, tfinal_frac: float) -> tuple[int, int]:
    """PEFT's ``tinit`` and ``tfinal`` in optimizer steps (docs/methods.md §8 item 26: 10% and 20%).

    Rounded down, so ``tinit + tfinal < max_steps`` whenever the fractions sum to less than 1 (the config
    check): the budget always has at least one step to shrink in.
    """
    return math.floor(tinit_frac * max_steps), math.floor(tfinal_frac * max_steps)


def build_peft_config(cfg: AdaLoraConfig, final_rank: int) -> Any:
    """``peft.AdaLoraConfig`` from ours, with the provisional ``total_step`` (set at train start)."""
    from peft import AdaLoraConfig as PeftAdaLoraConfig  # lazy: importing peft costs seconds

    targets = "all-linear" if "all-linear" in cfg.target_modules else list(cfg.target_modules)
    return PeftAdaLoraConfig(
        init_r=cfg.init_rank,
        target_r=final_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        tinit=0,
        tfinal=0,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=PROVISIONAL_TOTAL_STEP,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adalora(model: nn.Module, cfg: AdaLoraConfig, final_rank: int) -> Any:
    """Inject PEFT's AdaLoRA layers into ``model`` in place; returns the ``PeftModel`` handle.

    The base stays frozen and only ``lora_A`` (Q), ``lora_E`` (λ) and ``lora_B`` (P) train; PEFT
    initialises λ = 0 and P, Q ~ N(0, 0.02) (§2), so the model equals the base at step 0.
    """
    from peft import get_peft_model

    target_module_names(model, cfg.target_modules)  # our message (names and fix) before PEFT fails with its own
    with warnings.catch_warnings():  # PEFT probes transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, build_peft_config(cfg, final_rank), adapter_name=ADAPTER)


# ----------------------------------------------------------------------------------- model inspection
def singular_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """λ of every AdaLoRA matrix, ``{module name: (init_r,) tensor}``, in model order."""
    suffix = f".lora_E.{ADAPTER}"
    return {n.removesuffix(suffix): p.detach().view(-1) for n, p in model.named_parameters() if n.endswith(suffix)}


def active_ranks(model: nn.Module) -> dict[str, int]:
    """Active rank per module: the number of non-zero λ (masked triplets have λ = 0 exactly)."""
    return {name: int(torch.count_nonzero(lam).item()) for name, lam in singular_values(model).items()}


def orthogonal_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(kind, parameter)`` for every P (``lora_B``) and Q (``lora_A``) of the adapter, as PEFT selects them."""
    factors = []
    for name, param in model.named_parameters():
        kind = name.rsplit(".", 2)[-2] if name.endswith(f".{ADAPTER}") else ""
        if kind in _GRAMS:
            factors.append((kind, param))
    return factors


def orthogonal_penalty(factors: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """``R = (1/N) [Σ_Q ‖Q Qᵀ − I‖_F + Σ_P ‖Pᵀ P − I‖_F]`` over all N factors (docs/methods.md §2, as PEFT)."""
    terms = []
    for kind, param in factors:
        gram = _GRAMS[kind](param)  # (r, r)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        terms.append(torch.linalg.matrix_norm(gram - eye))  # Frobenius norm
    return torch.stack(terms).mean()


# ------------------------------------------------------------------------------------------- callback
class AdaLoraAllocator(Callback):
    """Runs PEFT's rank allocation and the orthogonality regulariser inside our loop (docs/methods.md §2).

    Args:
        peft_model: the handle ``attach_adalora`` returned.
        orth_reg_weight: γ; 0 skips the regulariser.
        tinit_frac: warm-up fraction of the run (full budget).
        tfinal_frac: final fraction of the run (rank pattern frozen).
    """

    def __init__(self, peft_model: Any, orth_reg_weight: float, tinit_frac: float, tfinal_frac: float) -> None:
        self.peft_model = peft_model
        self.orth_reg_weight = orth_reg_weight
        self.tinit_frac = tinit_frac
        self.tfinal_frac = tfinal_frac
        self.allocations = 0  # update_and_allocate calls, over the whole run (checkpointed)
        self.max_steps: int | None = None  # set by on_train_start; 0: nothing to allocate (train.max_steps=0)
        self._factors: list[tuple[str, nn.Parameter]] = []
        self._started = False

    @property
    def tuner(self) -> Any:
        """PEFT's ``AdaLoraModel`` (it owns ``update_and_allocate`` and the ``RankAllocator``)."""
        return self.peft_model.base_model

    @property
    def peft_config(self) -> Any:
        return self.tuner.peft_config[ADAPTER]

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int) -> None:
        """Set PEFT's ``total_step``, ``tinit`` and ``tfinal`` from the run length (module docstring).

        Raises:
            ConfigError: under DeepSpeed, whose step clears (and under ZeRO partitions) the gradients that
                PEFT's allocation reads in ``on_step_end``, and which must own every backward.
        """
        if type(optimizer).__module__.split(".")[0] == "deepspeed":
            raise ConfigError("method=adalora does not support distributed=deepspeed_*: PEFT's rank allocation "
                              "reads every parameter's gradient after the optimizer update, which DeepSpeed has "
                              "already cleared (and, under ZeRO, partitioned); use distributed=none")
        self.max_steps = max_steps
        tinit, tfinal = schedule_steps(max_steps, self.tinit_frac, self.tfinal_frac)
        self.peft_config.tinit, self.peft_config.tfinal = tinit, tfinal
        self.tuner.rankallocator.set_total_step(max_steps)
        self._factors = orthogonal_factors(self.tuner.model)
        self._started = True
        alloc = self.tuner.rankallocator
        log.info("adalora: %d matrices, rank budget %d -> %d, tinit %d, final phase after step %d, deltaT %d",
                 len(alloc.name_set), alloc.init_bgt, alloc.target_bgt, tinit, max_steps - tfinal,
                 self.peft_config.deltaT)

    def on_before_optimizer_step(self, step: int) -> dict[str, Any]:
        """Add ``∇(γ R)`` to the accumulated gradients (what PEFT's wrapper forward would have added)."""
        if self.orth_reg_weight == 0 or not self._factors:
            return {}
        with torch.enable_grad():
            reg = orthogonal_penalty(self._factors)
            (self.orth_reg_weight * reg).backward()
        return {"orth_reg": reg.item()}  # host sync, once per optimizer step

    def on_step_end(self, step: int) -> dict[str, Any]:
        """``update_and_allocate(step)``: importance EMAs, cubic budget, λ masking (docs/methods.md §2)."""
        if not self._started:
            raise RuntimeError("AdaLoraAllocator.on_step_end before on_train_start: PEFT's schedule is not set")
        if any(p.grad is None for _, p in self._factors):
            raise RuntimeError("AdaLoRA's allocation needs the step's gradients in on_step_end (after the "
                               "optimizer update, before zero_grad), but they are already cleared")
        self.tuner.update_and_allocate(step)
        self.allocations += 1
        alloc = self.tuner.rankallocator
        budget, _ = alloc.budget_schedule(step)
        active = self.allocated_rank()
        return {"active_rank": active, "rank_budget": budget, "sparsity": 1.0 - active / alloc.init_bgt,
                "adalora_allocations": self.allocations}

    def allocated_rank(self) -> int:
        """Total rank of the latest allocation (the full initial budget before the first one)."""
        pattern = self.peft_config.rank_pattern
        if not pattern:
            return int(self.tuner.rankallocator.init_bgt)
        return int(sum(sum(bool(b) for b in keep) for keep in pattern.values()))

    def state_dict(self) -> dict[str, Any]:
        alloc = self.tuner.rankallocator
        state: dict[str, Any] = {"rank_pattern": copy.deepcopy(self.peft_config.rank_pattern),
                                 "allocations": self.allocations}
        for key in _ALLOCATOR_STATE:
            state[key] = {n: t.detach().cpu().clone() for n, t in getattr(alloc, key).items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alloc = self.tuner.rankallocator
        params = dict(self.tuner.model.named_parameters())
        for key in _ALLOCATOR_STATE:
            setattr(alloc, key, {n: t.to(params[n].device) for n, t in state[key].items()})
        self.peft_config.rank_pattern = copy.deepcopy(state["rank_pattern"])
        self.allocations = int(state["allocations"])


# --------------------------------------------------------------------------------------------- method
class AdaLoraMethod(Method):
    """``method=adalora``: PEFT's AdaLoRA with our loop, checkpoints, report and export."""

    cfg: AdaLoraConfig

    def __init__(self, cfg: AdaLoraConfig, sparsity: SparsityConfig) -> None:
        super().__init__(cfg, sparsity)
        self.final_rank = cfg.final_rank(sparsity.final)
        self.peft_model: Any = None
        self._allocator: AdaLoraAllocator | None = None

    def attach(self, model: nn.Module) -> list[str]:
        self.peft_model = attach_adalora(model, self.cfg, self.final_rank)
        return list(singular_values(model))

    def callbacks(self) -> list[Callback]:
        if self.peft_model is None:
            raise RuntimeError("AdaLoraMethod.callbacks() needs attach() first")
        self._allocator = AdaLoraAllocator(self.peft_model, self.cfg.orth_reg_weight, self.cfg.tinit_frac,
                                           self.cfg.tfinal_frac)
        return [self._allocator]

    def report(self, model: nn.Module) -> dict[str, Any]:
        """Active rank (non-zero λ) per module, the achieved rank sparsity and the effective adapter size.

        Raises:
            RuntimeError: when the run trained with our callback but allocation never ran (PEFT #432/#1801).
        """
        if self._allocator is not None and self._allocator.allocations == 0 and self._allocator.max_steps != 0:
            raise RuntimeError("AdaLoRA's update_and_allocate never ran: the training loop did not call the "
                               "callback's on_step_end, so the ranks never changed (PEFT issues #432, #1801)")
        ranks = active_ranks(model)
        shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n in ranks}
        effective = sum(r * (shapes[n][0] + shapes[n][1] + 1) for n, r in ranks.items())  # Q rows, P cols, λ
        total = self.cfg.init_rank * len(ranks)
        return {"ranks": ranks, "sparsity": 1.0 - sum(ranks.values()) / total, "target_rank": self.final_rank,
                "params_adapter_effective": effective,
                "adalora_allocations": self._allocator.allocations if self._allocator else 0}

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        """``adapter/``: PEFT AdaLoRA format; ``model/``: ``W0 + (α/r_init)·P diag(λ) Q`` merged by PEFT."""
        formats = ("hf", "adapter") if formats is None else formats
        exports = {}
        if "adapter" in formats:
            export_adalora_adapter(self.peft_model, out_dir / "adapter", base_model_id)
            exports["adapter"] = describe(out_dir / "adapter", "adapter", "the AdaLoRA adapter (PEFT's AdaLoRA format, "
                                          "which vLLM does not read: serve model/)", ADALORA_CLIENT, base=base_model_id)
        # Merging costs no parameters: the merged model has the base's count, whether or not model/ is written.
        params = count_parameters(model)[0] - sum(p.numel() for n, p in model.named_parameters()
                                                   if ".lora_" in n or ".ranknum." in n)
        if "hf" in formats:
            if getattr(model, "hf_quantizer", None) is not None:
                merged = merge_into_dequantized_base(model)
            else:
                merged = self.peft_model.merge_and_unload()  # PEFT merges each SVDLinear and puts its base back
            assert merged is model, "PEFT injected in place, so the unloaded model is the recipe's model"
            save_pretrained_dir(merged, tokenizer, out_dir / "model")
            exports["model"] = describe(out_dir / "model", "hf", "the base with the adapter merged", HF_CLIENT)
            params = count_parameters(merged)[0]
        return {"params_after_export": params, "exports": exports}


def adalora_delta_weight(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """``P diag(λ) Q · scaling / ranknum`` in float32, as PEFT's ``SVDLinear`` merges (docs/methods.md §2)."""
    p, lam, q = layer.lora_B[adapter].float(), layer.lora_E[adapter].float(), layer.lora_A[adapter].float()
    return p @ (q * lam) * layer.scaling[adapter] / (layer.ranknum[adapter].float() + 1e-5)


def merge_into_dequantized_base(model: nn.Module) -> nn.Module:
    """Merge AdaLoRA into a bitsandbytes base: PEFT 0.21's 4/8-bit SVD layers have no ``merge``.

    Each adapted layer becomes a float ``nn.Linear`` holding dequantized ``W0`` plus ``(α/r_init) P diag(λ) Q``;
    the remaining quantized linears are dequantized as they are (the QLoRA-style merged export).
    """
    from peft.tuners.adalora import AdaLoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, AdaLoraLayer):
            continue
        base = module.get_base_layer()
        weight = dequantized_weight(base) + adalora_delta_weight(module)
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        replace_module(model, name, linear)
    dequantize_linears(model)
    return model


def export_adalora_adapter(peft_model: Any, out_dir: Path, base_model_id: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` would.

    PEFT's own state-dict function slices each matrix to the kept triplets of its ``rank_pattern`` (and
    ``PeftModel.from_pretrained`` resizes the layers to match, keeping ``ranknum = init_r``). Written by
    hand only to skip the model card and the hub look-up of ``save_pretrained``.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER, save_embedding_layers=False)
    config = copy.deepcopy(peft_model.peft_config[ADAPTER])  # after the call: it normalises rank_pattern's keys
    config.inference_mode = True
    config.base_model_name_or_path = base_model_id
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
