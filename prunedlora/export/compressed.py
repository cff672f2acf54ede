"""Loading SALR's compressed form back into a model that runs and generates: ``load_salr_export``.

``compressed/`` (written by ``bitmap`` and ``peft_adapter``) holds everything the model needs: ``config.json``,
``sparse_base.bitmap.safetensors`` (the pruned matrices in bitmap form, every other tensor dense) and the fused
adapter. The loader builds the architecture with empty parameters, puts one linear built straight from each stored
bitmap where each pruned ``nn.Linear`` was (``prunedlora.pruning.fused_bitmap.bitmap_base``), assigns the dense
tensors and wraps the pruned linears in ``SalrLinear`` holding the fused adapter (rank ``r_res + r``, scaling 1).
With ``base_format`` ``auto``, ``fused`` or ``bitmap`` no pruned matrix exists dense in memory beyond the one that
``auto`` decodes to time a shape, so the loaded model takes the compressed form's bytes.

``base_format`` (``prunedlora.config.SALR_BASE_FORMATS``, the names ``method.base_format`` takes in training):

- ``auto`` (default): per shape, the fused kernel where it beats the dense GEMV at one token, else the decoded
  ``nn.Linear`` (measured once per shape and thread count; dense off CPU or without the kernel);
- ``fused``: ``FusedBitmapLinear`` everywhere (the fused kernel up to a few tokens, tiled decode + GEMM above);
- ``bitmap``: ``BitmapLinear``, the reference that decodes the whole matrix in every forward;
- ``dense``: the decoded ``nn.Linear`` (the dense model's memory and speed);
- ``semi_structured``: PyTorch's 2:4 kernels (CUDA, ``method.pattern=2:4``).

The result is an ordinary ``transformers`` model: ``model.generate`` runs with its KV cache, the pruned linears
seeing one token per step after the prompt.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from prunedlora.adapters.salr import SalrLinear, salr_modules
from prunedlora.config import SALR_BASE_FORMATS
from prunedlora.export.bitmap import BITMAP_FILE
from prunedlora.export.peft_adapter import load_fused_adapter
from prunedlora.models.surgery import replace_module
from prunedlora.pruning.bitmap import BitmapLinear, BitmapTensor, SemiStructuredLinear, load_bitmaps
from prunedlora.pruning.fused_bitmap import FusedBitmapLinear, bitmap_base

log = logging.getLogger(__name__)

# The base_format each sparse-base type runs as (for reports: what `auto` kept).
_FORMAT_OF: dict[type, str] = {FusedBitmapLinear: "fused", BitmapLinear: "bitmap", nn.Linear: "dense",
                               SemiStructuredLinear: "semi_structured"}


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


def _sparse_base(bitmap: BitmapTensor, bias: torch.Tensor | None, base_format: str,
                 device: torch.device) -> nn.Module:
    """The linear that runs one stored matrix (on CPU, except ``semi_structured``, built on ``device``)."""
    if base_format == "semi_structured":  # PyTorch's 2:4 tensors are built from the dense weight on the GPU
        return SemiStructuredLinear(bitmap_base(bitmap, bias, "dense").to(device))
    return bitmap_base(bitmap, bias, base_format)


def _check_load(model: nn.Module, unexpected: list[str]) -> None:
    """Every stored tensor must land and every model tensor must come from the file (none left empty)."""
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if unexpected or empty:
        raise RuntimeError(f"the bitmap checkpoint does not match its config.json: tensors the model lacks "
                           f"{unexpected[:5]}, model tensors the file lacks {empty[:5]}")


def load_salr_export(path: Path | str, base_format: str = "auto", with_adapter: bool = True,
                     device: torch.device | str = "cpu") -> PreTrainedModel:
    """Rebuild an exported SALR model from its compressed form alone (see the module docstring).

    Args:
        path: a salr run directory or its ``compressed/``; ``model/`` is not read.
        base_format: how the pruned linears run: ``auto``, ``fused``, ``bitmap``, ``dense`` or ``semi_structured``.
            ``auto`` off CPU runs ``dense``.
        with_adapter: wrap the pruned linears in ``SalrLinear`` holding the fused adapter; false returns the bare
            pruned base (for ``PeftModel.from_pretrained(base, "compressed")``).
        device: where the model goes.

    Returns:
        The model in eval mode, every parameter frozen.

    Raises:
        ValueError: an unknown ``base_format``. FileNotFoundError: no bitmap form under ``path``.
    """
    if base_format not in SALR_BASE_FORMATS:
        raise ValueError(f"base_format={base_format!r} is not one of {list(SALR_BASE_FORMATS)}")
    device = torch.device(device)
    fmt = "dense" if base_format == "auto" and device.type != "cpu" else base_format  # the kernel is CPU code
    model_dir = compressed_dir(path)
    bitmaps, state = load_bitmaps(model_dir / BITMAP_FILE)
    dtype = next(iter(bitmaps.values())).dtype if bitmaps else None
    with init_empty_weights():  # parameters on the meta device (no memory, no random init); buffers real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    for key in list(bitmaps):
        name = key.removesuffix(".weight")
        replace_module(model, name, _sparse_base(bitmaps.pop(key), state.pop(f"{name}.bias", None), fmt, device))
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied tensors are stored once (lm_head with the embeddings)
    _check_load(model, result.unexpected_keys)
    model.requires_grad_(False)
    model.to(device)
    if with_adapter:
        for name, (a, b) in load_fused_adapter(model_dir).items():
            wrapper = SalrLinear(model.get_submodule(name), residual_rank=a.shape[0], rank=0, alpha=0.0)
            wrapper.set_residual(b, a)
            wrapper.requires_grad_(False)
            replace_module(model, name, wrapper)
    log.info("loaded %s with base_format=%s: %s", model_dir, base_format,
             ", ".join(f"{n} {f}" for f, n in sorted(base_formats(model).items())) or "no adapted linears")
    return model.eval()


def base_formats(model: nn.Module) -> dict[str, int]:
    """How many of ``model``'s ``SalrLinear`` bases run as each base format (what ``auto`` kept)."""
    return dict(Counter(_FORMAT_OF.get(type(w.base_layer), type(w.base_layer).__name__)
                        for w in salr_modules(model).values()))
