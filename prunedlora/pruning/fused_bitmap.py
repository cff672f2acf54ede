"""Sparse-base linears that run the fused bitmap kernel, and the per-shape choice that keeps the faster path.

``bitmap_base(bitmap, bias, base_format)`` builds the linear a bitmap matrix runs as:

- ``dense``: an ``nn.Linear`` holding the decoded weight (dense memory, dense speed);
- ``bitmap``: ``BitmapLinear``, the reference that decodes the whole matrix in every forward;
- ``fused``: ``FusedBitmapLinear``: the fused kernel (``prunedlora.kernels``) for up to ``max_fused_tokens``
  tokens; above that, tiles of rows are decoded into a reused cache-sized buffer, each followed by its dense
  GEMM (the paper's two-stage pipeline; measured faster than one whole-matrix decode + GEMM, which writes and
  re-reads the dense matrix through memory);
- ``auto``: measures the shape once (fused vs dense at 1 token; fused vs decode + GEMM at growing token
  counts; weights read from beyond L2, as in a model) and returns ``FusedBitmapLinear`` with the measured
  token threshold when the fused kernel beats the dense GEMV at 1 token, else the dense ``nn.Linear``.
  Measurements are cached per (shape, dtype, density, threads) for the process.

Without the kernel (no compiler: one warning) ``fused`` runs the reference path and ``auto`` runs dense; off
CPU or with gradients to the input, ``FusedBitmapLinear`` runs the reference path too.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunedlora.kernels import bitmap_decode_into, bitmap_matmul, kernel_available
from prunedlora.pruning.bitmap import BitmapLinear, BitmapTensor, decode, encode

log = logging.getLogger(__name__)

BASE_FORMATS = ("auto", "bitmap", "fused", "dense")
# `fused`'s default token threshold: the kernel beat tiled decode + GEMM up to 4-16 tokens on every shape
# measured (LLaMA-7B's and SmolLM2's, float32 and bfloat16); `auto` measures each shape's own.
FUSED_MAX_TOKENS = 4
_PROBE_TOKENS = (2, 4, 8, 16, 32, 64)  # token counts `auto` tries, in order, until the fused kernel loses
_ROUNDS = 5  # interleaved timing rounds per measurement (the fastest counts)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_COLD_BYTES = 64 << 20  # auto times each path over copies this large together (see _cold_copies)
_TILE_BYTES = 4 << 20  # decoded rows per tile: stays in cache between the decode and its GEMM
_workspace = threading.local()  # per-thread decode buffers, keyed by (shape, dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)  # as BitmapLinear's: moves with .to(), stays out of optimizers


def _decode_buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A reused buffer for decoded tiles (one per shape, dtype and thread)."""
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (shape, dtype)
    if key not in buffers:
        buffers[key] = torch.empty(shape, dtype=dtype)
    return buffers[key]


def _fast_decode(bitmap: BitmapTensor) -> torch.Tensor:
    """``decode(bitmap)`` through the kernel where it can run (bit-identical, several times faster)."""
    if bitmap.values.device.type == "cpu" and bitmap.dtype in _KERNEL_DTYPES and kernel_available():
        return bitmap_decode_into(bitmap.mask, bitmap.values, bitmap.row_offsets,
                                  torch.empty(bitmap.shape, dtype=bitmap.dtype))
    return decode(bitmap)


