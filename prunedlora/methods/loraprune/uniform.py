"""LoRAPrune's ``method.structure=uniform``: the same counts in every decoder layer, sized to per_layer's.

Why: a plain ``LlamaConfig`` has one ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``
for every layer, and it is the format every engine and converter reads (transformers without remote code,
vLLM, llama.cpp's converter, MLX). ``per_layer`` pruning leaves layers of different shapes; ``uniform`` keeps
them equal, so its export is a plain checkpoint of the base's own architecture.

Budget. ``uniform`` removes as many parameters as ``per_layer`` would export under the same settings (exempt
layers, GQA policy, ``gqa_balanced``, what is pruned) at the same ``sparsity.final``. That count is computed from
the model's shape alone (``reference_layers``, ``model_parameters``): ``per_layer`` prunes ``floor(f n)`` units of
each prunable layer and leaves the exempt ones whole. Under ``gqa_policy=query_head`` without ``gqa_balanced``
its k/v count depends on where the kept query heads fall; the reference takes the most the exporter ever
writes, one KV head per kept query head (k/v expanded), which is what it writes whenever the kept heads cannot
be spread evenly over the KV groups (SmolLM2-135M at 25% and 50%: 7 or 5 of 9 heads over 3 groups, always).

Layout. Every layer, exempt ones included, keeps the same query heads per KV group, KV heads and channels.
Heads are coarse: ``query_head`` removes the same number of query heads from every KV group (all KV heads stay),
``kv_group`` removes whole KV groups (so does ``query_head`` on multi-head attention, where a group is one head),
and the head count must divide ``hidden_size`` (transformers 5 refuses a ``LlamaConfig`` otherwise, whatever
``head_dim`` says). Among the head layouts for which some channel count then matches the
budget, the one whose fraction of removed query heads is closest to its fraction of removed channels is taken
(per_layer prunes both at the same fraction; ties keep more heads), and the channel count is the one that
matches the budget best: within half a channel per layer, far below 1% of the model.

Schedule. At an event with target ``t`` the counts are the final ones scaled by ``p = t / sparsity.final``:
``floor(p * channels)`` channels (the per_layer rule) and ``round(p * heads)`` head units, or the next fewer that
transformers accepts (heads move in steps of a whole head per group, so they follow a coarser schedule). Every
event leaves every layer with the same counts and every KV group with the same number of query heads, so a run
stopped at any event still exports a plain checkpoint. Each layer still chooses *which* units go by its own scores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.pruning.structure import prunable_layer_indices

MATCH_TOLERANCE = 0.01
"""Largest relative difference to per_layer's parameter count that a uniform plan may have."""


@dataclass(frozen=True)
class ModelShape:
    """What the parameter count of a LLaMA-family model depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV head (``G``)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape from a transformers config (``LlamaConfig`` and its relatives)."""
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )


@dataclass(frozen=True)
class LayerCounts:
    """What one decoder layer keeps."""

    heads: int
    kv_heads: int
    channels: int


def layer_parameters(shape: ModelShape, counts: LayerCounts) -> int:
    """Parameters of one decoder layer with ``counts`` (projections, their biases, the two norms)."""
    h, d = shape.hidden_size, shape.head_dim
    ab, mb = int(shape.attention_bias), int(shape.mlp_bias)
    attention = counts.heads * d * (2 * h + ab) + counts.kv_heads * 2 * d * (h + ab) + h * ab  # q+o, k+v, o bias
    mlp = counts.channels * (3 * h + 2 * mb) + h * mb  # gate+up rows, down column; down bias
    return attention + mlp + 2 * h


