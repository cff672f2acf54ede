"""SALR's export (``export_salr``), never merged: a dense ``BA`` would destroy the sparsity.

docs/methods.md §6.4 item 7.

One folder per client: ``model/`` the pruned base as a plain Hugging Face model (zeros in place, the base's dtype),
``adapter/`` the residual and task adapters fused into one PEFT LoRA of rank ``r_res + r`` (scaling 1) on ``model/``,
and ``compressed/`` the bitmap form with its own copy of that adapter, which
``prunedlora.export.compressed.load_salr_export`` rebuilds alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.salr import SalrLinear, salr_modules
from prunedlora.export import count_parameters, describe
from prunedlora.export.bitmap import CLIENT as BITMAP_CLIENT
from prunedlora.export.bitmap import dense_bytes, save_bitmap_form, unique_state_dict, write_storage_report
from prunedlora.export.hf import CLIENT as HF_CLIENT
from prunedlora.export.hf import save_config_dir, save_pretrained_dir
from prunedlora.export.peft_adapter import CLIENT as ADAPTER_CLIENT
from prunedlora.export.peft_adapter import save_fused_adapter
from prunedlora.methods.salr.formats import sparse_base_weight
from prunedlora.models.surgery import replace_module


def dense_linear(base: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` equal to ``base`` (``base`` itself when it already is one)."""
    if type(base) is nn.Linear:
        return base
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
    weight = sparse_base_weight(base)
    linear.to(device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if base.bias is not None:
        linear.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
    return linear


@contextlib.contextmanager
def plain_bases(model: nn.Module) -> Iterator[dict[str, SalrLinear]]:
    """Temporarily put dense ``nn.Linear`` bases where the ``SalrLinear`` wrappers are (for saving)."""
    wrappers = salr_modules(model)
    for name, wrapper in wrappers.items():
        replace_module(model, name, dense_linear(wrapper.base_layer))
    try:
        yield wrappers
    finally:
        for name, wrapper in wrappers.items():
            replace_module(model, name, wrapper)


SALR_FOLDERS = {"hf": "model", "adapter": "adapter", "bitmap": "compressed"}


def export_salr(model: nn.Module, tokenizer: Any, out_dir: Path,
                formats: tuple[str, ...] = tuple(SALR_FOLDERS)) -> dict[str, Any]:
    """Write the folders of ``formats`` (see the module docstring); never merges, each holds one copy.

    ``model`` is left as it was (the recipe evaluates it afterwards). Returns the figures of ``summary.json``:
    ``params_after_export``, ``exports`` (what each folder holds, who loads it, its bytes) and, with ``bitmap``,
    ``bytes_dense``, ``bytes_bitmap``, ``bitmap_ratio`` (pruned matrices only, the format's own ratio) and
    ``checkpoint_bytes`` (the weight files of ``compressed/`` against the dense model's weights).
    """
    folders = {fmt: out_dir / SALR_FOLDERS[fmt] for fmt in formats}
    with plain_bases(model) as wrappers:
        if "hf" in folders:
            save_pretrained_dir(model, tokenizer, folders["hf"])
        if "bitmap" in folders:
            save_config_dir(model, tokenizer, folders["bitmap"])
        state = unique_state_dict(model)
        params_plain = count_parameters(model)[0]
    pruned = sum(int((state[f"{name}.weight"] == 0).sum()) for name in wrappers)
    adapter = sum(w.total_rank * (w.in_features + w.out_features) for w in wrappers.values())
    figures: dict[str, Any] = {"params_after_export": params_plain - pruned + adapter, "exports": {}}
    rank = max(w.total_rank for w in wrappers.values())
    if "hf" in folders:
        figures["exports"]["model"] = describe(folders["hf"], "hf", "the pruned base, dense with zeros in place; "
                                               "serve it with adapter/", HF_CLIENT, serve_with="adapter")
    if "adapter" in folders:  # absolute: AutoPeftModelForCausalLM resolves a relative path against the cwd
        save_fused_adapter(model, folders["adapter"], str((out_dir / SALR_FOLDERS["hf"]).resolve()))
        figures["exports"]["adapter"] = describe(folders["adapter"], "adapter", "the residual and task adapters "
                                                 f"fused into one LoRA of rank {rank}", ADAPTER_CLIENT,
                                                 base="model", rank=rank)
    if "bitmap" in folders:
        figures |= _write_compressed(model, state, list(wrappers), folders["bitmap"])
        figures["exports"]["compressed"] = describe(folders["bitmap"], "bitmap", "the pruned base in bitmap form, "
                                                    "its fused adapter and the size report", BITMAP_CLIENT)
    return figures


def _write_compressed(model: nn.Module, state: dict[str, torch.Tensor], pruned: list[str],
                      out_dir: Path) -> dict[str, Any]:
    """``compressed/`` (beside ``config.json`` and the tokenizer): the bitmap file, the fused adapter (its base is
    this folder's bitmap form) and ``salr_storage.json``; returns the storage figures."""
    _, report = save_bitmap_form(state, pruned, out_dir)
    save_fused_adapter(model, out_dir, str(out_dir.resolve()))
    files = write_storage_report(report, out_dir, dense_bytes(state))
    total = report["total"]
    return {"bytes_dense": total["bytes_dense"], "bytes_bitmap": total["bytes_bitmap"], "bitmap_ratio": total["ratio"],
            "checkpoint_bytes": files}
