"""Read and write full tensors the same way with and without DeepSpeed ZeRO.

Pruning callbacks read gradients, rewrite weights and clear optimizer moments between backward and the
optimizer step. Under ZeRO >= 1 ``p.grad`` is None and the optimizer keeps its own float32 partitions,
so those reads and writes must go through DeepSpeed's ``safe_*`` accessors. These helpers
pick the right path per parameter: a parameter DeepSpeed manages carries ``_hp_mapping`` (ZeRO-1/2) or
``ds_id`` (ZeRO-3); anything else is plain PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_deepspeed_param(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO owns this parameter's gradient and optimizer state.

    Under ZeRO-1/2 every trainable parameter carries ``_hp_mapping``, None on the ranks whose optimizer partition
    holds none of it. DeepSpeed's full-tensor reads are all-reduces that every rank must call for every parameter:
    testing ``_hp_mapping is not None`` skipped them on those ranks, so the ranks' all-reduces no longer paired up
    (a gloo size mismatch in the checkpoint of a two-rank ZeRO-2 one-shot LoRAPrune run)."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block, ZeRO-3 partitioned parameters hold their full values (read-only); a no-op otherwise.

    Under ZeRO-3 a parameter outside its module's forward is an empty placeholder on every rank (above
    ``stage3_param_persistence_threshold`` elements), so a callback that reads whole weights (LoRAPrune's
    scores read ``W0 + s BA``) gathers them first, one module at a time to bound the memory.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The whole gradient of ``param`` (accumulated over micro-batches), or None if it has none."""
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return param.grad


def set_full_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(param, value)
    elif param.grad is not None:
        param.grad.copy_(value)


def full_param(param: torch.Tensor) -> torch.Tensor:
    """The whole (float32 master, under ZeRO) value of ``param``."""
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.data


def set_full_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``param`` everywhere it lives: the module tensor and, under ZeRO, the optimizer's master copy."""
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)
        if param.numel() == value.numel():  # ZeRO-1/2: the module keeps a full copy; ZeRO-3: a placeholder
            param.data.copy_(value.to(param.dtype))
        return
    param.data.copy_(value.to(param.dtype))


def optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str) -> torch.Tensor | None:
    """An optimizer state tensor (``exp_avg``, ``exp_avg_sq``) of ``param``; None before the first step."""
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        try:
            return safe_get_full_optimizer_state(param, key)
        except (TypeError, KeyError, ValueError):  # no such state (yet): before the first step, or another optimizer
            return None
    return optimizer.state.get(param, {}).get(key)


def set_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
    if is_deepspeed_param(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value, key)
    elif key in optimizer.state.get(param, {}):
        optimizer.state[param][key].copy_(value)
