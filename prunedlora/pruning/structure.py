"""Structured pruning of LLaMA decoder layers: dependency groups, masks during training, compaction at export.

Dependency groups (docs/methods.md §5.2, §7 item 3). With ``d`` the head dimension, ``n_q`` query heads,
``n_kv`` KV heads and ``G = n_q / n_kv`` query heads per KV head:

- query head ``h``: rows ``h*d:(h+1)*d`` of ``q_proj`` and the same columns of ``o_proj``;
- KV head ``g``: rows ``g*d:(g+1)*d`` of ``k_proj`` and ``v_proj``, shared by query heads ``g*G .. g*G+G-1``;
- MLP channel ``c``: row ``c`` of ``gate_proj`` and ``up_proj``, column ``c`` of ``down_proj``.

GQA policy (docs/methods.md §5.6). The unit is the **query head**; a KV head (its k/v rows) is removed only
when every query head sharing it is removed (``gqa_policy=query_head``, the default). The alternative
``gqa_policy=kv_group`` removes a KV head together with all its query heads as one unit. Either way the
masks are stored per query head; the KV mask is derived (a KV head is kept while any of its query
heads is). ``gqa_balanced`` (query_head only) removes the same number of query heads from every KV group
of a layer, so the layer stays standard GQA at export; so does ``structure=uniform`` (``methods.loraprune.uniform``),
which also removes the same counts from every layer.

Masks during training (DeepSpeed cannot follow a parameter reshaped after ``initialize``, and bitsandbytes'
packed 4-bit weights cannot be zeroed per row or column): nothing is reshaped or edited in place while the optimizer
exists. Each prunable layer gets a ``StructureMask`` child module (buffers ``head_mask`` and
``channel_mask``, so checkpoints carry them) and forward hooks: the outputs of q/k/v/gate/up are
multiplied by their row masks and the *inputs* of o_proj/down_proj by their column masks. Masking the
o_proj input is what removes a head: with only its q rows zeroed a head attends uniformly and still
emits the mean of its values. Because only module outputs are touched, a bitsandbytes 4/8-bit base
trains the same way (its packed weights are never edited).

Compaction at export (``compact_model``): rows of q/k/v/gate/up and columns of o/down are sliced out of
the base linears and, for LoRA-wrapped ones, out of ``lora_B`` (rows) or ``lora_A`` (columns), so the
merged result equals the masked model exactly. HF attention has one ``num_key_value_groups`` per
layer, so a layer whose surviving query heads are spread unequally over its KV heads cannot stay GQA:
there k/v are **expanded** to one KV head per surviving query head (a copy of the k/v rows it used;
exact, at the cost of k/v parameters and KV cache). Layers with equal counts stay GQA with the
surviving KV heads only. A layer never loses all its heads or channels: ``select_pruned`` keeps at least
``min_keep`` units (1), and a schedule below 100% never asks for more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunedlora.adapters.lora import LoRALinear
from prunedlora.models.surgery import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, projection

ROW_PROJECTIONS = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "channel", "up_proj": "channel"}
"""Linears whose *output rows* belong to a group, and which group mask covers them."""
COLUMN_PROJECTIONS = {"o_proj": "q", "down_proj": "channel"}
"""Linears whose *input columns* belong to a group."""
MASK_MODULE = "structure_mask"
"""Attribute name of the ``StructureMask`` child added to each prunable decoder layer."""


# ------------------------------------------------------------------------------------------ layout
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-family causal LM (``model.model.layers``).

    Raises:
        ValueError: the model does not have the LLaMA layout structured pruning relies on.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    first = layers[0] if layers is not None and len(layers) else None
    ok = first is not None and all(hasattr(first.self_attn, p) for p in ATTENTION_PROJECTIONS) and all(
        hasattr(first.mlp, p) for p in MLP_PROJECTIONS)
    if not ok:
        raise ValueError(
            f"method=loraprune needs a LLaMA-family model (model.layers[i].self_attn.{{q,k,v,o}}_proj and "
            f"mlp.{{gate,up,down}}_proj); {type(model).__name__} has a different layout. Use a LLaMA, Mistral, "
            "Qwen2 or SmolLM2 checkpoint."
        )
    return layers


def prunable_layer_indices(num_layers: int, exempt_first_frac: float, exempt_last: int) -> list[int]:
    """Layers pruning may touch: all but the first ``floor(frac * L)`` and the last ``exempt_last``.

    32 layers with the defaults (0.1, 1) exempt 0-2 and 31, as the authors' code (docs/methods.md §5.3).
    """
    first = math.floor(exempt_first_frac * num_layers + 1e-9)
    return [i for i in range(first, num_layers - exempt_last)]


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention module."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (``G``)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, attn: nn.Module) -> AttentionShape:
        """Read the layout from the projection widths (what HF attention itself does)."""
        d = attn.head_dim
        return cls(attn.q_proj.out_features // d, attn.k_proj.out_features // d, d)


def intermediate_size(mlp: nn.Module) -> int:
    return mlp.gate_proj.out_features


# ------------------------------------------------------------------------------------------- masks
class StructureMask(nn.Module):
    """Keep-masks of one decoder layer (1 kept, 0 pruned): per query head and per MLP channel.

    The KV-head mask is derived: a KV head stays while any query head sharing it does.
    """

    def __init__(self, shape: AttentionShape, num_channels: int) -> None:
        super().__init__()
        self.shape = shape
        self.register_buffer("head_mask", torch.ones(shape.num_heads))  # (n_q,)
        self.register_buffer("channel_mask", torch.ones(num_channels))  # (m,)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def kv_mask(self) -> torch.Tensor:
        """(n_kv,): 1 while at least one query head of the KV group is kept."""
        return self.head_mask.view(self.shape.num_kv_heads, self.shape.group_size).amax(dim=1)

    def feature_mask(self, kind: str) -> torch.Tensor:
        """Per-feature mask of a projection's grouped dimension: ``q`` (n_q*d), ``kv`` (n_kv*d) or ``channel``."""
        if kind == "channel":
            return self.channel_mask
        heads = self.head_mask if kind == "q" else self.kv_mask()
        return heads.repeat_interleave(self.shape.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={int(self.head_mask.sum())}/{self.shape.num_heads}, "
                f"channels={int(self.channel_mask.sum())}/{self.channel_mask.numel()}")


