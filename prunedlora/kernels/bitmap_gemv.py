"""The fused bitmap GEMV/GEMM kernel (``bitmap_gemv.cpp``): build at first use, dispatch, Python entry points.

The C++ source ships in the package and is compiled on first use with ``torch.utils.cpp_extension.load``
into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/<python>_<accelerator>/``), in a
directory named after the hash of the source and flags, so a changed source never loads a stale build and
later processes reuse the build. It needs a C++ compiler with OpenMP (``CXX``, default ``c++``) and ninja.
Where the build fails, one warning says why and ``kernel_available()`` is false; callers then decode and
run the dense GEMM (``prunedlora.pruning.bitmap``), so a missing compiler never stops a model.

The ISA is chosen at run time from CPUID: AVX-512 where the CPU has it, else AVX2, else scalar code.
``PRUNEDLORA_BITMAP_ISA=avx2`` (or ``avx512``, ``scalar``), or the ``isa`` argument, forces one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bitmap_gemv.cpp")
ISA_ENV = "PRUNEDLORA_BITMAP_ISA"
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}
# -O3 alone: the vector paths carry their own target attributes, so one build serves every x86-64 CPU.
_CFLAGS = ["-O3", "-fopenmp", "-Wno-uninitialized"]
_LDFLAGS = ["-fopenmp"]
_VALUE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
build_seconds: float | None = None  # wall time of this process's build or cache load, for reports


def _build() -> str:
    """Compile (or find in the cache) the kernel library; returns its path."""
    global build_seconds
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode()).hexdigest()[:16]
    start = time.perf_counter()
    path = load(name=f"prunedlora_bitmap_{digest}", sources=[str(SOURCE)], extra_cflags=_CFLAGS,
                extra_ldflags=_LDFLAGS, is_python_module=False, verbose=False)
    build_seconds = time.perf_counter() - start
    log.info("fused bitmap kernel ready in %.1f s (%s)", build_seconds, path)
    return path


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or ``None`` (with one warning) when it cannot be built here."""
    try:
        lib = ctypes.CDLL(_build())
    except Exception as err:  # no compiler, no OpenMP, no ninja, a read-only cache: all mean "no kernel"
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 400 else "... " + reason[-400:]  # a build log ends with its error
        warnings.warn(f"prunedlora: the fused bitmap kernel could not be built ({type(err).__name__}: {reason}); "
                      "bitmap linears fall back to decode + dense GEMM. The kernel needs a C++ compiler with "
                      "OpenMP (set CXX, e.g. CXX=g++) and ninja (pip install ninja).", RuntimeWarning, stacklevel=3)
        return None
    lib.pl_bitmap_resolve_isa.argtypes = [_INT]
    lib.pl_bitmap_gemm.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT, _P, _I64, _P, _INT, _INT]
    lib.pl_bitmap_decode.argtypes = [_P, _P, _P, _I64, _I64, _I64, _INT, _P, _INT, _INT]
    return lib


