"""LoRAPrune's per-layer pruned LLaMA (``model/``): a ``pruned_llama`` checkpoint with its own modelling file.

Each decoder layer keeps its own query-head, KV-head and MLP-channel counts, which one ``LlamaConfig`` cannot
describe, so ``config.json`` holds ``model_type: pruned_llama``, the per-layer shape lists and an ``auto_map``
to ``modeling_pruned_llama.py`` (a copy of ``prunedlora/models/pruned_llama.py``), loadable with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. ``pruning_manifest.json`` lists the
kept head, KV-head and channel indices per layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from prunedlora.export.hf import save_pretrained_dir
from prunedlora.models import pruned_llama
from prunedlora.pruning.structure import LayerPlan

MODELING_FILE = "modeling_pruned_llama.py"
MANIFEST_FILE = "pruning_manifest.json"


def model_layout(plans: list[LayerPlan]) -> dict[str, list[int]]:
    """Per-layer shape lists for ``PrunedLlamaConfig``."""
    return {
        "num_attention_heads_per_layer": [p.num_heads for p in plans],
        "num_key_value_heads_per_layer": [p.num_kv_heads for p in plans],
        "intermediate_size_per_layer": [p.num_channels for p in plans],
    }


def save_pruned_llama(model: nn.Module, tokenizer: Any, out_dir: Path, plans: list[LayerPlan]) -> None:
    """Write a compacted model as a ``pruned_llama`` checkpoint that ``from_pretrained`` can rebuild.

    The in-memory model's config is replaced by the ``PrunedLlamaConfig`` too, so it describes the model.
    """
    base = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config"):
        base.pop(key, None)
    config = pruned_llama.PrunedLlamaConfig(**base, **model_layout(plans))
    config.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.PrunedLlamaConfig",
                       "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunedLlamaForCausalLM"}
    model.config = config
    save_pretrained_dir(model, tokenizer, out_dir)
    shutil.copyfile(pruned_llama.__file__, out_dir / MODELING_FILE)
    # save_pretrained records the in-memory class (LlamaForCausalLM); the checkpoint is the pruned one.
    config_path = out_dir / "config.json"
    written = json.loads(config_path.read_text())
    written["architectures"] = ["PrunedLlamaForCausalLM"]
    config_path.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    manifest = {"layers": [p.to_dict() for p in plans]}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
