"""SALR's bitmap form: every pruned matrix bitmap-encoded, every other tensor dense, in one safetensors file.

The encoding itself (per row one presence byte per 8 columns, the packed non-zero values, int64 row offsets) is
``prunedlora.pruning.bitmap``'s; this module decides what goes into the file and writes the size report
``salr_storage.json`` next to it. Both live in ``compressed/``, beside ``config.json``, the tokenizer and the fused
adapter (``peft_adapter``), so that ``prunedlora.export.compressed.load_salr_export("compressed")`` rebuilds the
model from that folder alone. No serving engine reads this form: ``model/`` and ``adapter/`` are what gets served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunedlora.pruning.bitmap import BitmapTensor, encode, save_bitmaps, size_report

BITMAP_FILE = "sparse_base.bitmap.safetensors"
STORAGE_FILE = "salr_storage.json"
CLIENT = 'prunedlora.export.compressed.load_salr_export("compressed"); prunedlora-eval run_dir=<run>'


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with tied tensors (shared storage) kept once, under their first name."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[key] = tensor
    return state


def file_bytes(directory: Path, pattern: str) -> int:
    """Bytes of the files in ``directory`` matching the glob ``pattern``."""
    return sum(p.stat().st_size for p in directory.glob(pattern))


def save_bitmap_form(state: dict[str, torch.Tensor], pruned: list[str], out_dir: Path
                     ) -> tuple[dict[str, BitmapTensor], dict[str, Any]]:
    """Write ``BITMAP_FILE``: the ``pruned`` modules' weights bitmap-encoded, the rest of ``state`` dense.

    Args:
        state: the plain model's state dict, tied tensors once (``unique_state_dict``); not modified.
        pruned: module names whose ``.weight`` is stored in bitmap form.
        out_dir: the folder to write into (created).

    Returns:
        ``(bitmaps, report)``: the encoded matrices and ``size_report`` of them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dense = dict(state)
    bitmaps = {f"{name}.weight": encode(dense.pop(f"{name}.weight")) for name in pruned}
    save_bitmaps(out_dir / BITMAP_FILE, bitmaps, dense)
    return bitmaps, size_report(bitmaps)


def dense_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of ``state``'s tensors stored dense: the weights of the same model saved as ``model/``."""
    return sum(t.numel() * t.element_size() for t in state.values())


def write_storage_report(report: dict[str, Any], out_dir: Path, dense_weight_bytes: int) -> dict[str, Any]:
    """Add the folder's file sizes to ``report`` (``files``) and write it as ``salr_storage.json``.

    ``files`` compares the weight files of ``out_dir`` with ``dense_weight_bytes``, the same model stored dense in
    the same dtype (``model/``'s weights): ``ratio`` for the bitmap file alone, ``ratio_with_adapter`` with the
    fused adapter that ``out_dir`` also holds. Returns ``files``.
    """
    bitmap, weights = file_bytes(out_dir, BITMAP_FILE), file_bytes(out_dir, "*.safetensors")
    files = {"dense_weight_bytes": dense_weight_bytes, "bitmap_file_bytes": bitmap,
             "adapter_file_bytes": weights - bitmap, "ratio": bitmap / dense_weight_bytes,
             "ratio_with_adapter": weights / dense_weight_bytes}
    report["files"] = files
    (out_dir / STORAGE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return files
