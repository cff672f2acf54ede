"""Step-time overhead of DropLoRA's bottleneck mask over plain LoRA at the same rank (docs/methods.md §4).

A random LLaMA shaped like the small CPU benchmark model (hidden 256, 4 layers, seq 256 x
batch 8 = 2048 tokens per step), LoRA on DropLoRA's targets (q, k, v, up, down), fp32, forward + backward
+ AdamW + zero_grad per step (plus the rank-mask redraw in ``mask_mode=rank``). The three variants run
interleaved, one step each per round in a rotating order, so load from other processes hits them alike;
the table reports per-variant medians and the median of the per-round ratios. Target: <= 1.05x.

    python -m scripts.bench_droplora              # writes the droplora_overhead section of docs/RESULTS.md
    python -m scripts.bench_droplora --no-write --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.config import SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.droplora import DropLoraConfig
from prunedlora.methods.lora import LoraConfig
from scripts._publish import command_line, machine_description, publish

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "droplora element", "droplora rank")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                        help="torch thread counts, one table each (1 thread: CPU time is robust to a busy machine)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/RESULTS.md alone")
    return parser.parse_args()


def base_model(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.seq)
    return LlamaForCausalLM(config)


def make_step(base: nn.Module, variant: str, rank: int, batch: dict[str, torch.Tensor]) -> Callable[[int], None]:
    """One training step of ``variant`` on its own copy of ``base``, run through the method's callbacks."""
    method_cfgs = {
        "lora": LoraConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS),
        "droplora element": DropLoraConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS, mask_mode="element"),
        "droplora rank": DropLoraConfig(rank=rank, alpha=2.0 * rank, target_modules=TARGETS, mask_mode="rank"),
    }
    model = copy.deepcopy(base)
    torch.manual_seed(1)  # the same LoRA init for every variant
    method = build_method(method_cfgs[variant], SparsityConfig())
    method.attach(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    callbacks = method.callbacks()
    for cb in callbacks:
        cb.on_train_start(model, optimizer, 1_000_000)

    def step(i: int) -> None:
        model(**batch).loss.backward()
        for cb in callbacks:
            cb.on_before_optimizer_step(i)
        optimizer.step()
        for cb in callbacks:
            cb.on_step_end(i)
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(steps: dict[str, Callable[[int], None]], rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of each variant; round k runs the variants rotated by k.

    CPU time (all threads of this process) is much less sensitive than wall time to other processes
    competing for the cores; wall time is what a user waits for. Both are reported.
    """
    names = list(steps)
    for i in range(warmup):
        for name in names:
            steps[name](i)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name](warmup + k)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _ratios(ts: list[float], base: list[float]) -> tuple[float, float]:
    """(ratio of medians, median of per-round ratios) of ``ts`` over ``base``."""
    return statistics.median(ts) / statistics.median(base), statistics.median(t / b for t, b in zip(ts, base))


def header(args: argparse.Namespace) -> list[str]:
    return [
        "## DropLoRA step-time overhead vs LoRA",
        "",
        f"`{command_line()}`",
        "",
        f"Machine: {machine_description()} (thread count per table below).",
        f"Model: random LLaMA, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}; "
        f"rank {args.rank} on {', '.join(TARGETS)}; seq {args.seq} x batch {args.batch} = {args.seq * args.batch} "
        f"tokens per step; fp32, forward + backward + AdamW. {args.rounds} interleaved rounds after {args.warmup} "
        "warm-up steps. Ratios: ratio of the medians / median of the per-round ratios. Target <= 1.05x.",
    ]


def table(args: argparse.Namespace, threads: int, times: dict[str, dict[str, list[float]]]) -> list[str]:
    tokens = args.seq * args.batch
    lines = [
        "",
        f"{threads} torch thread(s):",
        "",
        "| variant | wall s/step (median) | tokens/s | wall ratio | CPU s/step (median) | CPU ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, ts in times.items():
        wall, cpu = (statistics.median(ts[k]) for k in ("wall", "cpu"))
        wall_r, cpu_r = (_ratios(ts[k], times["lora"][k]) for k in ("wall", "cpu"))
        lines.append(f"| {name} | {wall:.4f} | {tokens / wall:,.0f} | {wall_r[0]:.3f}x / {wall_r[1]:.3f}x | "
                     f"{cpu:.4f} | {cpu_r[0]:.3f}x / {cpu_r[1]:.3f}x |")
    return lines


def main() -> None:
    args = parse_args()
    base = base_model(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    steps = {name: make_step(base, name, args.rank, batch) for name in VARIANTS}
    lines = header(args)
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += table(args, threads, measure(steps, args.rounds, args.warmup))
        print("\n".join(lines), flush=True)
    publish("droplora_overhead", "\n".join(lines), write=not args.no_write, echo=False)  # printed table by table


if __name__ == "__main__":
    main()