def model_parameters(shape: ModelShape, layers: list[LayerCounts]) -> int:
    """Parameters of the whole model whose decoder layers keep ``layers`` (embeddings, final norm, lm_head)."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return embeddings + shape.hidden_size + sum(layer_parameters(shape, c) for c in layers)


def removed_count(fraction: float, units: int) -> int:
    """Units per_layer removes for a target fraction: ``floor(f * n)``, keeping at least one."""
    return min(math.floor(fraction * units + 1e-9), units - 1)


def per_layer_counts(shape: ModelShape, cfg: LoraPruneConfig, fraction: float) -> LayerCounts:
    """What per_layer exports for one prunable layer at ``fraction`` (k/v expanded where it can be)."""
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    if cfg.prune_heads and cfg.gqa_policy == "kv_group":
        kv_heads -= removed_count(fraction, kv_heads)
        heads = kv_heads * shape.group_size
    elif cfg.prune_heads and cfg.gqa_balanced:
        heads = kv_heads * (shape.group_size - removed_count(fraction, shape.group_size))
    elif cfg.prune_heads:
        heads -= removed_count(fraction, heads)
        kv_heads = kv_heads if heads == shape.num_heads else heads  # expanded: one KV head per query head
    channels = shape.intermediate_size
    if cfg.prune_channels:
        channels -= removed_count(fraction, channels)
    return LayerCounts(heads, kv_heads, channels)


def reference_layers(shape: ModelShape, cfg: LoraPruneConfig, fraction: float) -> list[LayerCounts]:
    """Every layer's counts in per_layer's export: prunable layers pruned, exempt ones whole."""
    prunable = set(prunable_layer_indices(shape.num_layers, cfg.exempt_first_frac, cfg.exempt_last))
    pruned = per_layer_counts(shape, cfg, fraction)
    full = LayerCounts(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
    return [pruned if i in prunable else full for i in range(shape.num_layers)]


@dataclass(frozen=True)
class UniformPlan:
    """The final counts of ``structure=uniform`` (the same in every layer) and the budget they match."""

    head_unit: str
    """``per_group``: query heads removed from every KV group alike; ``kv_group``: whole KV groups."""
    heads_removed: int
    """Head units each layer loses by the end: query heads per KV group, or KV groups."""
    channels_removed: int
    kept: LayerCounts
    head_steps: tuple[int, ...]
    """Head-unit counts an event may reach (those whose head count transformers accepts), ascending."""
    parameters: int
    """The exported model's parameter count."""
    reference_parameters: int
    """per_layer's exported parameter count under the same settings."""

    def removed_at(self, progress: float) -> tuple[int, int]:
        """(head units, channels) removed per layer at ``progress`` = target / sparsity.final in [0, 1]."""
        nearest = math.floor(progress * self.heads_removed + 0.5)  # whole heads per group (or groups), ties up
        heads = max(n for n in self.head_steps if n <= nearest)
        channels = math.floor(progress * self.channels_removed + 1e-9)
        return min(heads, self.heads_removed), min(channels, self.channels_removed)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept": asdict(self.kept),
                "parameters_vs_per_layer": self.parameters / self.reference_parameters - 1}


def _head_layouts(shape: ModelShape, cfg: LoraPruneConfig) -> list[tuple[int, LayerCounts]]:
    """(head units removed, counts with no channel yet) of every layout the policy allows."""
    g, n_kv = shape.group_size, shape.num_kv_heads
    if not cfg.prune_heads:
        return [(0, LayerCounts(shape.num_heads, n_kv, 0))]
    if _head_unit(shape, cfg) == "kv_group":
        layouts = [(r, LayerCounts((n_kv - r) * g, n_kv - r, 0)) for r in range(n_kv)]
    else:
        layouts = [(r, LayerCounts(n_kv * (g - r), n_kv, 0)) for r in range(g)]
    # transformers >= 5 refuses a LlamaConfig whose hidden_size is not a multiple of num_attention_heads, even
    # with head_dim given: such a head count would not load (the unpruned count always passes).
    return [(r, c) for r, c in layouts if shape.hidden_size % c.heads == 0]


def _head_unit(shape: ModelShape, cfg: LoraPruneConfig) -> str:
    """kv_group for that policy and for multi-head attention (a group of one head); else per_group."""
    return "kv_group" if cfg.prune_heads and (cfg.gqa_policy == "kv_group" or shape.group_size == 1) else "per_group"


def uniform_plan(shape: ModelShape, cfg: LoraPruneConfig, fraction: float) -> UniformPlan:
    """The layout of ``structure=uniform`` at ``sparsity.final = fraction`` (see the module docstring)."""
    reference = model_parameters(shape, reference_layers(shape, cfg, fraction))
    per_layer_budget = (reference - model_parameters(shape, [])) / shape.num_layers
    per_channel = layer_parameters(shape, LayerCounts(0, 0, 1)) - layer_parameters(shape, LayerCounts(0, 0, 0))
    m = shape.intermediate_size
    options = []
    layouts = _head_layouts(shape, cfg)
    for removed, heads_only in layouts:
        channels = round((per_layer_budget - layer_parameters(shape, heads_only)) / per_channel)
        feasible = 1 <= channels <= m
        kept = LayerCounts(heads_only.heads, heads_only.kv_heads, min(max(channels, 1), m))
        parameters = model_parameters(shape, [kept] * shape.num_layers)
        balance = abs((1 - kept.heads / shape.num_heads) - (1 - kept.channels / m))
        miss = 0 if feasible else abs(parameters - reference)
        options.append(((not feasible, miss, balance, -kept.heads), removed, kept, parameters))
    _, removed, kept, parameters = min(options, key=lambda o: o[0])
    steps = tuple(r for r, _ in layouts if r <= removed)
    return UniformPlan(_head_unit(shape, cfg), removed, m - kept.channels, kept, steps, parameters, reference)
