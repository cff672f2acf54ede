"""SALR storage and CPU latency (docs/methods.md §6.3-6.4, §8 items 23 and 25): bitmap vs dense, concat vs separate.

Four measurements, on SmolLM2-135M-Instruct (the offline copy; ``--tiny`` or its absence: the random tiny
LLaMA) pruned to 50% per matrix:

1. Bytes of the sparse base: every pruned linear in bitmap form (mask + values + int64 row offsets) vs
   dense, in bf16 and fp32, and the whole checkpoint (embeddings and norms stay dense).
2. One 576x1536 linear (SmolLM2's down_proj shape): bitmap decode alone, decode-then-GEMM
   (``BitmapLinear``) and the dense GEMM, at 1 and ``--tokens`` tokens.
3. A whole forward of ``--tokens`` tokens: the SALR model with a dense masked base vs the same model with
   ``BitmapLinear`` bases, and the original dense model without adapters.
4. The adapter branch of one 576x1536 layer: one concatenated GEMM pair vs the two adapters separately
   (forward, and forward + backward).

Timings are medians over ``--rounds`` interleaved rounds (each variant once per round, rotating order, so
load from other processes hits all alike); ratios are medians of per-round ratios.

5. Per layer, batch 1 (``scripts/salr_layer_rows.py``): LLaMA-7B's and SmolLM2's projection shapes at 50%,
   float32 and bfloat16, at each of ``--layer-threads``: dense ``W @ x``, the fused bitmap kernel (AVX-512
   and AVX2), ``base_format=auto`` and the decode-then-GEMM reference, with bytes per token and the
   machine's memory bandwidth. Written to its own section (``salr_kernel``).
6. Per model, batch 1 (``scripts.salr_generate_rows``): greedy ``generate`` of ``--new-tokens`` tokens with the
   KV cache from a salr export's ``compressed/``, the dense model against the compressed form in every
   ``base_format``, at each of ``--gen-threads``: the exports named by ``--salr-run`` (SmolLM2 at 50% and 2:4,
   made with ``prunedlora-train model=smollm2_135m method=salr train.max_steps=0 ...``) and a LLaMA-7B-shaped
   stack of ``--stack-layers`` decoder layers with random weights pruned 50%, built here and written and loaded
   through the same export and loader (``--stack-dir`` keeps it). Written to its own section (``salr_generate``).

    python -m scripts.bench_salr                  # writes the salr, salr_kernel and salr_generate sections
    python -m scripts.bench_salr --no-write --rounds 5 --tiny --no-generate
    python -m scripts.bench_salr --layers-only --no-write   # only the per-layer kernel rows
    python -m scripts.bench_salr --generate-only --salr-run "SmolLM2-135M 50%=runs/salr50"   # only generation
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from prunedlora.adapters.salr import SalrLinear, salr_modules
from prunedlora.config import SparsityConfig, TinyModelConfig
from prunedlora.methods import build_method
from prunedlora.methods.salr import SalrConfig
from prunedlora.pruning.bitmap import BitmapLinear, decode, encode, size_report
from prunedlora.pruning.magnitude import per_matrix_mask, prune_
from scripts._publish import command_line, machine_description, publish
from scripts.salr_generate_rows import HEADER, PROMPT, SPLIT_TOKENS, build_stack, model_rows, split_table
from scripts.salr_layer_rows import bandwidth, layer_tables

SPARSITY = 0.5
D_OUT, D_IN = 576, 1536  # SmolLM2 down_proj


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per forward (batch 1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps a shared machine's contention out")
    parser.add_argument("--residual-rank", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="random tiny LLaMA instead of SmolLM2")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    parser.add_argument("--layers-only", action="store_true", help="only the per-layer fused-kernel rows")
    parser.add_argument("--layer-threads", default="1,2", help="thread counts of the per-layer rows")
    parser.add_argument("--layer-rounds", type=int, default=15)
    parser.add_argument("--layer-cache", choices=("cold", "hot"), default="cold",
                        help="cold: weights rotate over 1 GiB of copies (read from memory); hot: one matrix")
    parser.add_argument("--generate-only", action="store_true", help="only the model-level generate rows")
    parser.add_argument("--no-generate", action="store_true", help="leave out the model-level generate rows")
    parser.add_argument("--salr-run", action="append", default=[], metavar="LABEL=DIR",
                        help="a salr export (run dir or compressed/) to generate from; repeatable")
    parser.add_argument("--no-stack", action="store_true", help="leave out the LLaMA-7B-shaped stack")
    parser.add_argument("--stack-dir", type=Path, default=None,
                        help="where the 7B-shaped export is written (reused when it holds compressed/); "
                             "default: a temporary folder, removed afterwards")
    parser.add_argument("--stack-layers", type=int, default=2)
    parser.add_argument("--gen-threads", default="1,2", help="thread counts of the generate rows")
    parser.add_argument("--gen-repeats", type=int, default=5, help="interleaved generate rounds per path")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ref-tokens", type=int, default=8, help="tokens of the (slow) bitmap reference")
    parser.add_argument("--generate-section", default="salr_generate",
                        help="the docs/RESULTS.md section the generate rows go to (e.g. one per thread count)")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------- timing
def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` samples each, rotating the order every round."""
    names = list(variants)
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ms(samples: list[float]) -> str:
    return f"{1e3 * statistics.median(samples):.3f}"


