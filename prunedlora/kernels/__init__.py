"""Native kernels: C++ sources in this package, compiled at first use, and their Python entry points."""

from prunedlora.kernels.bitmap_gemv import (
    ISA_ENV,
    ISAS,
    bitmap_decode_into,
    bitmap_matmul,
    kernel_available,
    resolve_isa,
)

__all__ = ["ISAS", "ISA_ENV", "bitmap_decode_into", "bitmap_matmul", "kernel_available", "resolve_isa"]
