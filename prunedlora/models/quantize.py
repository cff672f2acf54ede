"""Quantize single float linears with bitsandbytes, after loading (methods that must edit the base first).

``model.quantization`` normally quantizes at load (``load.py``, transformers' ``BitsAndBytesConfig``). SALR
must prune the 16-bit weights before they are quantized (packed 4/8-bit weights cannot be edited), so it
loads the base in float and converts its pruned linears here, with the settings ``load.py`` gives
transformers: NF4/FP4 with block size 64, no double quantization, float32 compute on CPU (bf16 on GPU);
LLM.int8 with the 6.0 outlier threshold. Zeros survive exactly: NF4 and FP4 have a zero code and absmax
int8 maps 0 to 0.

On CPUs with AVX512-BF16 (Sapphire Rapids and later Xeons, Zen 4 and later EPYCs) bitsandbytes 0.50 repacks a
4-bit weight into the layout of its fused CPU kernel at the layer's first eval-mode forward without gradients
(block scales rounded to bf16, so the weight changes by up to 2**-8 of its value). :func:`guard_cpu_repack`, which
the SALR path here and the quantized load (``load.py``) apply to every 4-bit linear, keeps that layout from
breaking anything else:

* the layout needs ``out_features`` a multiple of 32 and ``in_features`` a multiple of the quantization block
  (each block inside one row); bitsandbytes does not check, and a layer of another shape fails with a reshape
  error at its eval forward: such layers never repack;
* bitsandbytes' own way back to the standard layout (in ``state_dict()``, ``.cuda()``) leaves the block scales of
  a weight without double quantization (ours) in the repacked order, so what it saves and dequantizes is wrong:
  a ``state_dict()`` now first goes back with :func:`restore_standard_layout`, which orders them back;
* a forward that needs gradients (training, or eval mode with grads) in the repacked layout fails in
  bitsandbytes' kernel: such a forward first goes back to the standard layout, as a layer that never left
  training has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunedlora.config import QUANTIZATIONS, ConfigError

INT8_THRESHOLD = 6.0
CPU_REPACK_BLOCK_N = 32
"""Rows per block of bitsandbytes' CPU-repacked 4-bit layout (``_convert_weight_packed_for_cpu``'s ``block_n``)."""


def cpu_repack_fits(layer: nn.Module) -> bool:
    """Whether bitsandbytes' CPU repack can hold this ``Linear4bit``'s weight (see the module docstring)."""
    blocksize = getattr(layer.weight, "blocksize", None) or 64
    return layer.out_features % CPU_REPACK_BLOCK_N == 0 and layer.in_features % blocksize == 0


def is_repacked(layer: nn.Module) -> bool:
    """Whether ``layer``'s 4-bit weight is in bitsandbytes' CPU-repacked layout."""
    return bool(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False))


def restore_standard_layout(layer: nn.Module) -> bool:
    """Put a repacked 4-bit weight back into the standard layout, in place; returns whether it was repacked.

    The values are the repacked ones (bf16 block scales): the repack itself is what rounded them.
    """
    if not is_repacked(layer):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if state.absmax.dim() == 2:  # bitsandbytes 0.50 reorders them back only when double-quantized
        state.absmax = state.absmax.T.reshape(-1).float()  # repacked: (in/block, out); standard: row-major blocks
    weight.data, weight.quant_state = data, state
    return True


def _restore_before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    restore_standard_layout(module)


def _restore_before_grad_forward(module: nn.Module, args: tuple) -> None:
    if is_repacked(module) and (module.training or (args and getattr(args[0], "requires_grad", False))):
        restore_standard_layout(module)


def stored_bytes(module: nn.Module) -> int:
    """Bytes ``module``'s parameters and buffers occupy: packed storage for 4/8-bit weights, plus a 4-bit weight's
    block scales (its ``quant_state.absmax``, float32 per 64 weights without double quantization)."""
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        total += tensor.numel() * tensor.element_size()
        absmax = getattr(getattr(tensor, "quant_state", None), "absmax", None)
        total += absmax.numel() * absmax.element_size() if absmax is not None else 0
    return total


@contextmanager
def cpu_repack_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: no 4-bit linear of ``model`` repacks, so an eval-mode forward without gradients (a distilling run's
    teacher) computes with the standard layout and the weights training uses, and leaves them as they were.

    Without it, on a CPU with AVX512-BF16 that forward would repack the shared frozen base in place, rounding its
    block scales for the student too. Nothing changes where bitsandbytes never repacks (a GPU, other CPUs).
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer in layers:
            layer.support_avx512bf16_for_cpu = True


def guard_cpu_repack(model: nn.Module) -> list[str]:
    """Make every 4-bit linear of ``model`` safe in bitsandbytes' CPU-repacked layout (see the module docstring).

    Where bitsandbytes never repacks (a GPU, a CPU without AVX512-BF16) nothing behaves differently. Idempotent.
    Returns the names of the linears whose shape the layout cannot hold (they never repack).
    """
    unfit = []
    for name, module in model.named_modules():
        four_bit = type(getattr(module, "weight", None)).__name__ == "Params4bit"  # Linear4bit and its subclasses
        if not four_bit or getattr(module, "_prunedlora_repack_guard", False):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False) and not cpu_repack_fits(module):
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
            unfit.append(name)
        module.register_state_dict_pre_hook(_restore_before_state_dict)
        module.register_forward_pre_hook(_restore_before_grad_forward)
        module._prunedlora_repack_guard = True
    return unfit


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (``nf4``, ``fp4``) or ``Linear8bitLt`` (``int8``) holding ``linear``'s weights.

    The new layer sits on ``linear``'s device; its bias stays in float.

    Raises:
        ConfigError: an unknown ``kind``, or bitsandbytes not installed.
    """
    if kind not in QUANTIZATIONS or kind == "none":
        raise ConfigError(f"model.quantization={kind} cannot quantize a linear; accepted: nf4, fp4, int8")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(f"model.quantization={kind} needs bitsandbytes, which is not installed. Install the extra "
                          "with `pip install 'prunedlora[bnb]'`, or set model.quantization=none.") from err
    weight = linear.weight.detach()
    device = weight.device
    bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
    else:
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute,
                                  compress_statistics=False, quant_type=kind, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, compress_statistics=False,
                                         quant_type=kind, module=layer)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    layer = layer.to(device)  # moving the unquantized parameter is what quantizes it
    guard_cpu_repack(layer)
    return layer
