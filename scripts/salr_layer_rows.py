"""Per-layer rows of ``python -m scripts.bench_salr``: one projection pruned 50% (magnitude), batch 1, by path.

For LLaMA-7B's projection shapes (and GQA k/v) and SmolLM2-135M's, in float32 and bfloat16, at each thread
count: dense ``W @ x`` (torch), the fused bitmap kernel forced to AVX-512 and to AVX2, what
``base_format=auto`` picked, and the reference decode-then-GEMM (``BitmapLinear``). Times are medians over
interleaved rounds; ratios are medians of per-round ratios (best round in brackets: load from other
processes only adds time). Bytes per token and the effective bandwidth of each path sit beside a STREAM-like
copy and read of 256 MiB, so the reading can say where the time goes.

At one thread the clock is the calling thread's CPU time (``time.thread_time``: time the OS hands to other
processes on a shared machine does not count); at more threads it is wall time.

``cold`` (the default) rotates every path over copies of its weights, ``COLD_BYTES`` of dense weights in
all, so each call reads its matrix from memory, as generation with a model larger than the last-level cache
does; ``hot`` calls one matrix again and again (it stays in cache when it fits).
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from prunedlora.kernels import bitmap_matmul, kernel_available, resolve_isa
from prunedlora.pruning.bitmap import BitmapLinear, BitmapTensor, encode
from prunedlora.pruning.fused_bitmap import FusedBitmapLinear, bitmap_base, clear_auto_cache
from prunedlora.pruning.magnitude import per_matrix_mask, prune_

# (model, projection, d_out, d_in). LLaMA-7B has 32 kv heads (k/v = q's shape); GQA models with 8 kv heads
# of 128 (LLaMA-3-8B, Mistral-7B) have 1024x4096 k/v. SmolLM2-135M: 9 heads, 3 kv heads of 64.
SHAPES = [
    ("LLaMA-7B", "q/k/v/o", 4096, 4096), ("LLaMA-7B", "gate/up", 11008, 4096), ("LLaMA-7B", "down", 4096, 11008),
    ("GQA 7-8B", "k/v (8 kv heads)", 1024, 4096),
    ("SmolLM2", "q/o", 576, 576), ("SmolLM2", "k/v", 192, 576), ("SmolLM2", "gate/up", 1536, 576),
    ("SmolLM2", "down", 576, 1536),
]
SAMPLE_S = 0.01  # each timing sample repeats a call until it lasts about this long
COLD_BYTES = 1 << 30  # more than this machine's 480 MiB L3


def bandwidth(threads: int) -> dict[str, float]:
    """GB/s of a 256 MiB float32 copy (read + write counted) and sum (read), best of 5, at ``threads``."""
    torch.set_num_threads(threads)
    src = torch.rand(64 << 20)
    dst = torch.empty_like(src)
    best = {"copy": float("inf"), "read": float("inf")}
    now = clock()
    for _ in range(5):
        for name, fn in (("copy", lambda: dst.copy_(src)), ("read", lambda: src.sum())):
            start = now()
            fn()
            best[name] = min(best[name], now() - start)
    return {"copy": 2 * src.nbytes / best["copy"] / 1e9, "read": src.nbytes / best["read"] / 1e9}


def clock() -> Callable[[], float]:
    """The calling thread's CPU time at one thread, else wall time (see the module docstring)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def interleaved(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each path, one sample per round, the order rotating every round."""
    now = clock()
    repeats = {}
    for name, fn in paths.items():
        fn()  # warm-up
        start = now()
        fn()
        repeats[name] = max(1, int(SAMPLE_S / max(now() - start, 1e-6)))
    names = list(paths)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = now()
            for _ in range(repeats[name]):
                paths[name]()
            samples[name].append((now() - start) / repeats[name])
    return samples


def _us(samples: list[float]) -> str:
    return f"{1e6 * statistics.median(samples):,.0f}"


def _ratio(num: list[float], den: list[float]) -> str:
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return f"{statistics.median(per_round):.2f}x ({min(num) / min(den):.2f}x)"


def bytes_per_token(bitmap: BitmapTensor) -> dict[str, float]:
    """Bytes each path reads per token (the input vector aside): dense matrix, bitmap, reference lower bound."""
    sizes = bitmap.storage()
    return {"dense": sizes["bytes_dense"], "fused": sizes["bytes_bitmap"],
            "reference": sizes["bytes_bitmap"] + 2 * sizes["bytes_dense"]}  # + decode's write and GEMM's read


def pruned_bitmap(d_out: int, d_in: int, dtype: torch.dtype) -> tuple[torch.Tensor, BitmapTensor]:
    torch.manual_seed(0)
    w = torch.randn(d_out, d_in)
    prune_(w, per_matrix_mask(w, 0.5))
    w = w.to(dtype)
    return w, encode(w)


def rotating(fn: Callable[[object], object], items: list, start: int = 0) -> Callable[[], object]:
    """A call of ``fn`` on the next of ``items`` each time, beginning at ``items[start]``."""
    turn = itertools.islice(itertools.cycle(items), start, None)
    return lambda: fn(next(turn))