def ratio(num: list[float], den: list[float]) -> str:
    return f"{statistics.median(a / b for a, b in zip(num, den, strict=True)):.2f}x"


# -------------------------------------------------------------------------------------------- models
def load_base(tiny: bool) -> tuple[nn.Module, str]:
    """SmolLM2 (float32) when available, else the tiny random LLaMA."""
    if not tiny:
        try:
            from transformers import AutoModelForCausalLM

            from prunedlora.models import smollm2_offline_dir

            model = AutoModelForCausalLM.from_pretrained(smollm2_offline_dir(), dtype=torch.float32)
            return model.eval(), "SmolLM2-135M"
        except Exception as err:  # no wheel, no network: fall back, and say so in the table
            print(f"SmolLM2 unavailable ({err}); using the tiny model")
    from prunedlora.models import build_tiny_llama

    return build_tiny_llama(TinyModelConfig(), 259).eval(), "tiny random LLaMA"


def pruned_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """The seven projections of every layer, pruned to 50% per matrix (float32 copies)."""
    targets = SalrConfig().target_modules
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            w = module.weight.detach().float().clone()
            weights[name] = prune_(w, per_matrix_mask(w, SPARSITY))
    return weights


# --------------------------------------------------------------------------------------- benchmarks
def storage_table(model: nn.Module, weights: dict[str, torch.Tensor]) -> str:
    other = sum(p.numel() for n, p in model.named_parameters() if n.removesuffix(".weight") not in weights)
    rows = ["| dtype | pruned linears dense | bitmap (mask + values + offsets) | ratio | whole model dense | "
            "whole model with bitmap base | ratio |", "|---|---|---|---|---|---|---|"]
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        total = size_report({n: encode(w.to(dtype)) for n, w in weights.items()})["total"]
        whole_dense = total["bytes_dense"] + other * size
        whole_bitmap = total["bytes_bitmap"] + other * size
        mib = {k: v / 2**20 for k, v in total.items() if k.startswith("bytes_")}
        parts = f"{mib['bytes_mask']:.1f} + {mib['bytes_values']:.1f} + {mib['bytes_offsets']:.2f}"
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {mib['bytes_dense']:.1f} MiB | "
                    f"{mib['bytes_bitmap']:.1f} MiB ({parts}) | {total['ratio']:.3f} | {whole_dense / 2**20:.1f} MiB | "
                    f"{whole_bitmap / 2**20:.1f} MiB | {whole_bitmap / whole_dense:.3f} |")
    return "\n".join(rows)


