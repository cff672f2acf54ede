"""SALR's teacher: the dense weights its pruning replaced, held beside the model while it distills.

The residual adapter is only a rank-``r_res`` approximation of ``W0 - W_s``, so the unpruned model cannot be had by
switching anything off: ``attach`` keeps a frozen copy of each pruned linear's original weight (``hold_dense``), and
``SalrMethod.teacher`` swaps every ``SalrLinear`` for its copy during the teacher's forward. The copies live outside
the model the rest of the time, so checkpoints, exports, parameter counts and DeepSpeed never see them.

Storage (``recovery.teacher_dtype``, ``recovery.teacher_offload``): bfloat16 by default, which under bf16 autocast
is exactly the weight the dense layer would have multiplied with; float32 reproduces a float32 base bit for bit.
Offloaded, the copies stay in (pinned) CPU memory and each is copied to the device for its own forward only. With a
quantized base (``model.quantization=nf4|fp4|int8``) each copy is the dense weight quantized the same way: the
teacher is the quantized unpruned base. Cost at LLaMA-2-7B with SALR's seven projections (6.48e9 weights): 12.1 GiB
in bfloat16, 3.4 GiB in nf4 (with its scales), and none on the GPU when offloaded (README, "Recovery objective").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunedlora.methods.base import TeacherStorage
from prunedlora.models.quantize import quantize_linear, stored_bytes


class HeldLinear(nn.Module):
    """``x W0ᵀ (+ b)`` from a frozen copy of ``linear``'s weight in ``storage.dtype``, optionally in CPU memory.

    Without autocast the weight is cast to the input's dtype for the product (a bfloat16 copy then computes in
    float32 like the student); under autocast the product runs in the autocast dtype as every other linear does.
    """

    def __init__(self, linear: nn.Linear, storage: TeacherStorage) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = torch.device("cpu") if storage.offload else linear.weight.device
        pin = storage.offload and torch.cuda.is_available()

        def held(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            copy = t.detach().to(device=device, dtype=getattr(torch, storage.dtype), copy=True)
            return copy.pin_memory() if pin else copy

        self.register_buffer("weight", held(linear.weight), persistent=False)  # (d_out, d_in)
        self.register_buffer("bias", held(linear.bias), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.device, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(x.device, non_blocking=True)
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}, " \
               f"device={self.weight.device}"


def hold_dense(linear: nn.Linear, storage: TeacherStorage, quantization: str) -> nn.Module:
    """The teacher's copy of ``linear`` before it is pruned: quantized like the base, else a ``HeldLinear``."""
    return quantize_linear(linear, quantization) if quantization != "none" else HeldLinear(linear, storage)


def held_bytes(modules: dict[str, nn.Module]) -> int:
    """Bytes of the copies (packed storage and scales for quantized ones)."""
    return sum(stored_bytes(m) for m in modules.values())
