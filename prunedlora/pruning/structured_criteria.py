"""LoRAPrune's group importance (docs/methods.md §5.2): weight-level scores, grouped, normalised, averaged.

Each criterion is a record of ``prunedlora.pruning.criteria.STRUCTURED_CRITERIA`` naming its function here.

Per projection, a weight-level importance ``I`` (d_out x d_in) from one of three criteria, all
multiplied against the effective weight ``W~ = W0 + s*BA``:

- ``lora_guided`` (the paper's): ``|G^ ⊙ W~|`` with the LoRA-guided gradient estimate
  ``G^ = G_B A + B G_A - G_B G_A``, minus one SGD step's change of ``BA`` at step size 1:
  ``B'A' - BA = -(G_B A + B G_A) + G_B G_A`` for ``B' = B - G_B``, ``A' = A - G_A``. Only LoRA weights
  and LoRA gradients are needed: the frozen ``W0`` never gets a gradient. ``G^`` is not multiplied by
  ``s`` (as the authors' code; docs/methods.md §8 item 14: it cannot change rankings after the per-module
  normalisation).
- ``magnitude``: ``|W~|``.
- ``true_gradient`` (LLM-Pruner style, the memory baseline): ``|dL/dW0 ⊙ W~|``. It needs the base
  weights' gradients, so the targeted base weights get ``requires_grad`` (kept out of the optimizer):
  autograd then computes and keeps a full ``d_out x d_in`` gradient for each of them, i.e. one more
  copy of every prunable projection (fp32: 4 bytes per parameter, ~0.37 GB for SmolLM2-135M's 26
  prunable layers, ~23 GB for LLaMA-7B's 28; half that in bf16), plus the weight-gradient GEMMs in the
  backward pass. Checkpoints of such runs also hold those base weights (they look trainable).

``score_power`` 2 squares ``I`` (the paper's Taylor form) instead of taking the absolute value (the
code's). Then, per decoder layer (steps of §5.2):

1. row sums of ``I`` for q/k/v/gate/up, column sums for o/down;
2. sums within each head (``head_dim`` consecutive features);
3. L2 normalisation of each module's group vector (``eps = 1e-8``);
4. head score = q + o of the query head + (k + v) of its KV head (``gqa_policy=query_head``), or
   per KV group the sum of its query heads' q + o plus its k + v (``kv_group``); channel score =
   gate + up + down.

A fourth criterion scores the groups directly instead of summing weight scores (docs/methods.md Decisions item 0):
``channel_taylor``, the exact first-order Taylor estimate of the loss change when a group's output is removed
(Molchanov et al. 2019). With ``h`` the input of ``down_proj`` (or ``o_proj``) and ``g = dL/dh``, a channel
scores ``|Σ_t g_t,c h_t,c|`` and a query head ``|Σ_t Σ_{j in head} g_t,j h_t,j|`` (a KV group, for
``kv_group``: the signed sums of its query heads added before the absolute value). ``TaylorCapture`` gets
them from a forward pre-hook that passes those inputs through an identity autograd function whose backward
adds ``Σ_t g ⊙ h`` to a probe vector's gradient, summed over the step's micro-batches: no weight gradient and
no ``d_out x d_in`` matrix. Each vector is then L2-normalised like the others.

``G^`` and ``W~`` are formed per module and dropped at once, so the extra peak memory of
``lora_guided`` scoring is a few ``d_out x d_in`` float32 matrices, one module at a time.

All gradients are the ones the loop hands ``on_before_optimizer_step``: of the mean loss, averaged over
accumulation, unscaled and unclipped (``G_B G_A`` is quadratic in the loss scale, so scaled fp16
gradients would change the balance of the terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from prunedlora.adapters.lora import LoRALinear
from prunedlora.distributed import full_grad, gathered
from prunedlora.models.surgery import dequantized_weight, projection
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.structure import AttentionShape, intermediate_size

NORM_EPS = 1e-8


class GroupOptions(Protocol):
    """The settings group scores read (``LoraPruneConfig`` has them)."""

    prune_heads: bool
    prune_channels: bool
    score_power: int
    gqa_policy: str


# ---------------------------------------------------------------------------------- weights, grads
def base_linear(module: nn.Module) -> nn.Module:
    """The frozen base linear of a projection (the module itself when it has no adapter)."""
    return module.base_layer if isinstance(module, LoRALinear) else module


def effective_weight(module: nn.Module) -> torch.Tensor:
    """``W~ = W0 + s*BA`` (float32, (d_out, d_in)); ``W0`` for a projection without an adapter."""
    weight = dequantized_weight(base_linear(module))
    if isinstance(module, LoRALinear) and not module.merged:
        weight = weight + module.delta_weight().detach()
    return weight


def lora_guided_gradient(module: LoRALinear) -> torch.Tensor | None:
    """``G^ = G_B A + B G_A - G_B G_A`` (float32, (d_out, d_in)); None before any backward."""
    # full_grad: under DeepSpeed ZeRO >= 1 `.grad` is None and the gradient lives in DeepSpeed's partitions.
    g_a, g_b = full_grad(module.lora_A.weight), full_grad(module.lora_B.weight)
    if g_a is None or g_b is None:
        return None
    a = module.lora_A.weight.detach().float()  # (r, d_in)
    b = module.lora_B.weight.detach().float()  # (d_out, r)
    g_a, g_b = g_a.float(), g_b.float()
    # G_B A + B G_A - G_B G_A == G_B (A - G_A) + B G_A: two GEMMs instead of three.
    return g_b @ (a - g_a) + b @ g_a


def lora_guided_score(module: nn.Module) -> torch.Tensor | None:
    """``lora_guided``: ``G^ ⊙ W~`` (None where the projection has no adapter or no gradient yet)."""
    if not isinstance(module, LoRALinear):
        return None
    g_hat = lora_guided_gradient(module)
    return None if g_hat is None else g_hat.mul_(effective_weight(module))


def magnitude_score(module: nn.Module) -> torch.Tensor | None:
    """``magnitude``: ``W~``."""
    return effective_weight(module)


def true_gradient_score(module: nn.Module) -> torch.Tensor | None:
    """``true_gradient``: ``dL/dW0 ⊙ W~`` (None before the base weights have a gradient)."""
    grad = full_grad(base_linear(module).weight)
    return None if grad is None else grad.float() * effective_weight(module)


def weight_importance(module: nn.Module, criterion: str, power: int = 1) -> torch.Tensor | None:
    """``I = |score|`` (power 1) or ``score**2`` (power 2), float32 (d_out, d_in); None if unavailable."""
    score = STRUCTURED_CRITERIA.function(criterion)(module)
    if score is None:
        return None
    score = score.abs_()
    return score if power == 1 else score.pow_(power)


def feature_importance(module: nn.Module, criterion: str, power: int, dim: int) -> torch.Tensor | None:
    """Row sums (``dim=0``: per output feature) or column sums (``dim=1``: per input feature) of ``I``."""
    with gathered(module.parameters()):  # ZeRO-3: whole W0, A and B for the duration of the score
        importance = weight_importance(module, criterion, power)
    if importance is None:
        return None
    return importance.sum(dim=1 - dim)  # (d_out,) or (d_in,)


# ------------------------------------------------------------------------------------------ groups
def group_sum(features: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n * g,) -> (n,): sum consecutive features of one head."""
    return features.view(-1, group_size).sum(dim=1)