def matrix_table(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    linear = nn.Linear(D_IN, D_OUT, bias=False).requires_grad_(False)
    prune_(linear.weight, per_matrix_mask(linear.weight, SPARSITY))
    bitmap_linear = BitmapLinear.from_linear(linear)
    bitmap = bitmap_linear.bitmap()
    rows = ["| tokens | dense GEMM (ms) | bitmap decode only (ms) | decode + GEMM (ms) | decode+GEMM / dense |",
            "|---|---|---|---|---|"]
    for tokens in (1, args.tokens):
        x = torch.randn(1, tokens, D_IN)
        with torch.no_grad():
            t = interleaved({"dense": lambda: linear(x), "decode": lambda: decode(bitmap),
                             "bitmap": lambda: bitmap_linear(x)}, args.rounds, args.warmup)
        rows.append(f"| {tokens} | {ms(t['dense'])} | {ms(t['decode'])} | {ms(t['bitmap'])} | "
                    f"{ratio(t['bitmap'], t['dense'])} |")
    return "\n".join(rows)


def forward_table(model: nn.Module, args: argparse.Namespace) -> str:
    import copy

    dense = copy.deepcopy(model)
    # magnitude, as the rest of this benchmark (the default, wanda, needs a calibration pass over training data)
    config = SalrConfig(residual_rank=args.residual_rank, rank=args.rank, base_criterion="magnitude")
    method = build_method(config, SparsityConfig(final=SPARSITY))
    salr_dense = model
    method.attach(salr_dense)
    salr_bitmap = copy.deepcopy(salr_dense)
    for wrapper in salr_modules(salr_bitmap).values():
        wrapper.base_layer = BitmapLinear.from_linear(wrapper.base_layer)
    x = torch.randint(0, model.config.vocab_size, (1, args.tokens))
    with torch.no_grad():
        t = interleaved({"dense": lambda: dense(x), "salr": lambda: salr_dense(x), "bitmap": lambda: salr_bitmap(x)},
                        max(3, args.rounds // 3), 1)
    return "\n".join([
        "| model | forward (ms) | vs original dense |", "|---|---|---|",
        f"| original dense, no adapters | {ms(t['dense'])} | 1.00x |",
        f"| SALR, dense masked base (training reference) | {ms(t['salr'])} | {ratio(t['salr'], t['dense'])} |",
        f"| SALR, bitmap base (decode then GEMM) | {ms(t['bitmap'])} | {ratio(t['bitmap'], t['dense'])} |",
    ])


def separate_adapters(layer: SalrLinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter branch as two adapters: four GEMMs and a sum."""
    return layer.residual_B(layer.residual_A(x)) + layer.lora_B(layer.lora_A(x)) * layer.scaling


def concatenated_adapters(layer: SalrLinear, x: torch.Tensor) -> torch.Tensor:
    """The adapter branch as SalrLinear runs it: one GEMM pair on the concatenated factors."""
    return nn.functional.linear(nn.functional.linear(x, layer.a_cat()) * layer.rank_scale, layer.b_cat())


def concat_table(args: argparse.Namespace) -> str:
    rows = ["| r_res + r | tokens | pass | separate (ms) | concatenated (ms) | concatenated / separate |",
            "|---|---|---|---|---|---|"]
    for r_res, r in ((args.residual_rank, args.rank), (64, 64)):
        layer = SalrLinear(nn.Linear(D_IN, D_OUT, bias=False), r_res, r, 2.0 * r)
        with torch.no_grad():
            layer.residual_A.weight.normal_(0, 0.02)
            layer.residual_B.weight.normal_(0, 0.02)
        for tokens in (1, args.tokens):
            x = torch.randn(1, tokens, D_IN)
            with torch.no_grad():
                t = interleaved({"sep": lambda: separate_adapters(layer, x),
                                 "cat": lambda: concatenated_adapters(layer, x)}, args.rounds, args.warmup)
            rows.append(f"| {r_res} + {r} | {tokens} | forward | {ms(t['sep'])} | {ms(t['cat'])} | "
                        f"{ratio(t['cat'], t['sep'])} |")
            t = interleaved({"sep": lambda: separate_adapters(layer, x).sum().backward(),
                             "cat": lambda: concatenated_adapters(layer, x).sum().backward()}, args.rounds, args.warmup)
            rows.append(f"| {r_res} + {r} | {tokens} | forward + backward | {ms(t['sep'])} | {ms(t['cat'])} | "
                        f"{ratio(t['cat'], t['sep'])} |")
    return "\n".join(rows)


def kernel_section(args: argparse.Namespace) -> str:
    threads = [int(t) for t in args.layer_threads.split(",")]
    cold = args.layer_cache == "cold"
    table = layer_tables(threads, args.layer_rounds, [torch.float32, torch.bfloat16], cold)
    return "\n\n".join([
        "## SALR: fused bitmap kernel per layer, batch 1",
        f"Command: `{command_line()}`  \nMachine: {machine_description()}",
        "One projection pruned 50% by magnitude, random weights. Times are medians of interleaved rounds; "
        "ratios are medians of per-round ratios, with the ratio of the best rounds in brackets. Weights: "
        + ("cold (every call reads its matrix from memory: each path rotates over 1 GiB of copies)." if cold else
           "hot (one matrix, called again and again: cached where it fits)."),
        table,
    ])


def _stack_compressed(args: argparse.Namespace, scratch: Path) -> Path:
    folder = args.stack_dir or scratch
    if (folder / "compressed").is_dir():
        return folder / "compressed"
    start = time.perf_counter()
    compressed = build_stack(folder, args.stack_layers)
    print(f"built the 7B-shaped stack in {time.perf_counter() - start:.0f} s: {compressed}", flush=True)
    return compressed


def generate_section(args: argparse.Namespace) -> str:
    """The model-level rows (section ``salr_generate``)."""
    import tempfile

    from transformers import AutoTokenizer

    from prunedlora.export.compressed import compressed_dir

    threads = [int(t) for t in args.gen_threads.split(",")]
    runs = [(label, compressed_dir(Path(path))) for label, _, path in (r.partition("=") for r in args.salr_run)]
    rows, splits, kept = [], {}, []
    with tempfile.TemporaryDirectory(prefix="salr_stack_") as scratch:
        if not args.no_stack:
            runs.append((f"LLaMA-7B-shaped, {args.stack_layers} layers, 50%", _stack_compressed(args, Path(scratch))))
        for label, compressed in runs:
            tokenizer = AutoTokenizer.from_pretrained(compressed)
            prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
            got, splits[label], auto = model_rows(label, compressed, prompt, threads, args.new_tokens,
                                                  args.gen_repeats, args.ref_tokens)
            rows += got
            kept.append(f"{label}: " + "; ".join(f"{t} thread(s): {k}" for t, k in auto.items()))
    bandwidths = []
    for t in threads:
        bw = bandwidth(t)
        bandwidths.append(f"{t} thread(s): copy {bw['copy']:.1f} GB/s, read {bw['read']:.1f} GB/s")
    return "\n\n".join([
        f"## SALR: generation from the compressed form, batch 1, {args.gen_threads} thread(s)",
        f"Command: `{command_line()}`  \nMachine: {machine_description()}",
        f"Greedy `generate` of {args.new_tokens} new tokens with the KV cache after a {prompt.shape[1]}-token prompt, "
        f"float32, {args.gen_repeats} interleaved rounds per path (`scripts/salr_generate_rows.py` says how each "
        "path is built and timed). Decode tok/s excludes the prompt; ratios are medians of per-round ratios "
        "against the dense model; GB/s is MB read per token over the time per token (thread CPU at one thread).",
        "Memory bandwidth (STREAM-like, 256 MiB float32): " + "; ".join(bandwidths) + ".",
        HEADER + "\n" + "\n".join(rows),
        "What `auto` kept (pruned linears): " + "; ".join(kept) + ".",
        *([f"Where a decode step's time goes at one thread (thread CPU per token, forward hooks, "
           f"{min(args.new_tokens, SPLIT_TOKENS)} new tokens; the hooks add a little to every part):",
           split_table(splits)] if 1 in threads else []),
    ])


def main() -> None:
    args = parse_args()
    if args.generate_only:
        publish(args.generate_section, generate_section(args), write=not args.no_write)
        return
    publish("salr_kernel", kernel_section(args), write=not args.no_write)
    if args.layers_only:
        return
    torch.set_num_threads(args.threads)
    model, model_name = load_base(args.tiny)
    weights = pruned_linears(model)
    sections = [
        ("Storage of the sparse base at 50% (per-matrix magnitude)", storage_table(model, weights)),
        (f"One {D_OUT}x{D_IN} linear at 50%, fp32: decode-then-GEMM reference vs dense", matrix_table(args)),
        (f"Whole forward, {args.tokens} tokens, fp32 (r_res = {args.residual_rank}, r = {args.rank}, all seven "
         "projections)", forward_table(model, args)),
        (f"Adapter branch of one {D_OUT}x{D_IN} layer, fp32: concatenated GEMM pair vs separate adapters",
         concat_table(args)),
    ]
    md = "\n\n".join([
        f"## SALR: bitmap storage and CPU latency ({model_name})",
        f"Command: `{command_line()}`  \nMachine: {machine_description()}",
        *[f"### {title}\n\n{table}" for title, table in sections],
        "The bitmap path is the correctness reference (docs/methods.md §8 item 25): it decodes the whole matrix on "
        "every call, so on CPU it is slower than the dense GEMM; the paper's speed-up needs a fused "
        "decode + GEMM kernel or 2:4 semi-structured kernels on a GPU (§8 item 23), not measured here.",
    ])
    publish("salr", md, write=not args.no_write)
    if not args.no_generate:
        publish(args.generate_section, generate_section(args), write=not args.no_write)


if __name__ == "__main__":
    main()
