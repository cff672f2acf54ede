"""bitsandbytes' two CPU layouts of a 4-bit weight, each forced whatever the CPU.

bitsandbytes (0.50) decides per ``Linear4bit``, when the layer is built (``support_avx512bf16_for_cpu =
has_avx512bf16()``), whether its first eval-mode forward without gradients repacks the weight into the layout of
its fused AVX512-BF16 CPU kernel (``functional._convert_weight_packed_for_cpu``). So on each kind of CPU one layout
would go untested:

* the standard layout on a CPU that repacks: :func:`no_cpu_repack` (bitsandbytes' capability check answers no
  for layers built meanwhile, and existing layers have the flag turned off);
* the repacked layout on a CPU that does not: :func:`repack` calls bitsandbytes' own repack, plain torch that runs
  on any CPU, so every reader of the weight (dequantization, export, SALR's sparse base) is tested everywhere.
  A *forward* in that layout needs the kernel itself: :func:`skip_without_repack_kernel` says so where it is
  missing (any AVX512-BF16 CPU runs it: Sapphire Rapids and later Xeons, Zen 4 and later EPYCs).

``PRUNEDLORA_TEST_BNB_REPACK=off`` runs the whole suite as if the CPU had no AVX512-BF16 (``conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
from torch import nn


def repack_kernel_here() -> bool:
    """Whether this CPU has bitsandbytes' fused kernel for the repacked layout (AVX512-BF16), unless the suite
    runs as if it had not (``PRUNEDLORA_TEST_BNB_REPACK=off``)."""
    from bitsandbytes.functional import has_avx512bf16

    return os.environ.get("PRUNEDLORA_TEST_BNB_REPACK") != "off" and bool(has_avx512bf16())


def skip_without_repack_kernel() -> None:
    """Skip a test that runs a forward in the repacked layout where the CPU lacks the kernel for it."""
    if not repack_kernel_here():
        pytest.skip("a forward in bitsandbytes' repacked 4-bit layout needs its AVX512-BF16 CPU kernel, which this "
                    "CPU lacks or PRUNEDLORA_TEST_BNB_REPACK=off hides (the layout itself is tested everywhere "
                    "through bitsandbytes' repack, called directly)")


def four_bit_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def repack(model: nn.Module) -> list[str]:
    """Repack every 4-bit linear of ``model`` that bitsandbytes would (fitting shape, not yet repacked), as its
    eval-mode forward does on an AVX512-BF16 CPU; returns the names of all repacked linears."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from prunedlora.models.quantize import cpu_repack_fits, is_repacked

    for layer in four_bit_layers(model).values():
        if not is_repacked(layer) and cpu_repack_fits(layer):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
                layer.weight.data, layer.weight.quant_state)
    return [name for name, layer in four_bit_layers(model).items() if is_repacked(layer)]


@contextlib.contextmanager
def no_cpu_repack(*models: nn.Module) -> Iterator[None]:
    """bitsandbytes never repacks inside this block: layers built in it, and those of ``models``, keep the
    standard layout at every forward (as on a CPU without AVX512-BF16)."""
    import bitsandbytes.nn.modules as bnb_modules

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bnb_modules, "has_avx512bf16", lambda: False)
        for model in models:
            for layer in four_bit_layers(model).values():
                mp.setattr(layer, "support_avx512bf16_for_cpu", False)
        yield