class FusedBitmapLinear(nn.Module):
    """A linear whose weight stays in bitmap form and runs through the fused bitmap kernel.

    Holds the same frozen parameters as ``BitmapLinear`` (``mask``, ``values``, ``row_offsets``, ``bias``), so
    their state dicts are interchangeable. Inputs of up to ``max_fused_tokens`` tokens (generation) run the
    fused kernel; longer ones (prefill, evaluation) decode tiles of rows into a reused buffer, each followed
    by its dense GEMM. The bitmap must be consistent (``encode`` or ``load_bitmaps``, which ``check`` it).
    """

    def __init__(self, bitmap: BitmapTensor, bias: torch.Tensor | None = None,
                 max_fused_tokens: int = FUSED_MAX_TOKENS) -> None:
        super().__init__()
        self.out_features, self.in_features = bitmap.shape
        self.mask = _frozen(bitmap.mask)
        self.values = _frozen(bitmap.values)
        self.row_offsets = _frozen(bitmap.row_offsets)
        self.bias = None if bias is None else _frozen(bias.detach())
        self.max_fused_tokens = max_fused_tokens

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_fused_tokens: int = FUSED_MAX_TOKENS) -> FusedBitmapLinear:
        """Encode ``linear``'s (pruned) weight; the bias is kept dense."""
        return cls(encode(linear.weight), linear.bias, max_fused_tokens)

    def bitmap(self) -> BitmapTensor:
        """The held matrix as a ``BitmapTensor`` (sharing storage)."""
        return BitmapTensor(self.mask.data, self.values.data, self.row_offsets.data,
                            (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        """The decoded weight, a new tensor (bit-identical to what was encoded)."""
        return _fast_decode(self.bitmap())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, bias = self.values, self.bias  # one module attribute lookup each: this runs once per token
        if (values.device.type != "cpu" or values.dtype not in _KERNEL_DTYPES
                or (x.requires_grad and torch.is_grad_enabled()) or not kernel_available()):
            return F.linear(x, decode(self.bitmap()), bias)  # the reference: CUDA, float16, gradients, no compiler
        if x.numel() > self.max_fused_tokens * self.in_features:
            return self._tiled(x)
        out = bitmap_matmul(self.mask, values, self.row_offsets, self.in_features, x, check=False)
        if bias is not None:
            out += bias
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _tiled(self, x: torch.Tensor) -> torch.Tensor:
        """Decode ``rows`` rows at a time into a cache-sized buffer and multiply each tile at once."""
        d_out, d_in = self.out_features, self.in_features
        rows = max(16, _TILE_BYTES // (d_in * self.values.element_size()))
        tile = _decode_buffer((min(rows, d_out), d_in), self.values.dtype)
        flat = x.reshape(-1, d_in).to(self.values.dtype)  # (T, d_in)
        out_t = torch.empty(d_out, flat.shape[0], dtype=flat.dtype)  # (d_out, T): each tile writes whole rows
        for r0 in range(0, d_out, rows):
            r1 = min(r0 + rows, d_out)
            bitmap_decode_into(self.mask, self.values, self.row_offsets, tile[: r1 - r0], rows=(r0, r1), check=False)
            torch.mm(tile[: r1 - r0], flat.T, out=out_t[r0:r1])
        out = out_t.T.contiguous()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], d_out).to(x.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the decoded weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        linear.weight = _frozen(self.dense_weight())
        if self.bias is not None:
            linear.bias = _frozen(self.bias.data)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}, "
                f"max_fused_tokens={self.max_fused_tokens}")