def l2_normalise(vector: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return vector / (vector.norm() + eps)


def head_scores(attn: nn.Module, shape: AttentionShape, criterion: str, power: int, policy: str) -> torch.Tensor | None:
    """Importance of each pruning unit of one attention module: query heads, or KV groups for ``kv_group``.

    Returns (n_q,) or (n_kv,); None when a criterion input is missing (e.g. no gradient yet).
    """
    d, g = shape.head_dim, shape.group_size
    parts = {}
    for name, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
        features = feature_importance(getattr(attn, name), criterion, power, dim)
        if features is None:
            return None
        parts[name] = l2_normalise(group_sum(features, d))  # (n_q,) for q/o, (n_kv,) for k/v
    per_query = parts["q_proj"] + parts["o_proj"]  # (n_q,)
    per_kv = parts["k_proj"] + parts["v_proj"]  # (n_kv,)
    if policy == "kv_group":
        return per_query.view(shape.num_kv_heads, g).sum(dim=1) + per_kv
    return per_query + per_kv.repeat_interleave(g)


def channel_scores(mlp: nn.Module, criterion: str, power: int) -> torch.Tensor | None:
    """Importance of each MLP intermediate channel, (m,): normalised gate + up + down."""
    total = None
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        features = feature_importance(getattr(mlp, name), criterion, power, dim)
        if features is None:
            return None
        total = l2_normalise(features) if total is None else total + l2_normalise(features)
    return total


# --------------------------------------------------------------------------------------------- EMA
class GroupEma:
    """Moving average ``S_t = lambda S_{t-1} + (1 - lambda) s_t`` per named group vector, from zero.

    A vector with a NaN or inf entry is not averaged in (that step is skipped for that vector), as the
    authors' code does for NaN.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.values: dict[str, torch.Tensor] = {}

    def update(self, key: str, score: torch.Tensor) -> bool:
        """Average ``score`` into ``key``; returns False (and changes nothing) when it is not finite."""
        if not bool(torch.isfinite(score).all()):  # host sync, once per group vector per step
            return False
        previous = self.values.get(key)
        base = torch.zeros_like(score) if previous is None else previous
        self.values[key] = self.decay * base + (1.0 - self.decay) * score.detach()
        return True

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The average for ``key``, zeros shaped like ``like`` if it was never updated."""
        value = self.values.get(key)
        return torch.zeros_like(like, dtype=torch.float32) if value is None else value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.values.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
        self.values = {k: v.to(device) if device is not None else v.clone() for k, v in state.items()}


# ---------------------------------------------------------------------------------- channel_taylor
TAYLOR_INPUTS = ("o_proj", "down_proj")
"""Projections whose input features are the groups' outputs: heads (o_proj), MLP channels (down_proj)."""


class _TaylorProbe(torch.autograd.Function):
    """Identity on ``h`` whose backward also returns ``Σ_tokens g ⊙ h`` as the gradient of a dummy ``probe``.

    The probe is a leaf vector of ones that the forward never reads, so ``probe.grad`` accumulates the sums
    of every backward pass until it is cleared. A plain autograd function (no tensor hook, no Python side
    effect) keeps ``torch.compile`` to one graph, and ``h`` is saved as a view, so nothing is copied: the
    linear that follows saves the same storage.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (h,) = ctx.saved_tensors
        dtype = torch.promote_types(g.dtype, torch.float32)  # at least float32 (bf16 sums drift)
        sums = (g.to(dtype) * h.to(dtype)).reshape(-1, h.shape[-1]).sum(0)  # (d_in,)
        return g, sums


class TaylorCapture:
    """``Σ_t g_t,j h_t,j`` per input feature of ``o_proj`` and ``down_proj`` of the given layers (signed, float32).

    A forward pre-hook on each projection passes its input ``h`` (after any structure mask's own pre-hook, so
    pruned features score 0) through ``_TaylorProbe`` in every forward that builds a graph; backward adds
    ``Σ_t g ⊙ h`` into that projection's probe gradient. ``take`` returns the sums of the micro-batches since
    the last call and starts new ones.
    """

    def __init__(self, layers: dict[int, nn.Module]) -> None:
        self.probes: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []
        for i, layer in layers.items():
            device = layer.input_layernorm.weight.device
            shape = AttentionShape.of(layer.self_attn)
            widths = {"o_proj": shape.num_heads * shape.head_dim, "down_proj": intermediate_size(layer.mlp)}
            for name in TAYLOR_INPUTS:
                probe = torch.ones(widths[name], device=device, requires_grad=True)
                self.probes[(i, name)] = probe
                self._handles.append(projection(layer, name).register_forward_pre_hook(self._forward_hook(probe)))

    @staticmethod
    def _forward_hook(probe: torch.Tensor):
        def forward_hook(module: nn.Module, args: tuple) -> tuple | None:
            if not torch.is_grad_enabled():
                return None  # evaluation: no gradient will come
            return (_TaylorProbe.apply(args[0], probe), *args[1:])
        return forward_hook

    def take(self) -> dict[tuple[int, str], torch.Tensor]:
        sums = {}
        for key, probe in self.probes.items():
            if probe.grad is not None:
                sums[key], probe.grad = probe.grad, None
        return sums

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def layer_scores(sums: dict[tuple[int, str], torch.Tensor], i: int, shape: AttentionShape,
                     cfg: GroupOptions) -> dict[str, torch.Tensor | None]:
        """Layer ``i``'s normalised ``heads`` / ``channels`` vectors from ``take()``'s sums (None: no gradient)."""
        scores = {}
        if cfg.prune_heads:
            scores["heads"] = taylor_head_scores(sums.get((i, "o_proj")), shape, cfg.score_power, cfg.gqa_policy)
        if cfg.prune_channels:
            scores["channels"] = taylor_channel_scores(sums.get((i, "down_proj")), cfg.score_power)
        return scores


def _magnitude_of(signed: torch.Tensor, power: int) -> torch.Tensor:
    return signed.abs() if power == 1 else signed.pow(power)


def taylor_head_scores(o_sums: torch.Tensor | None, shape: AttentionShape, power: int, policy: str
                       ) -> torch.Tensor | None:
    """Normalised ``|Σ g h|`` per query head (n_q,), or per KV group (n_kv,) for ``kv_group``, from the
    o_proj input sums (n_q * d,); None when no gradient reached them this step."""
    if o_sums is None:
        return None
    per_head = group_sum(o_sums, shape.head_dim)  # signed, (n_q,)
    if policy == "kv_group":
        per_head = per_head.view(shape.num_kv_heads, shape.group_size).sum(dim=1)
    return l2_normalise(_magnitude_of(per_head, power))


def taylor_channel_scores(down_sums: torch.Tensor | None, power: int) -> torch.Tensor | None:
    """Normalised ``|Σ g h|`` per MLP channel (m,) from the down_proj input sums; None without a gradient."""
    return None if down_sums is None else l2_normalise(_magnitude_of(down_sums, power))


# ------------------------------------------------------------------------------------------ combinations
def combine_scores(vectors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The mean of L2-normalised group vectors (``activation_taylor``: activation's and channel_taylor's).

    Each criterion's vector is L2-normalised before it is averaged (as a group's projections are before they are
    added), so neither scale dominates; the moving average of a normalised vector is normalised again here. None
    when one of them is missing (no gradient yet).
    """
    if not vectors or any(v is None for v in vectors):
        return None
    return sum(l2_normalise(v.float()) for v in vectors) / len(vectors)