def kernel_available() -> bool:
    """Whether the fused kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def _isa_code(isa: str | None) -> int:
    name = isa if isa is not None else os.environ.get(ISA_ENV, "auto")
    if name not in ISAS:
        source = "isa" if isa is not None else ISA_ENV
        raise ValueError(f"{source}={name!r} is not a bitmap kernel ISA; use one of {sorted(ISAS)}")
    return ISAS[name]


def resolve_isa(isa: str | None = None) -> str:
    """The ISA a call with ``isa`` (default: ``$PRUNEDLORA_BITMAP_ISA`` or ``auto``) runs on this CPU.

    Raises:
        RuntimeError: when the kernel is not built, or the CPU lacks the ISA asked for.
    """
    lib = _require()
    code = lib.pl_bitmap_resolve_isa(_isa_code(isa))
    if code < 0:
        raise RuntimeError(f"this CPU has no {isa or os.environ.get(ISA_ENV)} support; use isa='auto'")
    return _ISA_NAMES[code]


def _require() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused bitmap kernel is not available on this machine (see the warning above)")
    return lib


def _check(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, d_in: int) -> None:
    d_out = mask.shape[0]
    if values.dtype not in _VALUE_DTYPES:
        raise ValueError(f"the fused bitmap kernel takes float32 or bfloat16 values, got {values.dtype}")
    if mask.device.type != "cpu" or values.device.type != "cpu" or row_offsets.device.type != "cpu":
        raise ValueError("the fused bitmap kernel runs on CPU tensors; move the bitmap with .cpu()")
    if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != math.ceil(d_in / 8):
        raise ValueError(f"mask must be uint8 (d_out, ceil({d_in} / 8)), got {mask.dtype} {tuple(mask.shape)}")
    if row_offsets.dtype != torch.int64 or row_offsets.numel() != d_out + 1:
        raise ValueError(f"row_offsets must be int64 ({d_out + 1},), got {row_offsets.dtype} "
                         f"{tuple(row_offsets.shape)}")
    if not (mask.is_contiguous() and values.is_contiguous() and row_offsets.is_contiguous()):
        raise ValueError("mask, values and row_offsets must be contiguous")


def bitmap_matmul(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, d_in: int, x: torch.Tensor,
                  isa: str | None = None, threads: int | None = None, check: bool = True) -> torch.Tensor:
    """``x @ Wᵀ`` for ``W`` in bitmap form, without decoding ``W``: float32 out, float32 sums.

    Args:
        mask: uint8 ``(d_out, ceil(d_in / 8))`` presence bits (``prunedlora.pruning.bitmap`` layout).
        values: the kept entries, float32 or bfloat16, ``(nnz,)``.
        row_offsets: int64 ``(d_out + 1,)``.
        d_in: columns of ``W``.
        x: ``(..., d_in)`` on CPU, any float dtype (converted to float32).
        isa: ``auto``, ``avx512``, ``avx2`` or ``scalar``; default ``$PRUNEDLORA_BITMAP_ISA`` or ``auto``.
        threads: OpenMP threads over rows; default ``torch.get_num_threads()``.
        check: validate dtypes, devices and shapes (callers that validated once may skip it: a few us).

    Returns:
        float32 ``(..., d_out)``.

    Raises:
        RuntimeError: when the kernel is not built or the ISA is missing; ValueError on malformed input.
    """
    lib = _require()
    if check:
        _check(mask, values, row_offsets, d_in)
        if x.shape[-1] != d_in or x.device.type != "cpu":
            raise ValueError(f"x must be a CPU tensor with {d_in} features, got {tuple(x.shape)} on {x.device}")
    d_out = mask.shape[0]
    flat = x.reshape(-1, d_in)  # (T, d_in)
    if flat.dtype != torch.float32 or not flat.is_contiguous():
        flat = flat.to(torch.float32).contiguous()
    out = torch.empty(flat.shape[0], d_out, dtype=torch.float32)  # (T, d_out)
    code = lib.pl_bitmap_gemm(mask.data_ptr(), values.data_ptr(), row_offsets.data_ptr(), values.numel(), d_out,
                              d_in, _VALUE_DTYPES[values.dtype], flat.data_ptr(), flat.shape[0], out.data_ptr(),
                              _isa_code(isa), threads or torch.get_num_threads())
    if code < 0:
        resolve_isa(isa)  # raises with the reason
    return out.view(*x.shape[:-1], d_out)


def bitmap_decode_into(mask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, out: torch.Tensor,
                       rows: tuple[int, int] | None = None, isa: str | None = None, threads: int | None = None,
                       check: bool = True) -> torch.Tensor:
    """Decode ``W`` (or its rows ``[r0, r1)``) into ``out``, bit for bit; returns ``out``.

    Args:
        mask, values, row_offsets: the bitmap form, as for ``bitmap_matmul``.
        out: contiguous ``(r1 - r0, d_in)`` in the values' dtype.
        rows: ``(r0, r1)``; default all rows.
        isa, threads, check: as for ``bitmap_matmul``.

    Raises:
        RuntimeError: when the kernel is not built or the ISA is missing; ValueError on malformed input.
    """
    lib = _require()
    r0, r1 = rows if rows is not None else (0, mask.shape[0])
    d_in = out.shape[1]
    if check:
        _check(mask, values, row_offsets, d_in)
        if out.dtype != values.dtype or not out.is_contiguous() or tuple(out.shape) != (r1 - r0, d_in) or r0 < 0 \
                or r1 > mask.shape[0]:
            raise ValueError(f"out must be contiguous {values.dtype} ({r1 - r0}, {d_in}) for rows {r0}:{r1} of "
                             f"{mask.shape[0]}, got {out.dtype} {tuple(out.shape)}")
    # A row range is the same call on shifted mask and offset pointers (offsets index the whole values buffer).
    code = lib.pl_bitmap_decode(mask.data_ptr() + r0 * mask.shape[1], values.data_ptr(),
                                row_offsets.data_ptr() + 8 * r0, values.numel(), r1 - r0, d_in,
                                _VALUE_DTYPES[values.dtype], out.data_ptr(), _isa_code(isa),
                                threads or torch.get_num_threads())
    if code < 0:
        resolve_isa(isa)
    return out
