"""LoRAPrune's ``structure=uniform`` model (``model/``): a plain checkpoint of the base's own architecture.

Every decoder layer has the same query-head, KV-head and MLP-channel counts with equal GQA groups, so the base's
config describes it once the counts are changed: ``config.json`` keeps ``model_type`` (``llama`` for SmolLM2) and
gets the pruned ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``, with ``head_dim``
written out (``hidden_size / num_attention_heads`` is no longer the head size). No ``auto_map``, no modelling file:
``AutoModelForCausalLM.from_pretrained(dir)`` without remote code, vLLM and the converters that read a
``LlamaConfig`` load it. ``pruning_manifest.json`` (as for ``pruned_llama``) lists the kept head, KV-head and
channel indices per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.export.hf import save_pretrained_dir
from prunedlora.export.pruned_llama import MANIFEST_FILE
from prunedlora.pruning.structure import LayerPlan


def save_uniform_llama(model: nn.Module, tokenizer: Any, out_dir: Path, plans: list[LayerPlan]) -> None:
    """Write a compacted model whose layers all have one shape; the in-memory config is updated to match.

    Raises:
        ValueError: the layers differ in shape or a layer needed k/v expansion (the masks were not uniform).
    """
    shapes = sorted({(p.num_heads, p.num_kv_heads, p.num_channels) for p in plans})
    if len(shapes) != 1 or any(p.expanded for p in plans):
        raise ValueError(f"a uniform export needs one (query heads, KV heads, channels) in every layer with equal "
                         f"GQA groups; the masks give {shapes}. Export it with method.structure=per_layer.")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size), = shapes
    config.head_dim = head_dim
    save_pretrained_dir(model, tokenizer, out_dir)
    config_path = out_dir / "config.json"  # save_pretrained may omit a value equal to the class default
    written = json.loads(config_path.read_text())
    written["head_dim"] = head_dim
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    manifest = {"layers": [p.to_dict() for p in plans]}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