def _output_hook(mask: StructureMask, kind: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * mask.feature_mask(kind).to(output.dtype)  # (..., d_out) * (d_out,)

    return hook


def _input_hook(mask: StructureMask, kind: str):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * mask.feature_mask(kind).to(x.dtype), *args[1:])  # (..., d_in) * (d_in,)

    return hook


def attach_structure_masks(model: nn.Module, layer_indices: list[int]) -> dict[int, StructureMask]:
    """Add a ``StructureMask`` (all ones) and its masking hooks to each listed decoder layer.

    Call after LoRA injection, so the hooks sit on the wrappers and mask base + LoRA together.
    Returns the masks by layer index.
    """
    layers = decoder_layers(model)
    masks: dict[int, StructureMask] = {}
    for i in layer_indices:
        layer = layers[i]
        mask = StructureMask(AttentionShape.of(layer.self_attn), intermediate_size(layer.mlp))
        mask.to(device=layer.input_layernorm.weight.device)
        layer.add_module(MASK_MODULE, mask)
        for name, kind in ROW_PROJECTIONS.items():
            mask._handles.append(projection(layer, name).register_forward_hook(_output_hook(mask, kind)))
        for name, kind in COLUMN_PROJECTIONS.items():
            mask._handles.append(projection(layer, name).register_forward_pre_hook(_input_hook(mask, kind)))
        masks[i] = mask
    return masks


def detach_structure_masks(model: nn.Module) -> dict[int, StructureMask]:
    """Remove every ``StructureMask`` and its hooks from ``model``; returns them by layer index."""
    masks: dict[int, StructureMask] = {}
    for i, layer in enumerate(decoder_layers(model)):
        mask = layer._modules.pop(MASK_MODULE, None)
        if mask is not None:
            for handle in mask._handles:
                handle.remove()
            mask._handles.clear()
            masks[i] = mask
    return masks


# ------------------------------------------------------------------------------------- selection
def select_pruned(scores: torch.Tensor, keep: torch.Tensor, num_pruned: int, min_keep: int = 1) -> torch.Tensor:
    """New keep-mask with the ``num_pruned`` lowest-scoring units removed, cumulatively.

    Units already removed count towards ``num_pruned`` and always rank lowest, so a decision is never
    undone (docs/methods.md §5.3); ties go to the lower index (stable sort). At least ``min_keep`` stay.

    Args:
        scores: (n,) importance, higher is more important.
        keep: (n,) current keep-mask (1 kept, 0 removed).
        num_pruned: total units that should be removed after this call.
    """
    n = keep.numel()
    removed = keep <= 0
    num_pruned = min(max(num_pruned, int(removed.sum())), n - min_keep)
    key = scores.detach().float().clone()
    key[removed] = -math.inf
    order = torch.sort(key, stable=True).indices
    new_keep = torch.ones_like(keep)
    new_keep[order[:num_pruned]] = 0
    return new_keep


