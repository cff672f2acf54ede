"""The Hugging Face model directory (``model/``): ``save_pretrained`` of a plain model, merged or not.

Loaded with ``AutoModelForCausalLM.from_pretrained("model")`` (transformers), ``LLM(model="model")`` (vLLM) and
any other client of the format: one ``config.json``, the weights as ``model.safetensors`` (sharded with an
index above transformers' shard size), the tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.adapters.lora import merge_lora
from prunedlora.models.surgery import dequantize_linears


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
