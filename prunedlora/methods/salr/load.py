"""The SALR base's formats, and the loader of an export's bitmap form (``compressed/``).

``BASE_FORMATS`` builds the linear a pruned base runs in (``method.base_format``), ``sparse_base_weight`` reads any of
them back as a dense tensor, and ``load_salr_export`` rebuilds an exported SALR model from ``compressed/`` alone.
Nothing here imports from ``prunedlora.methods`` (the loader is what users call, beside the bitmap writer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prunedlora.adapters.salr import SalrLinear
from prunedlora.export.bitmap import BITMAP_FILE
from prunedlora.export.peft_adapter import load_fused_adapter
from prunedlora.models.surgery import dequantized_weight, replace_module
from prunedlora.pruning.bitmap import BitmapLinear, SemiStructuredLinear, decode, load_bitmaps


# ------------------------------------------------------------------------------------- sparse bases
def _semi_structured_dense(layer: SemiStructuredLinear) -> torch.Tensor:
    return layer.weight.to_dense()


# Dense weight of each sparse-base implementation (docs/methods.md §6.4 item 5), by type.
_DENSE_WEIGHT: dict[type, Callable[[nn.Module], torch.Tensor]] = {
    nn.Linear: lambda layer: layer.weight,
    BitmapLinear: lambda layer: layer.dense_weight(),
    SemiStructuredLinear: _semi_structured_dense,
}
# base_format -> converter from the pruned dense nn.Linear.
BASE_FORMATS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "dense": lambda linear: linear,
    "bitmap": BitmapLinear.from_linear,
    "semi_structured": SemiStructuredLinear,
}


def sparse_base_weight(base: nn.Module) -> torch.Tensor:
    """The (pruned) base weight as a dense tensor, whatever implementation holds it (bitsandbytes: float32)."""
    reader = _DENSE_WEIGHT.get(type(base))
    return reader(base) if reader is not None else dequantized_weight(base)


# ---------------------------------------------------------------------------------------------- load
def _check_load(model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    """Every key must land: unexpected keys are errors, missing ones only if tied to a loaded tensor."""
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in state if k not in missing}
    untied = [k for k in missing if state[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(f"bitmap checkpoint does not match the model: unexpected {unexpected[:5]}, "
                           f"missing {untied[:5]}")


def compressed_dir(path: Path | str) -> Path:
    """The folder holding the bitmap form: ``path`` itself, a run's ``compressed/`` or (runs exported before the
    folders were split) a run's ``model/``.

    Raises:
        FileNotFoundError: none of them holds ``sparse_base.bitmap.safetensors``.
    """
    path = Path(path)
    for folder in (path, path / "compressed", path / "model"):
        if (folder / BITMAP_FILE).is_file():
            return folder
    raise FileNotFoundError(f"{path} holds no SALR bitmap form ({BITMAP_FILE}, in it or in its compressed/): give a "
                            "salr run directory or its compressed/ folder, exported with export.formats containing "
                            "bitmap (the default)")


def load_salr_export(path: Path | str, base_format: str = "dense", with_adapter: bool = True,
                     device: torch.device | str = "cpu") -> PreTrainedModel:
    """Rebuild an exported SALR model from its bitmap form alone (and the fused adapter beside it).

    Every tensor comes from ``sparse_base.bitmap.safetensors`` (pruned matrices decoded, the rest stored dense),
    the architecture from ``config.json`` and the adapter from ``adapter_model.safetensors``, all in one folder
    (``compressed_dir``); ``model/`` is not read.

    Args:
        path: a salr run directory or its ``compressed/``.
        base_format: how the pruned linears run: ``dense`` (decoded ``nn.Linear``), ``bitmap``
            (``BitmapLinear``, decoded in every forward) or ``semi_structured`` (2:4 kernels, CUDA).
        with_adapter: wrap the pruned linears in ``SalrLinear`` holding the fused adapter (scaling 1);
            false returns the bare pruned base (for ``PeftModel.from_pretrained(base, "adapter")``).
        device: where the model goes.

    Returns:
        The model in eval mode, every parameter frozen.
    """
    model_dir = compressed_dir(path)
    bitmaps, state = load_bitmaps(model_dir / BITMAP_FILE)
    dtype = next(iter(bitmaps.values())).dtype if bitmaps else None
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    state.update({key: decode(bitmap) for key, bitmap in bitmaps.items()})
    result = model.load_state_dict(state, strict=False)
    _check_load(model, result.missing_keys, result.unexpected_keys)
    model.requires_grad_(False)
    model.to(device)
    names = [key.removesuffix(".weight") for key in bitmaps]
    for name in names:
        replace_module(model, name, BASE_FORMATS[base_format](model.get_submodule(name)))
    if with_adapter:
        for name, (a, b) in load_fused_adapter(model_dir).items():
            wrapper = SalrLinear(model.get_submodule(name), residual_rank=a.shape[0], rank=0, alpha=0.0)
            wrapper.set_residual(b, a)
            wrapper.requires_grad_(False)
            replace_module(model, name, wrapper)
    return model.eval()
