"""Writing what a run deploys: the merged model directory and the parameter counts of the summary.

Method-specific export (PEFT adapter slicing, physical compaction, bitmap storage) lives with each
method; this module holds the steps they share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import merge_lora
from prunedlora.models.load import count_parameters
from prunedlora.models.surgery import dequantize_linears

__all__ = ["count_parameters", "dequantize_base", "save_merged_model", "save_pretrained_dir"]


def save_pretrained_dir(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` model and tokenizer into ``out_dir`` (safetensors, KV cache on for serving)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True  # training turns the cache off; a deployed model wants it
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(str(out_dir))


def dequantize_base(model: nn.Module) -> None:
    """Turn a bitsandbytes-quantized base back into float linears (in place), as QLoRA deployments do.

    Packed 4/8-bit weights cannot absorb a LoRA update; the merged export is therefore a float model of the
    dequantized base plus the adapter (the adapter-only export in ``adapter/`` keeps the quantized path).
    ``dequantize_linears`` also reads the layout bitsandbytes repacks 4-bit weights into for its CPU kernel.
    """
    dequantize_linears(model)


def save_merged_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """Merge every LoRA adapter into its base linear (in place) and save the plain model."""
    dequantize_base(model)
    merge_lora(model)
    save_pretrained_dir(model, tokenizer, out_dir)
