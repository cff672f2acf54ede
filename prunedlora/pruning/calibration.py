"""Calibration for activation-aware pruning criteria (Wanda, SparseGPT; docs/methods.md Decisions item 0).

Both criteria need the inputs ``X`` of each linear to be pruned: Wanda their per-feature norms ``‖X_j‖₂``,
SparseGPT the Gram matrix ``H = X Xᵀ``. They are collected in **one dense pass**: the unpruned model runs
over the calibration rows once, with a forward pre-hook on every target linear, and every matrix is then
pruned from statistics of the dense model's activations. (The papers prune layer by layer and feed each
layer the already-pruned outputs of the previous one; one pass costs a single forward of the calibration
tokens and needs no per-architecture layer driver, at the price of not seeing upstream pruning error.)

Linears that read the very same input tensor (``q/k/v_proj``, ``gate/up_proj`` in LLaMA) share one
statistic: the hook notices that its input *is* the previous hook's input and aliases it, so SmolLM2 holds
4 Gram matrices per layer, not 7.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 4
"""Rows per calibration forward: bounds activation memory, not the result (statistics are sums)."""


@dataclass
class InputStats:
    """Sums over every calibration token ``x`` (a row of the linear's input, float32)."""

    sq_norm: torch.Tensor
    """``Σ x_j²`` per input feature, ``(d_in,)``: ``‖X_j‖₂²``."""
    gram: torch.Tensor | None
    """``Σ x xᵀ``, ``(d_in, d_in)`` (SparseGPT's ``H``), or None when not requested."""
    tokens: int = 0


def calibration_rows(examples: list[dict], num_sequences: int, seq_len: int) -> torch.Tensor:
    """``num_sequences`` rows of ``seq_len`` token ids cut from the training examples, in their order.

    The examples (already shuffled with ``train.seed``) are concatenated, without their padding, into one
    token stream, so a task of short examples (GSM8K) gives full rows as a corpus does. Fewer rows come
    back when the training data holds fewer tokens (logged).

    Returns:
        ``(n, seq_len)`` int64, ``n <= num_sequences``.
    """
    need = num_sequences * seq_len
    stream: list[int] = []
    for example in examples:
        stream.extend(example["input_ids"])
        if len(stream) >= need:
            break
    n = min(num_sequences, len(stream) // seq_len)
    if n < num_sequences:
        log.warning("calibration: the training data holds only %d full rows of %d tokens (asked for %d)", n,
                    seq_len, num_sequences)
    if n == 0:
        raise ValueError(f"calibration needs at least one row of {seq_len} tokens; the training data has "
                         f"{len(stream)} tokens")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


class _Collector:
    """Forward pre-hooks accumulating ``InputStats`` per module, aliasing modules that share an input."""

    def __init__(self, modules: dict[str, nn.Module], gram: bool) -> None:
        self.gram = gram
        self.stats: dict[str, InputStats] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # (input, owner): holding it keeps its id unique
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.alias[name] = self._last[1]
                return
            self._last = (x, name)
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
            stats = self.stats.get(name)
            if stats is None:
                d = flat.shape[1]
                stats = self.stats[name] = InputStats(
                    torch.zeros(d, device=flat.device),
                    torch.zeros(d, d, device=flat.device) if self.gram else None)
            stats.sq_norm += flat.square().sum(0)
            if stats.gram is not None:
                stats.gram.addmm_(flat.T, flat)
            stats.tokens += flat.shape[0]
        return hook

    def close(self) -> dict[str, InputStats]:
        for handle in self.handles:
            handle.remove()
        self._last = None
        return {**self.stats, **{name: self.stats[owner] for name, owner in self.alias.items()}}


@torch.no_grad()
def collect_input_stats(model: nn.Module, modules: dict[str, nn.Module], rows: torch.Tensor, gram: bool,
                        batch_size: int = CALIBRATION_BATCH) -> dict[str, InputStats]:
    """Run ``model`` over ``rows`` once and return each module's input statistics (see the module docstring).

    Only the decoder runs (``model.get_decoder()`` where it exists): the LM head is not needed. The wall
    time is logged.

    Args:
        model: the dense model, before any pruning.
        modules: name -> linear whose input is wanted.
        rows: ``(n, seq_len)`` token ids (full rows, no padding).
        gram: also accumulate ``Σ x xᵀ`` (SparseGPT).
        batch_size: rows per forward.
    """
    started, cpu = time.perf_counter(), time.process_time()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collector = _Collector(modules, gram)
    try:
        for start in range(0, rows.shape[0], batch_size):
            decoder(input_ids=rows[start:start + batch_size].to(device))
    finally:
        stats = collector.close()
        model.train(was_training)
    missing = sorted(set(modules) - set(stats))
    if missing:
        raise RuntimeError(f"calibration: no input reached {missing[:3]} (not on the decoder's forward path)")
    log.info("calibration: %d x %d tokens through the dense model, %d input statistics (%s) in %.1f s wall, "
             "%.1f s CPU (%d threads)", rows.shape[0], rows.shape[1], len(collector.stats),
             "norms and Gram matrices" if gram else "norms", time.perf_counter() - started,
             time.process_time() - cpu, torch.get_num_threads())
    return stats
