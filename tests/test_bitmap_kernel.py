"""The fused bitmap kernel (prunedlora/kernels) and the sparse-base linears that use it (pruning/fused_bitmap.py).

The kernel builds once per machine into the torch extensions cache (a few seconds on first use); every test
here reuses that build, except the no-compiler test, which points a subprocess at a missing compiler.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from prunedlora.kernels import ISA_ENV, bitmap_decode_into, bitmap_matmul, kernel_available, resolve_isa
from prunedlora.pruning import fused_bitmap
from prunedlora.pruning.bitmap import BitmapLinear, BitmapTensor, check, decode, encode
from prunedlora.pruning.fused_bitmap import AutoChoice, FusedBitmapLinear, bitmap_base
from prunedlora.pruning.magnitude import two_four_mask

DTYPES = [torch.float32, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
EPS32 = torch.finfo(torch.float32).eps


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


FLAGS = _cpu_flags()
# The ISAs this CPU can run: `auto` is the native choice; AVX2 is forced on AVX-512 machines too.
ISAS = ["auto", "scalar"] + [isa for isa, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in FLAGS]


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> None:
    if not kernel_available():
        pytest.skip("the fused bitmap kernel did not build here (no C++ compiler with OpenMP, or no ninja)")


def hard_matrix(d_out: int, d_in: int, dtype: torch.dtype, integer: bool = False) -> torch.Tensor:
    """50% random sparsity with an empty first row, a fully dense second row and a signed zero."""
    g = torch.Generator().manual_seed(d_out * 1000 + d_in)
    w = torch.randint(-3, 4, (d_out, d_in), generator=g).float() if integer else torch.randn(d_out, d_in, generator=g)
    w = w.masked_fill(torch.rand(d_out, d_in, generator=g) > 0.5, 0.0)
    w[0] = 0.0
    if d_out > 1:
        w[1] = torch.arange(1, d_in + 1).float() % 5 + 1
    if d_out > 2:
        w[2, 0] = -0.0
    return w.to(dtype)


def two_four_matrix(d_out: int, d_in: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3))
    return (w * two_four_mask(w.abs())).to(dtype)


def run(bitmap: BitmapTensor, x: torch.Tensor, **kw) -> torch.Tensor:
    return bitmap_matmul(bitmap.mask, bitmap.values, bitmap.row_offsets, bitmap.shape[1], x, **kw)


# Shapes: rows not a multiple of any block, d_in below, between and above the 8/16-column chunks and the
# 64-column step, and the 7B and SmolLM2 widths.
SHAPES = [(1, 1), (5, 13), (37, 100), (19, 7), (33, 1000), (3, 64), (70, 1536), (9, 4100)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_is_exact_on_integer_matrices(isa: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Small integers make every product and partial sum exact in float32: any wrong value or column shows."""
    w = hard_matrix(*shape, dtype, integer=True)
    bitmap = encode(w)
    for tokens in (1, 3, 4, 9):
        x = torch.randint(-3, 4, (tokens, shape[1])).float()
        assert torch.equal(run(bitmap, x, isa=isa), x @ decode(bitmap).float().T), (isa, tokens)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["hard", "2:4"])
def test_fused_equals_decode_matmul_within_float32_rounding(isa: str, dtype: torch.dtype, threads: int,
                                                            kind: str) -> None:
    shape = (45, 1000) if kind == "hard" else (67, 576)
    w = hard_matrix(*shape, dtype) if kind == "hard" else two_four_matrix(*shape, dtype)
    bitmap = encode(w)
    dense = decode(bitmap).double()
    for tokens in (1, 5, 16):
        x = torch.randn(2, tokens, shape[1])  # any leading dims
        got = run(bitmap, x, isa=isa, threads=threads)
        exact = x.double() @ dense.T
        # float32 summation error: at most ~n eps |W| |x|; random rounding gives ~sqrt(n) eps (well inside).
        bound = 4 * math.sqrt(shape[1]) * EPS32 * (x.double().abs() @ dense.abs().T)
        assert got.shape == (2, tokens, shape[0]) and got.dtype == torch.float32
        assert bool(((got.double() - exact).abs() <= bound + 1e-30).all()), (isa, dtype, tokens)


