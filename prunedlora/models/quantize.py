"""Quantize single float linears with bitsandbytes, after loading (methods that must edit the base first).

``model.quantization`` normally quantizes at load (``load.py``, transformers' ``BitsAndBytesConfig``). SALR
must prune the 16-bit weights before they are quantized (packed 4/8-bit weights cannot be edited), so it
loads the base in float and converts its pruned linears here, with the settings ``load.py`` gives
transformers: NF4/FP4 with block size 64, no double quantization, float32 compute on CPU (bf16 on GPU);
LLM.int8 with the 6.0 outlier threshold. Zeros survive exactly: NF4 and FP4 have a zero code and absmax
int8 maps 0 to 0.
"""

from __future__ import annotations

import torch
from torch import nn

from prunedlora.config import QUANTIZATIONS, ConfigError

INT8_THRESHOLD = 6.0


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
    return layer.to(device)  # moving the unquantized parameter is what quantizes it