# ------------------------------------------------------------------------------------- compaction
@dataclass
class LayerPlan:
    """What one decoder layer keeps, as indices into its original heads and channels."""

    kept_heads: list[int]
    """Surviving query heads, ascending."""
    kv_source: list[int]
    """For each exported KV head, the original KV head whose k/v rows it holds (repeats when expanded)."""
    kept_channels: list[int]
    expanded: bool = False
    """k/v expanded to one KV head per query head because the GQA groups ended up unequal."""

    @property
    def num_heads(self) -> int:
        return len(self.kept_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_source)

    @property
    def num_channels(self) -> int:
        return len(self.kept_channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_layer(shape: AttentionShape, head_mask: torch.Tensor, channel_mask: torch.Tensor) -> LayerPlan:
    """Turn a layer's masks into a ``LayerPlan`` (standard GQA when it can, expanded k/v otherwise)."""
    kept = torch.nonzero(head_mask > 0).flatten().tolist()
    channels = torch.nonzero(channel_mask > 0).flatten().tolist()
    kv_of = [h // shape.group_size for h in kept]
    counts = {g: kv_of.count(g) for g in sorted(set(kv_of))}
    if len(set(counts.values())) <= 1:  # every surviving KV group kept the same number of query heads
        return LayerPlan(kept, list(counts), channels)
    return LayerPlan(kept, kv_of, channels, expanded=True)


def full_plan(layer: nn.Module) -> LayerPlan:
    """The identity plan of an unpruned layer."""
    shape = AttentionShape.of(layer.self_attn)
    return LayerPlan(list(range(shape.num_heads)), list(range(shape.num_kv_heads)),
                     list(range(intermediate_size(layer.mlp))))


def _head_features(heads: list[int], head_dim: int, device: torch.device) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long, device=device)
    return (idx[:, None] * head_dim + torch.arange(head_dim, device=device)).flatten()  # (len(heads) * d,)


def _slice_linear(linear: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` (0: output rows, 1: input columns) of a plain ``nn.Linear``, in place."""
    if type(linear) is not nn.Linear:
        raise TypeError(f"cannot slice {type(linear).__name__}: physical compaction needs a float nn.Linear")
    weight = linear.weight
    linear.weight = nn.Parameter(weight.detach().index_select(dim, index.to(weight.device)).clone(),
                                 requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[index.to(weight.device)].clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def slice_projection(module: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Slice a projection in place: output rows (``dim=0``) or input columns (``dim=1``).

    For a ``LoRALinear`` the base layer and the matching LoRA factor are sliced together: rows of
    ``lora_B`` (``B' A = (B A)[rows]``) or columns of ``lora_A`` (``B A' = (B A)[:, cols]``), so a
    later merge gives exactly the sliced merged weight.
    """
    if isinstance(module, LoRALinear):
        _slice_linear(module.base_layer, index, dim)
        _slice_linear(module.lora_B if dim == 0 else module.lora_A, index, dim)
        if dim == 0:
            module.out_features = len(index)
        else:
            module.in_features = len(index)
    else:
        _slice_linear(module, index, dim)


def compact_layer(layer: nn.Module, plan: LayerPlan) -> None:
    """Physically remove what ``plan`` drops from one decoder layer (in place; masks must be detached)."""
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    device = layer.input_layernorm.weight.device
    q_features = _head_features(plan.kept_heads, d, device)
    kv_features = _head_features(plan.kv_source, d, device)
    channels = torch.tensor(plan.kept_channels, dtype=torch.long, device=device)
    slice_projection(attn.q_proj, q_features, 0)
    slice_projection(attn.k_proj, kv_features, 0)
    slice_projection(attn.v_proj, kv_features, 0)
    slice_projection(attn.o_proj, q_features, 1)
    attn.num_key_value_groups = plan.num_heads // plan.num_kv_heads
    slice_projection(mlp.gate_proj, channels, 0)
    slice_projection(mlp.up_proj, channels, 0)
    slice_projection(mlp.down_proj, channels, 1)
    mlp.intermediate_size = plan.num_channels


def compact_model(model: nn.Module, plans: dict[int, LayerPlan]) -> list[LayerPlan]:
    """Compact every layer that has a plan; returns the plan of every layer (identity where none).

    Masks must have been removed first (``detach_structure_masks``): the compacted shapes no longer
    match them.
    """
    layers = decoder_layers(model)
    if any(hasattr(layer, MASK_MODULE) for layer in layers):
        raise RuntimeError("detach the structure masks before compacting (their shapes refer to the dense layers)")
    result = []
    for i, layer in enumerate(layers):
        plan = plans.get(i)
        if plan is None:
            plan = full_plan(layer)
        else:
            compact_layer(layer, plan)
        result.append(plan)
    return result
