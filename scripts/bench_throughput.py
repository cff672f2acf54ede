"""Training throughput: our loop (eager and ``train.compile``) for every method against a plain HF + PEFT loop.

Every arm trains SmolLM2-135M-Instruct (``--model``) on the same packed GSM8K rows (``--batch-size`` x
``--seq-len`` tokens, bf16 autocast or ``--precision fp32``, AdamW) for ``--steps`` optimizer steps in its own
subprocess, one after the other, and the rounds alternate the arms so that load from other processes hits all of
them alike:

- ``ours/<method>``: ``prunedlora-train`` at the method's defaults (its own schedule, events included); the step
  times come from the run's ``metrics.jsonl``;
- ``ours/<method>+compile``: the same with ``train.compile=true`` (inductor);
- ``hf_peft`` (and ``hf_peft+compile``): a textbook loop, ``peft.get_peft_model`` with LoRA r8 on q, k, v, o around
  ``AutoModelForCausalLM``, the same data, optimizer and autocast (this script, ``--arm hf_peft``).

The first ``--warmup`` steps of every arm (compilation, allocator growth) are left out; each arm's figure is the
median step time over its remaining steps and over the rounds, and its ratio to HF + PEFT is taken within each
round (the median of the per-round ratios). The machine's matmul peak in that precision is
measured in the same run (a square GEMM, the best of its repeats). The fraction of it an arm reaches counts 4 FLOPs per
frozen parameter and token (forward 2, input gradients 2; frozen weights get no weight gradient) and 6 per trained
parameter.

    python -m scripts.bench_throughput [--methods lora,prunedlora,...] [--compile-methods lora] [--rounds 2]
        [--steps 12] [--warmup 3] [--threads 2] [--device cpu|cuda] [--profile STEPS] [--no-write]

Writes the ``throughput`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts._publish import REPO, provenance, publish

METHODS = ("lora", "droplora", "prunedlora", "loraprune", "salr", "adalora")
TARGETS = {"eager_vs_hf": 1.0, "compiled_vs_hf": 1.3, "peak_fraction": 0.20}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """What every ``prunedlora-train`` arm shares (model, data, batch, precision, no evaluation)."""
    return [f"model={args.model}", "task=gsm8k", "train.packing=true", f"train.batch_size={args.batch_size}",
            f"train.seq_len={args.seq_len}", f"train.max_steps={args.steps}", f"train.bf16={args.precision == 'bf16'}",
            f"train.save_every={args.steps}", "eval.enabled=false", "logging.progress=false",
            f"train.device={args.device}", f"train.num_threads={args.threads}"]


def run_ours(method: str, compiled: bool, args: argparse.Namespace, out: Path) -> list[float]:
    """One ``prunedlora-train`` run; its per-step times from ``metrics.jsonl``."""
    run_dir = out / f"{method}{'-compile' if compiled else ''}-{time.time_ns()}"
    overrides = [f"method={method}", *shared_overrides(args), f"train.compile={str(compiled).lower()}",
                 f"hydra.run.dir={run_dir}"]
    if method in ("lora", "droplora"):  # the HF + PEFT arm's adapter: r8 on q, k, v, o
        overrides.append(f"method.target_modules=[{','.join(LORA_TARGETS)}]")
    exe = Path(sys.executable).with_name("prunedlora-train")
    subprocess.run([str(exe), *overrides], cwd=REPO, check=True, env=_env(args), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records]


def run_hf_peft(compiled: bool, args: argparse.Namespace, out: Path) -> list[float]:
    """This script as ``--arm hf_peft`` in a subprocess (the same isolation as the recipe's arms)."""
    result = out / f"hf_peft-{time.time_ns()}.json"
    command = [sys.executable, "-m", __spec__.name, "--arm", "hf_peft", "--result", str(result), *sys.argv[1:]]
    if compiled:
        command.append("--arm-compile")
    subprocess.run(command, cwd=REPO, check=True, env=_env(args))
    return json.loads(result.read_text())


def profile_section(args: argparse.Namespace) -> str:
    """The profiler table of :func:`profile_ours`, run as ``--arm profile`` in its own subprocess."""
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
        result = Path(tmp) / "profile.txt"
        subprocess.run([sys.executable, "-m", __spec__.name, "--arm", "profile", "--result", str(result),
                        *sys.argv[1:]], cwd=REPO, check=True, env=_env(args))
        table = result.read_text()
    return "\n".join([f"Where the time goes: `torch.profiler` over a {args.profile}-step eager LoRA run of ours (the "
                      "same shapes; model load and export included), top ops by self time:", "", "```", table.rstrip(),
                      "```"])


def _env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}


