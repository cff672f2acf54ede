"""A LLaMA whose decoder layers have their own head counts and MLP widths (structurally pruned models).

LoRAPrune's export (``prunedlora.methods.loraprune``) removes attention heads and MLP channels per layer,
so one ``LlamaConfig`` can no longer describe every layer. This file is copied next to the exported
weights as ``modeling_pruned_llama.py`` and named in ``config.json``'s ``auto_map``, so that

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

rebuilds the model: the standard ``LlamaForCausalLM`` is built from the config, then each layer's
projections are replaced by linears of that layer's size (``*_per_layer`` lists) and each attention
module's ``num_key_value_groups`` is set, before ``from_pretrained`` loads the weights. The forward pass
is the unmodified LLaMA one: HF attention infers the head count from the projection width and repeats
each KV head ``num_key_value_groups`` times, which is why every exported layer has the same number of
query heads per KV head (the exporter expands k/v where a layer's groups ended up unequal).

Self-contained on purpose: it imports only torch and transformers, never prunedlora. Only
``method.structure=per_layer`` needs it: ``uniform`` keeps one shape in every layer and exports a plain
``LlamaConfig`` checkpoint.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class PrunedLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus one entry per decoder layer for the shapes pruning changed.

    ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` keep the unpruned values
    (``head_dim`` and the rotary embedding depend on them); the per-layer lists win for layer shapes.
    A list left ``None`` means every layer has the unpruned value.
    """

    model_type = "pruned_llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


def layer_shapes(config: LlamaConfig) -> list[tuple[int, int, int]]:
    """``(query heads, KV heads, MLP width)`` of every decoder layer of ``config``."""
    n = config.num_hidden_layers
    heads = getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n
    kv_heads = getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads] * n
    widths = getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n
    if not len(heads) == len(kv_heads) == len(widths) == n:
        raise ValueError(f"per-layer shape lists must have num_hidden_layers={n} entries each")
    for i, (h, kv, _) in enumerate(zip(heads, kv_heads, widths)):
        if kv < 1 or h % kv:
            raise ValueError(f"layer {i}: {h} query heads cannot share {kv} KV heads evenly")
    return list(zip(heads, kv_heads, widths))


def resize_llama_layers(model: nn.Module, config: LlamaConfig) -> None:
    """Give every decoder layer of ``model`` (a ``LlamaModel``) the shapes ``config`` lists for it.

    Replaces the seven projections by fresh ``nn.Linear`` of the per-layer size (weights are loaded
    afterwards) and sets ``num_key_value_groups`` and the MLP's ``intermediate_size``.
    """
    hidden = config.hidden_size
    for layer, (heads, kv_heads, width) in zip(model.layers, layer_shapes(config)):
        attn, mlp = layer.self_attn, layer.mlp
        d, bias, mbias = attn.head_dim, config.attention_bias, config.mlp_bias
        attn.q_proj = nn.Linear(hidden, heads * d, bias=bias)
        attn.k_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        attn.v_proj = nn.Linear(hidden, kv_heads * d, bias=bias)
        attn.o_proj = nn.Linear(heads * d, hidden, bias=bias)
        attn.num_key_value_groups = heads // kv_heads
        mlp.gate_proj = nn.Linear(hidden, width, bias=mbias)
        mlp.up_proj = nn.Linear(hidden, width, bias=mbias)
        mlp.down_proj = nn.Linear(width, hidden, bias=mbias)
        mlp.intermediate_size = width


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with per-layer head counts and MLP widths from a ``PrunedLlamaConfig``."""

    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig) -> None:
        super().__init__(config)
        resize_llama_layers(self.model, config)
        self.post_init()
