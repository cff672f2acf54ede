"""The SALR base's formats in training: ``BASE_FORMATS`` builds the linear a pruned base runs in
(``method.base_format``), ``sparse_base_weight`` reads any of them back as a dense tensor. The loader of an export's
bitmap form (``compressed/``) is ``prunedlora.export.compressed.load_salr_export``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prunedlora.models.surgery import dequantized_weight
from prunedlora.pruning.bitmap import BitmapLinear, SemiStructuredLinear, encode
from prunedlora.pruning.fused_bitmap import FusedBitmapLinear, bitmap_base


# ------------------------------------------------------------------------------------- sparse bases
def _semi_structured_dense(layer: SemiStructuredLinear) -> torch.Tensor:
    return layer.weight.to_dense()


# Dense weight of each sparse-base implementation (docs/methods.md §6.4 item 5), by type.
_DENSE_WEIGHT: dict[type, Callable[[nn.Module], torch.Tensor]] = {
    nn.Linear: lambda layer: layer.weight,
    BitmapLinear: lambda layer: layer.dense_weight(),
    FusedBitmapLinear: lambda layer: layer.dense_weight(),
    SemiStructuredLinear: _semi_structured_dense,
}
# method.base_format -> converter from the pruned dense nn.Linear (at load: prunedlora.export.compressed).
BASE_FORMATS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "dense": lambda linear: linear,
    "bitmap": BitmapLinear.from_linear,
    "fused": lambda linear: bitmap_base(encode(linear.weight), linear.bias, "fused"),
    "auto": lambda linear: bitmap_base(encode(linear.weight), linear.bias, "auto"),
    "semi_structured": SemiStructuredLinear,
}


def sparse_base_weight(base: nn.Module) -> torch.Tensor:
    """The (pruned) base weight as a dense tensor, whatever implementation holds it (bitsandbytes: float32)."""
    reader = _DENSE_WEIGHT.get(type(base))
    return reader(base) if reader is not None else dequantized_weight(base)