@pytest.mark.parametrize("isa", ISAS)
def test_one_and_two_threads_give_identical_sums(isa: str) -> None:
    bitmap = encode(hard_matrix(301, 777, torch.float32))
    x = torch.randn(6, 777)
    assert torch.equal(run(bitmap, x, isa=isa, threads=1), run(bitmap, x, isa=isa, threads=2))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_into_is_bit_identical(isa: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = hard_matrix(*shape, dtype)
    bitmap = encode(w)
    out = torch.full(shape, float("nan"), dtype=dtype)  # every entry must be written
    bitmap_decode_into(bitmap.mask, bitmap.values, bitmap.row_offsets, out, isa=isa, threads=2)
    assert torch.equal(out.view(INT_VIEW[dtype]), w.view(INT_VIEW[dtype]))
    r0, r1 = shape[0] // 3, shape[0] - shape[0] // 4  # a tile of rows, as the many-token path decodes
    tile = torch.empty(r1 - r0, shape[1], dtype=dtype)
    bitmap_decode_into(bitmap.mask, bitmap.values, bitmap.row_offsets, tile, rows=(r0, r1), isa=isa)
    assert torch.equal(tile.view(INT_VIEW[dtype]), w[r0:r1].view(INT_VIEW[dtype]))


def test_native_isa_follows_cpuid_and_the_environment_forces_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    native = "avx512" if "avx512f" in FLAGS else "avx2" if "avx2" in FLAGS else "scalar"
    assert resolve_isa() == native
    if "avx2" not in FLAGS:
        pytest.skip("this CPU has no AVX2 to force")
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert resolve_isa() == "avx2"
    bitmap = encode(hard_matrix(21, 40, torch.float32, integer=True))
    x = torch.randint(-3, 4, (2, 40)).float()
    assert torch.equal(run(bitmap, x), x @ decode(bitmap).T)
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="PRUNEDLORA_BITMAP_ISA='sse9' is not a bitmap kernel ISA"):
        run(bitmap, x)


def test_malformed_inputs_are_refused_with_the_fix() -> None:
    bitmap = encode(hard_matrix(4, 20, torch.float32))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bitmap_matmul(bitmap.mask, bitmap.values.half(), bitmap.row_offsets, 20, torch.randn(1, 20))
    with pytest.raises(ValueError, match="20 features"):
        run(bitmap, torch.randn(1, 21))
    with pytest.raises(ValueError, match=r"ceil\(25 / 8\)"):
        bitmap_matmul(bitmap.mask, bitmap.values, bitmap.row_offsets, 25, torch.randn(1, 25))
    tail = bitmap.mask.clone()
    tail[1, -1] |= 0x80  # column 23 of a 20-column matrix
    with pytest.raises(ValueError, match="past column 20"):
        check(BitmapTensor(tail, bitmap.values, bitmap.row_offsets, (4, 20)))


# ------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_equals_the_reference_below_and_above_the_token_threshold(dtype: torch.dtype) -> None:
    linear = nn.Linear(300, 70, dtype=dtype).requires_grad_(False)
    linear.weight.copy_(hard_matrix(70, 300, dtype))
    reference = BitmapLinear.from_linear(linear)
    fused = FusedBitmapLinear.from_linear(linear, max_fused_tokens=4)
    fused_bitmap._TILE_BYTES, tile_bytes = 300 * 16 * dtype.itemsize, fused_bitmap._TILE_BYTES  # 16-row tiles
    try:
        for tokens in (1, 4, 5, 40):  # fused kernel, fused kernel, tiled decode + GEMM, tiled
            x = torch.randn(1, tokens, 300).to(dtype)
            got, want = fused(x), reference(x)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got.float(), want.float(), atol=0.05 if dtype == torch.bfloat16 else 1e-4,
                                       rtol=0.02 if dtype == torch.bfloat16 else 1e-5)
    finally:
        fused_bitmap._TILE_BYTES = tile_bytes
    assert fused.state_dict().keys() == reference.state_dict().keys()
    assert torch.equal(fused.to_linear().weight, linear.weight)


