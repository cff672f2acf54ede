"""Helpers for tests that compare adapters: give them the non-zero state training would."""

from __future__ import annotations

import re

import torch
from torch import nn


def randomize_b(model: nn.Module, seed: int = 3, pattern: str = "lora_B") -> None:
    """Give every parameter whose name matches ``pattern`` (a regex; ours and PEFT's B by default) a small random
    value: B = 0 at init would make most comparisons trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if re.search(pattern, name):
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
