"""Layer-by-layer calibration with bounded memory: one decoder layer's input statistics at a time.

``calibration.collect_input_stats`` runs the dense model once with hooks on every target linear, so it holds
every layer's statistics at once: with Gram matrices that is ``d_ff²`` floats per ``down_proj``, 485 MB per
layer and 15.5 GB for LLaMA-7B's 32 layers in float32. A pruning step that consumes a layer's Gram matrices
(a least-squares re-fit) does not need them all together. ``calibrate_layer_by_layer`` follows SparseGPT's
sequential driver:

1. The calibration rows run through the embedding only: a forward pre-hook on decoder layer 0 records the
   hidden states and keyword arguments it is called with (attention mask, position ids, rotary position
   embeddings: whatever this transformers version passes) and raises a sentinel that stops the forward.
2. For each decoder layer in order, the layer runs on the cached inputs (in the batches they were captured
   in) with the calibration hooks of ``calibration.py`` on the requested projections of that layer only; the
   outputs are kept as the next layer's inputs. ``on_layer(index, layer, stats)`` then gets that layer's
   statistics and may change the layer (prune, re-fit, compact).
3. With ``propagate=True`` (the default, as SparseGPT) a layer the callback changed runs again, so the next
   layer's inputs come from the changed layer: later layers are calibrated on, and re-fitted towards, what the
   pruned model really feeds them. With ``propagate=False`` the next layer's inputs are the dense outputs, and
   every statistic equals the one-pass statistic of the dense model. A callback that returns ``False`` says it
   changed nothing, which saves the second run.
4. The driver drops its references to the statistics before the next layer (the callback must not keep them).

Peak memory: one layer's statistics (plus what the callback allocates) and two copies of the hidden states of
the calibration rows (inputs and outputs of the current layer: ``2 · rows · seq_len · hidden`` in the model's
dtype). Cost: one forward of the decoder layers up to the last requested one, two for the layers a callback
changes with ``propagate=True``; the LM head never runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunedlora.models.surgery import projection
from prunedlora.pruning.calibration import CALIBRATION_BATCH, InputStats, _Collector
from prunedlora.pruning.structure import decoder_layers

log = logging.getLogger(__name__)

LayerCallback = Callable[[int, nn.Module, dict[str, InputStats]], "bool | None"]
"""``on_layer(index, layer, stats)``: stats keyed by projection name; return False when the layer is unchanged."""
CachedInputs = list[tuple[torch.Tensor, dict[str, Any]]]
"""Per calibration batch: the hidden states entering a decoder layer and the keyword arguments of that call."""


class _LayerInputsCaptured(Exception):
    """Raised by the layer-0 hook to stop the forward once its inputs are recorded."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _share_equal(kwargs: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with each tensor (or tuple of tensors) equal to the previous batch's replaced by that object:
    masks and rotary embeddings are the same for every full batch, and an eager attention mask of long rows is
    ``batch · seq²`` floats, which should be held once, not once per batch."""
    return {key: previous[key] if key in previous and _same(value, previous[key]) else value
            for key, value in kwargs.items()}


def capture_layer_inputs(model: nn.Module, rows: torch.Tensor, batch_size: int = CALIBRATION_BATCH) -> CachedInputs:
    """The inputs of decoder layer 0 for ``rows``, per batch of ``batch_size`` rows (see the module docstring)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    captured: CachedInputs = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), _share_equal(kwargs, captured[-1][1]) if captured else kwargs))
        raise _LayerInputsCaptured

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, rows.shape[0], batch_size):
            try:
                decoder(input_ids=rows[start:start + batch_size].to(device), use_cache=False)
            except _LayerInputsCaptured:
                continue
            raise RuntimeError("calibration: decoder layer 0 was never called; the model's layers are not on "
                               "its decoder's forward path")
    finally:
        handle.remove()
    return captured


def _run(layer: nn.Module, cache: CachedInputs, outputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``layer`` on every cached batch; writes into ``outputs`` in place (each old output freed as it goes)."""
    outputs = outputs if outputs is not None else [None] * len(cache)
    for j, (hidden, kwargs) in enumerate(cache):
        out = layer(hidden, **kwargs)
        outputs[j] = out[0] if isinstance(out, tuple) else out  # older transformers return (hidden, ...)
    return outputs


def _collect(layer: nn.Module, cache: CachedInputs, projections: Sequence[str], gram: bool
             ) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    collector = _Collector({name: projection(layer, name) for name in projections}, gram)
    try:
        outputs = _run(layer, cache)
    finally:
        stats = collector.close()
    missing = sorted(set(projections) - set(stats))
    if missing:
        raise RuntimeError(f"calibration: no input reached {missing} (not on the decoder layer's forward path)")
    return stats, outputs


@torch.no_grad()
def calibrate_layer_by_layer(model: nn.Module, rows: torch.Tensor, projections: Sequence[str],
                             on_layer: LayerCallback, *, gram: bool, layers: Iterable[int] | None = None,
                             propagate: bool = True, batch_size: int = CALIBRATION_BATCH) -> list[int]:
    """Collect each decoder layer's input statistics in turn and hand them to ``on_layer`` (module docstring).

    Args:
        model: a LLaMA-family causal LM (``model.model.layers``), on one device.
        rows: ``(n, seq_len)`` token ids (full rows, no padding; ``calibration.calibration_rows``).
        projections: names of the projections whose inputs are wanted (``o_proj``, ``down_proj``, ``q_proj``...);
            the stats are keyed by them, and those that read one input (q/k/v, gate/up) share one object.
        on_layer: ``(index, layer, stats) -> bool | None``; may change the layer in place (weights, shapes).
        gram: also accumulate ``Σ x xᵀ`` per input.
        layers: indices of the layers to calibrate (default: all); the layers before the last one still run.
        propagate: feed each layer the outputs of the (possibly changed) previous layer, not the dense ones.
        batch_size: rows per layer forward.

    Returns:
        The layer indices handed to ``on_layer``, in order.
    """
    started = time.perf_counter()
    all_layers = decoder_layers(model)
    wanted = sorted(set(range(len(all_layers)) if layers is None else layers))
    if wanted and not 0 <= wanted[0] <= wanted[-1] < len(all_layers):
        raise ValueError(f"calibration: layer indices {wanted} outside the model's {len(all_layers)} decoder layers")
    was_training = model.training
    model.eval()
    try:
        cache = capture_layer_inputs(model, rows, batch_size)
        for i in range(wanted[-1] + 1 if wanted else 0):
            layer = all_layers[i]
            if i not in wanted:
                outputs = _run(layer, cache)
            else:
                stats, outputs = _collect(layer, cache, projections, gram)
                changed = on_layer(i, layer, stats)
                del stats  # the driver's reference: the statistics die here unless the callback kept them
                if propagate and changed is not False:
                    _run(layer, cache, outputs)
            cache = [(out, kwargs) for out, (_, kwargs) in zip(outputs, cache)]
            del outputs
    finally:
        model.train(was_training)
    log.info("calibration: %d x %d tokens, layer by layer over %d decoder layers (%s, %s inputs) in %.1f s",
             rows.shape[0], rows.shape[1], len(wanted), "norms and Gram matrices" if gram else "norms",
             "propagated" if propagate else "dense", time.perf_counter() - started)
    return wanted