def hf_peft_loop(args: argparse.Namespace) -> list[float]:
    """The usual stack: transformers model + ``peft.get_peft_model``, AdamW, autocast, a plain Python loop."""
    from peft import LoraConfig, get_peft_model

    from prunedlora.compose import compose_config
    from prunedlora.data import ResumableBatches, build_train_examples
    from prunedlora.models import load_model, resolve_device
    torch.set_num_threads(args.threads)
    cfg = compose_config(["method=lora", *shared_overrides(args)])
    device = resolve_device(cfg.train.device)
    model, tokenizer = load_model(cfg.model, device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=LORA_TARGETS))
    model.train()
    forward = torch.compile(model) if args.arm_compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    examples = build_train_examples(cfg.task, cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed, True)
    batches = ResumableBatches(examples, cfg.train.batch_size, cfg.train.seed, tokenizer.pad_token_id)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batches.next_batch().items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loss a progress bar shows: one host sync, as in our loop
        times.append(time.perf_counter() - start)
    return times


def profile_ours(args: argparse.Namespace) -> str:
    """Where our eager LoRA step spends its time: ``torch.profiler`` around a short ``prunedlora-train`` run
    (``--profile`` steps; model load and export included, so the table shows them too), top ops by self time."""
    from prunedlora.compose import compose_config
    from prunedlora.train.recipe import run

    torch.set_num_threads(args.threads)
    overrides = [o for o in shared_overrides(args) if not o.startswith(("train.max_steps", "train.save_every"))]
    cfg = compose_config(["method=lora", f"method.target_modules=[{','.join(LORA_TARGETS)}]", *overrides,
                          f"train.max_steps={args.profile}", f"train.save_every={args.profile}"])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp, torch.profiler.profile(
            activities=activities) as prof:
        run(cfg, Path(tmp) / "run")
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=48)


def matmul_peak(dtype: torch.dtype, device: str, threads: int, repeats: int = 10) -> float:
    """FLOP/s of a square GEMM in ``dtype`` on this device and thread count: the best of ``repeats``.

    The best, not the median: on a shared machine most repeats lose time to other processes, and the peak is
    what the hardware reaches when it gets the core. 2048 in float32 on a CPU (a 512 GEMM stays in cache and
    under-states what the model's larger GEMMs reach); 512 in bf16 on a CPU, since without native bf16 support
    a CPU runs bf16 GEMMs orders of magnitude below fp32 (measured 0.4 GFLOP/s here).
    """
    torch.set_num_threads(threads)
    size = 4096 if device == "cuda" else 512 if dtype == torch.bfloat16 else 2048
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return max(rates)