def cold_copies(w: torch.Tensor, bitmap: BitmapTensor, cold: bool) -> tuple[list, list[BitmapTensor]]:
    """``COLD_BYTES`` of dense copies and as many bytes of bitmap copies (one of each when hot)."""
    if not cold:
        return [w], [bitmap]
    n_dense = math.ceil(COLD_BYTES / (w.numel() * w.element_size()))
    n_bitmap = math.ceil(COLD_BYTES / bitmap.storage()["bytes_bitmap"])
    return [w] + [w.clone() for _ in range(n_dense - 1)], [bitmap] + [
        BitmapTensor(bitmap.mask.clone(), bitmap.values.clone(), bitmap.row_offsets.clone(), bitmap.shape)
        for _ in range(n_bitmap - 1)]


def layer_row(model: str, role: str, shape: tuple[int, int], dtype: torch.dtype, threads: int,
              rounds: int, cold: bool = True) -> dict[str, object]:
    """Time every path of one configuration; returns the row's cells."""
    d_out, d_in = shape
    w, bitmap = pruned_bitmap(d_out, d_in, dtype)
    x = torch.randn(1, d_in, dtype=dtype)
    clear_auto_cache()
    auto = bitmap_base(bitmap, None, "auto")
    weights, bitmaps = cold_copies(w, bitmap, cold)
    kept = "fused" if isinstance(auto, FusedBitmapLinear) else "dense"
    autos = [FusedBitmapLinear(b, None, auto.max_fused_tokens) for b in bitmaps] if kept == "fused" else \
        [lambda x, w=w: F.linear(x, w) for w in weights]
    # The three bitmap paths share the copies; each starts a third of the way round from the others, so a
    # copy one path just read has left the cache before the next path reaches it.
    third = len(bitmaps) // 3

    def fused(isa: str, start: int) -> Callable[[], object]:
        return rotating(lambda b: bitmap_matmul(b.mask, b.values, b.row_offsets, d_in, x, isa, check=False).to(dtype),
                        bitmaps, start)

    paths = {"dense": rotating(lambda w: F.linear(x, w), weights), "avx512": fused("avx512", 0),
             "avx2": fused("avx2", third), "auto": rotating(lambda module: module(x), autos, 2 * third)}
    if resolve_isa() != "avx512":
        del paths["avx512"]
    with torch.no_grad():
        t = interleaved(paths, rounds)
        reference = BitmapLinear(bitmap)
        ref = interleaved({"dense": lambda: F.linear(x, w), "ref": lambda: reference(x)}, max(3, rounds // 5))
    sizes = bytes_per_token(bitmap)
    best = "avx512" if "avx512" in t else "avx2"
    return {
        "model": model, "role": role, "shape": f"{d_out}x{d_in}", "dtype": str(dtype).removeprefix("torch."),
        "threads": threads, "clock": "thread CPU" if threads == 1 else "wall", "dense": _us(t["dense"]),
        "avx512": _us(t["avx512"]) if "avx512" in t else "n/a",
        "avx2": _us(t["avx2"]), "auto": f"{_us(t['auto'])} ({kept})",
        "ref": _us(ref["ref"]), "r512": _ratio(t["dense"], t["avx512"]) if "avx512" in t else "n/a",
        "r2": _ratio(t["dense"], t["avx2"]), "rauto": _ratio(t["dense"], t["auto"]),
        "rref": _ratio(ref["dense"], ref["ref"]),
        "mb_dense": f"{sizes['dense'] / 1e6:.2f}", "mb_fused": f"{sizes['fused'] / 1e6:.2f}",
        "mb_ref": f"≥ {sizes['reference'] / 1e6:.1f}",
        "gbs_dense": f"{sizes['dense'] / statistics.median(t['dense']) / 1e9:.1f}",
        "gbs_fused": f"{sizes['fused'] / statistics.median(t[best]) / 1e9:.1f}",
    }


COLUMNS = [
    ("model", "model"), ("role", "projection"), ("shape", "out x in"), ("dtype", "dtype"), ("threads", "threads"),
    ("clock", "clock"),
    ("dense", "dense `W @ x` (us)"), ("avx512", "fused AVX-512 (us)"), ("avx2", "fused AVX2 (us)"),
    ("auto", "auto (us, kept)"), ("ref", "decode + GEMM ref (us)"), ("r512", "dense / AVX-512"),
    ("r2", "dense / AVX2"), ("rauto", "dense / auto"), ("rref", "dense / ref"), ("mb_dense", "MB/token dense"),
    ("mb_fused", "MB/token bitmap"), ("mb_ref", "MB/token ref"), ("gbs_dense", "GB/s dense"),
    ("gbs_fused", "GB/s fused (best ISA)"),
]


def layer_tables(threads_list: list[int], rounds: int, dtypes: list[torch.dtype], cold: bool = True,
                 shapes: list[tuple[str, str, int, int]] = SHAPES) -> str:
    """The per-layer table and the bandwidth line, as markdown."""
    if not kernel_available():
        return "The fused bitmap kernel did not build on this machine (see the warning); no per-layer rows."
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    bandwidths = []
    for threads in threads_list:
        bw = bandwidth(threads)
        bandwidths.append(f"{threads} thread(s): copy {bw['copy']:.1f} GB/s, read {bw['read']:.1f} GB/s")
        for model, role, d_out, d_in in shapes:
            for dtype in dtypes:
                row = layer_row(model, role, (d_out, d_in), dtype, threads, rounds, cold)
                lines.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
                print(lines[-1], flush=True)
    return "\n".join(["Memory bandwidth (STREAM-like, 256 MiB float32): " + "; ".join(bandwidths) + ".", "",
                      *lines])
