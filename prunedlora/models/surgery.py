"""Model surgery that the adapters, the methods and the export share, each operation written once.

- :func:`target_module_names`: the linears ``method.target_modules`` names (one error message for every method);
- :func:`replace_module`: put a module in place of another, by its dotted name;
- :func:`dequantized_weight` and :func:`dequantize_linears`: read or replace bitsandbytes 4/8-bit linears, including
  the layout bitsandbytes repacks 4-bit weights into for its CPU kernel (which transformers' ``model.dequantize()``
  cannot read);
- :func:`projection`: a decoder layer's ``q_proj`` ... ``down_proj``, wherever LLaMA keeps it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from prunedlora.config import ConfigError
from prunedlora.models.quantize import restore_standard_layout

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")
"""bitsandbytes' weight classes, checked by name so that nothing imports bitsandbytes for a float model."""


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def target_module_names(model: nn.Module, target_modules: Iterable[str],
                        is_candidate: Callable[[nn.Module], bool] = _is_linear) -> list[str]:
    """Names of the candidate modules whose last name component is targeted, in ``named_modules`` order
    (``all-linear``: every candidate but ``lm_head``).

    Raises:
        ConfigError: nothing matches; the message lists the model's linear layer names.
    """
    targets = list(target_modules)

    def wanted(name: str, module: nn.Module) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        return bool(name) and is_candidate(module) and (
            leaf in targets or ("all-linear" in targets and leaf != "lm_head"))

    names = [name for name, module in model.named_modules() if wanted(name, module)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"method.target_modules={targets} matches no linear layer of this model. Its linear layers "
                          f"are named {leaves}; set method.target_modules to some of these, or to [all-linear].")
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` where ``model``'s submodule ``name`` is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


@contextmanager
def swapped_modules(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """``model`` with each named submodule replaced by the given module, the originals put back on exit (also on an
    error). The names must not nest."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            originals[name] = replace_module(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            replace_module(model, name, module)


def adapter_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules of ``model`` that wrap a ``base_layer`` (PEFT's convention, which ``LoRALinear`` and
    ``SalrLinear`` follow), by name, in model order."""
    wrappers: dict[str, nn.Module] = {}
    inside = None  # named_modules is depth-first: a wrapper's submodules follow it, under its name
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            wrappers[name] = module
            inside = name + "."
    return wrappers


def is_quantized(linear: nn.Module) -> bool:
    """Whether ``linear`` holds a bitsandbytes 4/8-bit weight."""
    return type(getattr(linear, "weight", None)).__name__ in QUANTIZED_WEIGHTS


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """A float32 copy of ``linear``'s weight (d_out, d_in); bitsandbytes 4/8-bit weights are dequantized."""
    weight = linear.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as bnbf

        # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval-mode forward
        # without gradients; dequantize_4bit cannot read that layout (and bitsandbytes' own way back misorders the
        # block scales): put it back in place first. The repack rounded the scales to bf16 (relative error <= 2**-8).
        restore_standard_layout(linear)
        weight = linear.weight
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "Int8Params":
        from peft.utils.integrations import dequantize_bnb_weight

        # after the first forward the row scales live in the layer's matmul state, not on the weight
        return dequantize_bnb_weight(weight, state=linear.state).float()
    return weight.detach().to(torch.float32, copy=True)  # a copy: callers modify it in place


def dequantize_linears(model: nn.Module) -> int:
    """Replace every bitsandbytes 4/8-bit linear of ``model`` by an ``nn.Linear`` of its dequantized weight.

    The weights are dequantized in float32 (:func:`dequantized_weight`) and stored in the dtype of the model's
    embeddings, the dtype its unquantized layers run in. Wrappers around a quantized linear (adapters) keep their
    place; their ``base_layer`` is swapped. Returns how many linears were replaced.
    """
    dtype = model.get_input_embeddings().weight.dtype
    replaced = 0
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        weight = dequantized_weight(module).to(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype, copy=True), requires_grad=False)
        replace_module(model, name, linear)
        replaced += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if replaced and quantizer is not None:  # nothing quantized is left: drop the quantization config
        quantizer.remove_quantization_config(model)
    return replaced


def projection(layer: nn.Module, name: str) -> nn.Module:
    """The projection ``name`` (``q_proj`` ... ``down_proj``) of a LLaMA decoder layer."""
    return getattr(layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp, name)
