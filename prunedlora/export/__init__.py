"""What a run deploys: one folder per client, one module per format it writes.

- ``hf`` -> ``model/`` (module ``hf``): a Hugging Face model directory, loaded by
  ``AutoModelForCausalLM.from_pretrained`` and vLLM. LoRA merged (lora, droplora, adalora, prunedlora); salr's
  pruned base, dense with zeros in place, to serve with ``adapter/``. loraprune ``structure=per_layer`` (module
  ``pruned_llama``): the per-layer pruned LLaMA with its own modelling file, loaded with
  ``trust_remote_code=True``; ``structure=uniform`` (module ``uniform_llama``): every layer pruned alike, a plain
  checkpoint of the base's architecture, loaded like the merged models.
- ``adapter`` -> ``adapter/`` (module ``peft_adapter``): a PEFT LoRA adapter, loaded by
  ``PeftModel.from_pretrained`` and vLLM's LoRA support. On the original base (LoRA family); salr's residual and
  task adapters fused into one LoRA, on ``model/``.
- ``bitmap`` -> ``compressed/`` (module ``bitmap``): salr's pruned base in bitmap form, its fused adapter and the
  size report, loaded back by ``load_salr_export`` (module ``compressed``).

Methods call these from their ``export`` and describe each folder they wrote with ``describe`` (``summary.json``'s
``exports``). This package imports adapters, pruning and models, never methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunedlora.export.hf import dequantize_base, save_merged_model, save_pretrained_dir
from prunedlora.models.load import count_parameters

__all__ = ["WEIGHT_SUFFIXES", "count_parameters", "dequantize_base", "describe", "save_merged_model",
           "save_pretrained_dir", "weight_files"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
"""File endings that hold weights: a serving engine may read every such file in a folder (vLLM reads every
``*.safetensors``), so a folder holds only the weight files its own loader reads."""


def weight_files(folder: Path) -> list[Path]:
    """The weight files directly inside ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def describe(folder: Path, fmt: str, holds: str, client: str, **extra: Any) -> dict[str, Any]:
    """``summary.json``'s entry for one written folder: what it holds, who loads it and its size.

    Args:
        folder: the folder written.
        fmt: its ``export.formats`` name.
        holds: what is in it, in words.
        client: the command that loads it.
        extra: further keys (``base``: the model an adapter goes on; ``serve_with``: a folder needed beside it).

    Returns:
        ``{"format", "holds", "client", "bytes", "weight_bytes", **extra}``: ``bytes`` of every file in it,
        ``weight_bytes`` of its weight files only.
    """
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"format": fmt, "holds": holds, "client": client, "bytes": sum(p.stat().st_size for p in files),
            "weight_bytes": sum(p.stat().st_size for p in weight_files(folder)), **extra}