def test_fused_linear_passes_gradients_to_the_input() -> None:
    linear = nn.Linear(40, 9).requires_grad_(False)
    linear.weight.copy_(hard_matrix(9, 40, torch.float32))
    fused = FusedBitmapLinear.from_linear(linear)
    x = torch.randn(2, 40, requires_grad=True)
    fused(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    linear(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_fused_linear_runs_the_reference_path_for_values_the_kernel_does_not_take() -> None:
    w = hard_matrix(11, 30, torch.float16)
    fused = FusedBitmapLinear(encode(w))
    x = torch.randn(2, 30).half()
    assert torch.equal(fused(x), torch.nn.functional.linear(x, w))


def _timed(monkeypatch: pytest.MonkeyPatch, fused_wins_up_to: int) -> list[str]:
    """Replace the timer: the fused path wins at up to `fused_wins_up_to` tokens (0: never)."""
    calls: list[str] = []

    def fake_times(variants: dict, rounds: int = 5) -> dict[str, float]:
        calls.extend(variants)
        tokens = int(next(iter(variants)).split("@")[1])
        fused_wins = tokens <= fused_wins_up_to
        return {name: (1.0 if name.startswith("fused") == fused_wins else 2.0) for name in variants}

    monkeypatch.setattr(fused_bitmap, "_times", fake_times)
    fused_bitmap.clear_auto_cache()
    return calls


def test_auto_keeps_the_fused_kernel_where_it_wins_and_caches_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _timed(monkeypatch, fused_wins_up_to=8)
    bitmap = encode(hard_matrix(64, 96, torch.float32))
    module = bitmap_base(bitmap, torch.randn(64), "auto")
    assert isinstance(module, FusedBitmapLinear) and module.max_fused_tokens == 8
    assert calls == ["dense@1", "fused@1", "fused@2", "decode+gemm@2", "fused@4", "decode+gemm@4", "fused@8",
                     "decode+gemm@8", "fused@16", "decode+gemm@16"]
    again = bitmap_base(encode(hard_matrix(64, 96, torch.float32)), None, "auto")  # same shape: no new timing
    assert isinstance(again, FusedBitmapLinear) and len(calls) == 10
    x = torch.randn(3, 96)
    torch.testing.assert_close(module(x), BitmapLinear(bitmap, module.bias.data)(x))


def test_auto_runs_dense_decoded_weights_where_the_fused_kernel_loses(monkeypatch: pytest.MonkeyPatch) -> None:
    _timed(monkeypatch, fused_wins_up_to=0)
    w = hard_matrix(64, 96, torch.bfloat16)
    module = bitmap_base(encode(w), None, "auto")
    assert type(module) is nn.Linear and torch.equal(module.weight.view(torch.int16), w.view(torch.int16))
    assert fused_bitmap.auto_choice(encode(w)) == AutoChoice("dense", 0, {"dense@1": 1.0, "fused@1": 2.0})


def test_auto_measures_for_real_and_every_format_computes_the_same() -> None:
    fused_bitmap.clear_auto_cache()
    bitmap = encode(hard_matrix(96, 160, torch.float32))
    bias = torch.randn(96)
    x = torch.randn(2, 3, 160)
    want = BitmapLinear(bitmap, bias)(x)
    for base_format in ("auto", "bitmap", "fused", "dense"):
        torch.testing.assert_close(bitmap_base(bitmap, bias, base_format)(x), want, atol=1e-5, rtol=1e-5)
    choice = fused_bitmap.auto_choice(bitmap)
    assert choice.base_format in ("fused", "dense") and {"dense@1", "fused@1"} <= choice.seconds.keys()
    with pytest.raises(ValueError, match="base_format='sparse' is not one of"):
        bitmap_base(bitmap, bias, "sparse")


# ------------------------------------------------------------------------------------- no compiler
NO_COMPILER = textwrap.dedent("""
    import warnings
    import torch
    from prunedlora.kernels import kernel_available
    from prunedlora.pruning.bitmap import BitmapLinear, encode
    from prunedlora.pruning.fused_bitmap import FusedBitmapLinear, bitmap_base

    warnings.simplefilter("always")  # a second warning would show
    w = torch.randn(12, 40).masked_fill(torch.rand(12, 40) > 0.5, 0.0)
    bitmap, x = encode(w), torch.randn(3, 40)
    auto, fused = bitmap_base(bitmap, None, "auto"), bitmap_base(bitmap, None, "fused")
    assert not kernel_available() and not kernel_available()
    assert type(auto) is torch.nn.Linear and isinstance(fused, FusedBitmapLinear)
    for module in (auto, fused, fused):
        torch.testing.assert_close(module(x), BitmapLinear(bitmap)(x))

    # A salr export loads and generates in every format (auto runs dense, fused decodes in every forward).
    import tempfile
    from pathlib import Path
    from prunedlora.config import SparsityConfig, TinyModelConfig
    from prunedlora.export.compressed import base_formats, load_salr_export
    from prunedlora.methods import build_method
    from prunedlora.methods.salr import SalrConfig
    from prunedlora.models.tiny import build_byte_tokenizer, build_tiny_llama

    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(tokenizer))
    method = build_method(SalrConfig(residual_rank=4, rank=4, base_criterion="magnitude"), SparsityConfig(final=0.5))
    method.attach(model)
    out = Path(tempfile.mkdtemp())
    method.export(model, tokenizer, out, "tiny", ("bitmap",))
    prompt = torch.tensor([[1, 40, 50, 60, 70, 80]])
    tokens = {}
    for base_format in ("auto", "fused", "dense"):
        loaded = load_salr_export(out, base_format)
        assert base_formats(loaded) == {"dense" if base_format == "auto" else base_format: 14}
        tokens[base_format] = loaded.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert tokens["auto"].shape == (1, 8) and all(torch.equal(t, tokens["dense"]) for t in tokens.values())
    print("fell back")
""")


def test_a_missing_compiler_warns_once_and_falls_back_to_decode_and_dense_and_still_generates(tmp_path: Path) -> None:
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "fell back"
    assert done.stderr.count("the fused bitmap kernel could not be built") == 1, done.stderr[-3000:]
    assert "C++ compiler with OpenMP" in done.stderr