# ---------------------------------------------------------------------------------------------- auto
@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` measured for one shape and kept.

    Attributes:
        base_format: ``fused`` (the bitmap stays, the kernel runs) or ``dense`` (decoded ``nn.Linear``).
        max_fused_tokens: the largest probed token count at which the fused kernel beat decode + GEMM.
        seconds: seconds per call (fastest of a few) of each path measured (``dense@1``, ``fused@1``, ``fused@T``,
            ``decode+gemm@T``).
    """

    base_format: str
    max_fused_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


_auto_cache: dict[tuple, AutoChoice] = {}


def _times(variants: dict[str, Callable[[], object]], rounds: int = _ROUNDS) -> dict[str, float]:
    """Seconds per call of each variant: the fastest of ``rounds`` interleaved calls (order rotating).

    The minimum, not the median, and at one thread the thread's CPU time: load from other processes only
    ever adds time, and it is the intrinsic speed of each path that decides.
    """
    now = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    names = list(variants)
    for fn in variants.values():
        fn()  # warm-up: first-touch pages, the decode buffer, the kernel's thread pool
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = now()
            variants[name]()
            samples[name].append(now() - start)
    return {n: min(s) for n, s in samples.items()}


def _rotating(modules: list[nn.Module], x: torch.Tensor) -> Callable[[], object]:
    """A call that runs the next module of ``modules`` on ``x`` each time."""
    turn = itertools.cycle(modules)
    return lambda: next(turn)(x)


def _cold_copies(bitmap: BitmapTensor, dense: torch.Tensor) -> tuple[list[BitmapTensor], list[nn.Linear]]:
    """Copies of the matrix, ``_COLD_BYTES`` of dense weights together, so every timed call reads its weights
    from beyond L2, as a model does that runs each matrix once per token (the last level cache's share
    depends on the model and the machine)."""
    copies = max(1, min(16, math.ceil(_COLD_BYTES / (dense.numel() * dense.element_size()))))
    bitmaps = [bitmap] + [BitmapTensor(bitmap.mask.clone(), bitmap.values.clone(), bitmap.row_offsets.clone(),
                                       bitmap.shape) for _ in range(copies - 1)]
    denses = [_dense_linear(bitmap, None, dense if i == 0 else dense.clone()) for i in range(copies)]
    return bitmaps, denses


def measure(bitmap: BitmapTensor, dense: torch.Tensor) -> AutoChoice:
    """Time the paths of one matrix at this process's thread count and pick one (see the module docstring)."""
    bitmaps, denses = _cold_copies(bitmap, dense)
    fused = [FusedBitmapLinear(b, max_fused_tokens=max(_PROBE_TOKENS)) for b in bitmaps]
    decoding = [FusedBitmapLinear(b, max_fused_tokens=0) for b in bitmaps]
    gen = torch.Generator().manual_seed(0)  # its own stream: timing leaves the global RNG (adapter inits) alone
    x = torch.randn(1, bitmap.shape[1], dtype=bitmap.dtype, generator=gen)
    with torch.no_grad():
        seconds = _times({"dense@1": _rotating(denses, x), "fused@1": _rotating(fused, x)})
        if seconds["fused@1"] >= seconds["dense@1"]:
            return AutoChoice("dense", 0, seconds)
        max_tokens = 1
        for tokens in _PROBE_TOKENS:
            xt = torch.randn(tokens, bitmap.shape[1], dtype=bitmap.dtype, generator=gen)
            probe = _times({f"fused@{tokens}": _rotating(fused, xt), f"decode+gemm@{tokens}": _rotating(decoding, xt)},
                           3)
            seconds.update(probe)
            if probe[f"fused@{tokens}"] >= probe[f"decode+gemm@{tokens}"]:
                break
            max_tokens = tokens
    return AutoChoice("fused", max_tokens, seconds)


def auto_choice(bitmap: BitmapTensor, dense: torch.Tensor | None = None) -> AutoChoice:
    """``measure`` once per (shape, dtype, density to 5%, threads) in this process; later calls reuse it."""
    if bitmap.values.device.type != "cpu" or bitmap.dtype not in _KERNEL_DTYPES or not kernel_available():
        return AutoChoice("dense")
    density = 1.0 - bitmap.storage()["sparsity"]
    key = (bitmap.shape, bitmap.dtype, round(density * 20), torch.get_num_threads())
    if key not in _auto_cache:
        _auto_cache[key] = measure(bitmap, _fast_decode(bitmap) if dense is None else dense)
        choice = _auto_cache[key]
        log.info("base_format=auto: %dx%d %s at %d thread(s) runs %s (max fused tokens %d; %s)",
                 *bitmap.shape, str(bitmap.dtype).removeprefix("torch."), key[-1], choice.base_format,
                 choice.max_fused_tokens, ", ".join(f"{k} {1e6 * v:.0f} us" for k, v in choice.seconds.items()))
    return _auto_cache[key]


def clear_auto_cache() -> None:
    """Forget ``auto``'s measurements (benchmarks that change the thread count or want a fresh decision)."""
    _auto_cache.clear()


# ------------------------------------------------------------------------------------------- builder
def _dense_linear(bitmap: BitmapTensor, bias: torch.Tensor | None, weight: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(bitmap.shape[1], bitmap.shape[0], bias=bias is not None, device="meta")
    linear.weight = _frozen(_fast_decode(bitmap) if weight is None else weight)
    if bias is not None:
        linear.bias = _frozen(bias.detach())
    return linear


def _auto(bitmap: BitmapTensor, bias: torch.Tensor | None) -> nn.Module:
    choice = auto_choice(bitmap)  # decodes the matrix only to time a shape not seen before
    if choice.base_format == "dense":
        return _dense_linear(bitmap, bias)
    return FusedBitmapLinear(bitmap, bias, choice.max_fused_tokens)


_BUILDERS: dict[str, Callable[[BitmapTensor, torch.Tensor | None], nn.Module]] = {
    "auto": _auto,
    "bitmap": BitmapLinear,
    "fused": FusedBitmapLinear,
    "dense": _dense_linear,
}


def bitmap_base(bitmap: BitmapTensor, bias: torch.Tensor | None = None, base_format: str = "auto") -> nn.Module:
    """The linear that runs ``bitmap`` as ``base_format`` (one of ``BASE_FORMATS``; see the module docstring).

    Raises:
        ValueError: for an unknown ``base_format``.
    """
    if base_format not in _BUILDERS:
        raise ValueError(f"base_format={base_format!r} is not one of {list(BASE_FORMATS)}")
    if base_format == "fused" and not kernel_available():
        log.warning("base_format=fused without the fused kernel: %dx%d runs decode + GEMM", *bitmap.shape)
    return _BUILDERS[base_format](bitmap, bias)