def flops_per_token(method: str, model_name: str) -> float:
    """~4 FLOPs per frozen parameter per token (forward, input gradients) and 6 per trained one."""
    from prunedlora.compose import compose_config
    from prunedlora.methods import build_method
    from prunedlora.methods.salr import target_linears
    from prunedlora.models import count_parameters, load_model

    cfg = compose_config([f"method={method}", f"model={model_name}"])
    model, _ = load_model(cfg.model, "cpu")
    total, _ = count_parameters(model)
    if method == "salr":  # its attach calibrates on data; count its two adapters (residual + task) directly
        rank = cfg.method.residual_rank + cfg.method.rank
        trainable = sum(rank * (m.in_features + m.out_features)
                        for m in target_linears(model, cfg.method.target_modules).values())
    else:
        build_method(cfg.method, cfg.sparsity).attach(model)
        _, trainable = count_parameters(model)
    return 4.0 * total + 6.0 * trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model", default="smollm2_135m", help="a model preset (tiny: a smoke run of the script)")
    parser.add_argument("--compile-methods", default="lora", help="methods also run with train.compile=true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16 autocast (the issue's setting) or fp32 (CPUs without native bf16)")
    parser.add_argument("--no-compile", action="store_true", help="skip every compiled arm (HF + PEFT's included)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of our eager LoRA arm and add the top ops to the section")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--arm-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm == "hf_peft":
        Path(args.result).write_text(json.dumps(hf_peft_loop(args)))
        return
    if args.arm == "profile":
        Path(args.result).write_text(profile_ours(args))
        return

    methods = [m for m in args.methods.split(",") if m]
    compiled = [] if args.no_compile else [m for m in args.compile_methods.split(",") if m]
    arms = [("hf_peft", False), *([] if args.no_compile else [("hf_peft", True)]),
            *((m, False) for m in methods), *((m, True) for m in compiled)]
    times: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}
    per_round: dict[tuple[str, bool], list[float]] = {arm: [] for arm in arms}  # each round's median step
    with tempfile.TemporaryDirectory(prefix="bench_throughput_") as tmp:
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else arms[::-1]:
                name, comp = arm
                steps = run_hf_peft(comp, args, Path(tmp)) if name == "hf_peft" else run_ours(name, comp, args,
                                                                                               Path(tmp))
                times[arm].extend(steps[args.warmup:])
                per_round[arm].append(statistics.median(steps[args.warmup:]))
                print(f"round {round_ + 1}: {name}{'+compile' if comp else ''} "
                      f"median {per_round[arm][-1]:.3f} s/step", flush=True)
    peak = matmul_peak(torch.bfloat16 if args.precision == "bf16" else torch.float32, args.device, args.threads)
    tokens = args.batch_size * args.seq_len
    hf_rounds = per_round[("hf_peft", False)]
    rows = ["| arm | median step (s) | tokens/s | vs HF + PEFT eager | per round | of the matmul peak |",
            "|---|---:|---:|---:|---|---:|"]
    for arm, values in times.items():
        name, comp = arm
        step = statistics.median(values)
        # Ratios within a round (the two arms ran minutes apart under the same load), then their median.
        ratios = [hf / ours for hf, ours in zip(hf_rounds, per_round[arm], strict=True)]
        fraction = tokens * flops_per_token("lora" if name == "hf_peft" else name, args.model) / step / peak
        rows.append(f"| {name}{' + compile' if comp else ''} | {step:.3f} | {tokens / step:.0f} | "
                    f"{statistics.median(ratios):.2f}x | {', '.join(f'{r:.2f}x' for r in ratios)} | {fraction:.1%} |")
    markdown = "\n".join([
        "## Training throughput against HF + PEFT",
        "",
        f"`model={args.model}`, packed GSM8K rows of {args.batch_size} x {args.seq_len} tokens, "
        f"AdamW, {args.steps} steps per arm of which the first {args.warmup} are left out (compilation), "
        f"{args.rounds} alternating rounds, {args.threads} threads on {args.device}, {args.precision}. Each method at "
        f"its defaults; lora, droplora and HF + PEFT with r8 on q, k, v, o. Measured {args.precision} matmul peak: "
        f"{peak / 1e12:.3f} TFLOP/s.",
        "",
        *rows,
        "",
        f"Targets: ours eager >= {TARGETS['eager_vs_hf']}x HF + PEFT, compiled >= {TARGETS['compiled_vs_hf']}x, "
        f"compiled at >= {TARGETS['peak_fraction']:.0%} of the measured peak.",
        "",
        *provenance(),
    ])
    if args.profile:
        markdown += "\n\n" + profile_section(args)
    publish("throughput", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
