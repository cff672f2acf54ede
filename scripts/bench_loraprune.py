"""LoRAPrune at 50% structure sparsity: the compacted model vs the dense base, and the memory of a pruning step.

    python -m scripts.bench_loraprune [--model auto|smollm2|tiny] [--steps 6] [--reps 5] [--threads 1]
                                      [--no-memory] [--no-write]

1. Masks: LoRA (r = 8, all seven projections) trains ``--steps`` optimizer steps on WikiText-2 validation
   text (the mirror has no raw train split; random tokens if the mirror is missing) while
   ``method=loraprune`` (``criterion=lora_guided``) scores and prunes on a cubic schedule that reaches
   ``sparsity.final = 0.5`` of every prunable layer's heads and channels by the end; once per GQA policy
   (``query_head``, ``query_head`` + ``gqa_balanced``, ``kv_group``), since the policy decides the exported
   k/v shapes.
2. Export as the run would (slice, merge, ``pruned_llama`` checkpoint); the dense base is saved the same
   way (fp32 safetensors) for the size on disk.
3. Both reloaded from disk (the compacted one through ``trust_remote_code``); forward latency in
   inference mode, fp32, for ``4 x 512`` tokens and ``1 x 128`` tokens. Models alternate inside each
   repetition (a shared machine drifts); medians.
4. Memory of one pruning step (forward, backward, scoring, optimizer step; batches ``1 x 64`` and
   ``2 x 256``) with ``lora_guided`` vs ``true_gradient``, each in a fresh subprocess: the peak resident set
   during the step (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the
   resident set before it (model loaded, adapted, weights paged in). CPU numbers; the paper's are GPU memory.

Writes the ``loraprune_compaction`` section of ``docs/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prunedlora.config import DataConfig, ModelConfig, SparsityConfig
from prunedlora.export import save_pretrained_dir
from prunedlora.methods.loraprune import LoraPruneConfig, LoraPruneMethod
from prunedlora.models import load_model
from scripts._publish import REPO, provenance, publish

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
POLICIES = {
    "query_head": {"gqa_balanced": False},
    "query_head + gqa_balanced": {"gqa_balanced": True},
    "kv_group": {"gqa_policy": "kv_group", "gqa_balanced": False},
}
PROGRESSIVE = {"refit": False}
"""The paper's progressive method, which this script measures (the re-fit would calibrate at every event)."""
SHAPES = [(4, 512), (1, 128)]
MEMORY_CRITERIA = ["lora_guided", "magnitude", "true_gradient", "channel_taylor"]
MEMORY_SHAPES = [(1, 64), (2, 256)]


# ------------------------------------------------------------------------------------------- setup
def model_config(kind: str) -> tuple[ModelConfig, str]:
    """``smollm2`` if its offline copy can be had (``auto``), else ``tiny``."""
    if kind in ("auto", "smollm2"):
        try:
            from prunedlora.models import smollm2_offline_dir

            path = smollm2_offline_dir()
            label = "SmolLM2-135M-Instruct (Q4_1 dequantized, fp32)"
            return ModelConfig(name="smollm2_135m", name_or_path=str(path)), label
        except Exception as err:  # no wheel, no network: fall back, and say so
            if kind == "smollm2":
                raise
            print(f"SmolLM2 unavailable ({err}); using the tiny model", flush=True)
    return ModelConfig(name="tiny", name_or_path="tiny"), "tiny random LLaMA (h64, L2, 4/2 heads)"


def token_batches(tokenizer, n: int, batch: int, seq: int) -> list[torch.Tensor]:
    """``n`` batches of WikiText-2 validation text (the mirror has no raw train split; random tokens without it)."""
    try:
        from prunedlora.data import load_lm_text

        text = load_lm_text("wikitext2", "valid", DataConfig(root=str(DATA_ROOT), hub=False))
        ids = torch.tensor(tokenizer(text[: 6 * n * batch * seq])["input_ids"])  # ~4 characters per token
        rows = ids[: (len(ids) // seq) * seq].view(-1, seq)
        if rows.shape[0] >= n * batch:
            return [rows[i * batch:(i + 1) * batch] for i in range(n)]
        print(f"only {rows.shape[0]} rows of WikiText-2; random tokens", flush=True)
    except Exception as err:  # the mirror is optional for a benchmark
        print(f"WikiText-2 unavailable ({err}); random tokens", flush=True)
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, len(tokenizer), (batch, seq), generator=gen) for _ in range(n)]


def prune(model, cfg: LoraPruneConfig, sparsity: SparsityConfig, batches: list[torch.Tensor]) -> LoraPruneMethod:
    """Train LoRA for ``len(batches)`` steps with the loop's hook order; returns the attached method."""
    torch.manual_seed(0)
    method = LoraPruneMethod(cfg, sparsity)
    method.attach(model)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0)[0]["params"], lr=2e-4)
    (callback,) = method.callbacks()
    callback.on_train_start(model, optimizer, len(batches))
    model.train()
    for step, x in enumerate(batches, start=1):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        figures = callback.on_before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"  step {step}: loss {loss.item():.3f}, target {figures['prune_target']:.3f}, "
              f"sparsity {figures['sparsity']:.3f}", flush=True)
    model.eval()
    return method


def schedule(steps: int) -> SparsityConfig:
    # cubic, no warm-up, the final 50% reached at the second-to-last event (cool-down), an event every 2 steps
    return SparsityConfig(schedule="cubic", final=0.5, every=2, warmup_frac=0.0, cooldown_frac=0.34)


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- timing
@torch.inference_mode()
def latencies(models: dict[str, torch.nn.Module], vocab: int, reps: int) -> dict[str, dict[tuple, float]]:
    """Median forward seconds per model and input shape; models alternate within each repetition."""
    gen = torch.Generator().manual_seed(1)
    inputs = {shape: torch.randint(3, vocab, shape, generator=gen) for shape in SHAPES}
    times: dict[str, dict[tuple, list[float]]] = {name: {s: [] for s in SHAPES} for name in models}
    for model in models.values():  # warm-up
        model(input_ids=inputs[SHAPES[-1]], use_cache=False)
    for _ in range(reps):
        for shape, x in inputs.items():
            for name, model in models.items():
                t0 = time.perf_counter()
                model(input_ids=x, use_cache=False)
                times[name][shape].append(time.perf_counter() - t0)
    return {name: {s: statistics.median(v) for s, v in per.items()} for name, per in times.items()}


# ------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_step(kind: str, criterion: str, batch: int, seq: int) -> dict[str, float]:
    """One optimizer step with pruning scores; peak RSS during it above the RSS before it."""
    cfg, _ = model_config(kind)
    model, tokenizer = load_model(cfg)
    method = LoraPruneMethod(LoraPruneConfig(criterion=criterion, dropout=0.0, **PROGRESSIVE), schedule(2))
    method.attach(model)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0)[0]["params"], lr=2e-4)
    (callback,) = method.callbacks()
    callback.on_train_start(model, optimizer, 2)
    base_grads = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if p.requires_grad and "lora_" not in n)
    x = token_batches(tokenizer, 1, batch, seq)[0]
    model.train()
    with torch.no_grad():  # page in weights that from_pretrained left memory-mapped: they are not the step's
        for param in model.parameters():
            param.sum()
    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward()
    callback.on_before_optimizer_step(2)  # an event step: scores, EMA and masking
    optimizer.step()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_mib": peak / 1024, "step_extra_mib": (peak - before) / 1024,
            "base_grads_mib": base_grads / 2**20, "step_s": seconds}


def memory_table(kind: str, threads: int, shapes: list[tuple[int, int]] = MEMORY_SHAPES) -> list[str]:
    rows = ["| batch | criterion | RSS before the step (MiB) | peak RSS in the step (MiB) | step's extra (MiB) "
            "| dL/dW0 held (MiB) | peak vs true_gradient | peak vs lora_guided | step (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for batch, seq in shapes:
        results = {}
        for criterion in MEMORY_CRITERIA:
            cmd = [sys.executable, "-m", __spec__.name, "--memory-step", criterion, "--memory-shape",
                   f"{batch}x{seq}", "--model", kind, "--threads", str(threads)]
            # A fixed mmap threshold (which also turns off glibc's dynamic one) returns every freed tensor above
            # 64 KiB to the OS at once, so the resident set follows live tensors rather than allocator caching.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, env=env).stdout
            results[criterion] = json.loads(out.strip().splitlines()[-1])
            print(batch, seq, criterion, results[criterion], flush=True)
        reference, guided = results["true_gradient"]["peak_mib"], results["lora_guided"]["peak_mib"]
        for criterion, r in results.items():
            rows.append(f"| {batch} x {seq} | {criterion} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} "
                        f"| {r['step_extra_mib']:.0f} | {r['base_grads_mib']:.0f} | {r['peak_mib'] / reference:.2f}x "
                        f"| {r['peak_mib'] / guided:.2f}x | {r['step_s']:.1f} |")
    return rows


# ------------------------------------------------------------------------------------------- main
def compaction_rows(kind: str, steps: int, reps: int, workdir: Path) -> tuple[list[str], list[str], str]:
    cfg, label = model_config(kind)
    dense, tokenizer = load_model(cfg)
    dense.eval()
    save_pretrained_dir(dense, tokenizer, workdir / "dense")
    batches = token_batches(tokenizer, steps, 2, 128)
    figures = {}
    for name, overrides in POLICIES.items():
        print(f"pruning with {name}", flush=True)
        model, _ = load_model(cfg)
        method = prune(model, LoraPruneConfig(dropout=0.0, criterion="lora_guided", **PROGRESSIVE, **overrides),
                       schedule(steps), batches)
        report = method.report(model)
        exported = method.export(model, tokenizer, workdir / _slug(name), cfg.name_or_path)  # writes <dir>/model
        figures[name] = {**report, **exported}
        del model
    from transformers import AutoModelForCausalLM

    models = {"dense": AutoModelForCausalLM.from_pretrained(workdir / "dense", dtype=torch.float32).eval()}
    for name in POLICIES:
        models[name] = AutoModelForCausalLM.from_pretrained(workdir / _slug(name) / "model", dtype=torch.float32,
                                                            trust_remote_code=True).eval()
    lat = latencies(models, len(tokenizer), reps)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    size = {"dense": disk_bytes(workdir / "dense"), **{n: disk_bytes(workdir / _slug(n) / "model") for n in POLICIES}}
    head = ("| model | heads / channels removed (prunable layers) | KV heads (exported, per pruned layer) "
            "| parameters | non-embedding | size on disk (MB) "
            + "".join(f"| {b}x{t} forward (ms) | {b}x{t} tokens/s " for b, t in SHAPES) + "|")
    rows = [head, "|---|---|---|---:|---:|---:|" + "---:|" * (2 * len(SHAPES))]
    dense_ne = None
    for name in models:
        f = figures.get(name)
        removed = "-" if f is None else f"{f['sparsity_heads']:.0%} / {f['sparsity_channels']:.0%}"
        kv = "-" if f is None else _kv_summary(f)
        non_embedding = figures[next(iter(POLICIES))]["params_non_embedding_before"] if f is None else f[
            "params_non_embedding_after"]
        dense_ne = dense_ne or non_embedding
        cells = "".join(f"| {lat[name][s] * 1e3:.0f} | {s[0] * s[1] / lat[name][s]:,.0f} " for s in SHAPES)
        rows.append(f"| {name} | {removed} | {kv} | {params[name] / 1e6:.2f} M ({params[name] / params['dense']:.2f}x) "
                    f"| {non_embedding / 1e6:.2f} M ({non_embedding / dense_ne:.2f}x) "
                    f"| {size[name] / 1e6:.1f} {cells}|")
        print(rows[-1], flush=True)
    speed = ["| model | " + " | ".join(f"{b}x{t} speed-up" for b, t in SHAPES) + " |",
             "|---|" + "---:|" * len(SHAPES)]
    for name in POLICIES:
        speed.append(f"| {name} | " + " | ".join(f"{lat['dense'][s] / lat[name][s]:.2f}x" for s in SHAPES) + " |")
    return rows, speed, label


def _slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_")


def _kv_summary(f: dict) -> str:
    pruned = [f["exported_num_key_value_heads_per_layer"][i] for i in f["prunable_layers"]]
    values = sorted(set(pruned))
    expanded = len(f["gqa_expanded_layers"])
    return f"{'/'.join(map(str, values))}" + (f" (k/v expanded in {expanded} layers)" if expanded else "")


MEMORY_TEXT = (
    "Memory of one pruning step (forward + backward + scoring/EMA/masking + AdamW step; fresh process per run with "
    "`MALLOC_MMAP_THRESHOLD_=65536`; weights paged in before the step). CPU resident set: activations, LoRA and "
    "AdamW state, and for `true_gradient` the base-weight gradients dL/dW0 of the prunable projections (fp32, "
    "'held' column); `channel_taylor` holds one vector per o_proj/down_proj input instead. The paper reports 18.3 "
    "vs 38.6 GB (0.47x) GPU memory for LoRAPrune vs LLM-Pruner on LLaMA-7B, where the weights dwarf the "
    "activations. On a 135M model with a 49k vocabulary the peak sits at the start of the backward pass (logits "
    "and activations); the weight gradients accumulate as activations are freed, so once the batch is large they "
    "no longer raise the peak.")


def memory_only(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> None:
    """The pruning-step memory of every criterion alone, in section ``loraprune_step_memory``."""
    load = os.getloadavg()[0]
    rows = memory_table(args.model, args.threads, shapes)
    text = "\n".join(["## LoRAPrune: memory of a pruning step per criterion", "",
                      f"Model: {model_config(args.model)[1]}. {MEMORY_TEXT} Load average at start {load:.1f}.", "",
                      *rows, "", *provenance()])
    publish("loraprune_step_memory", text, write=not args.no_write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["auto", "smollm2", "tiny"], default="auto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared 2-core machine 2 threads ran 3-4x slower than 1")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the pruning-step memory table, into its own section loraprune_step_memory")
    parser.add_argument("--memory-shapes", default=",".join(f"{b}x{s}" for b, s in MEMORY_SHAPES),
                        help="batch x tokens of the memory steps, comma-separated")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--memory-step", choices=MEMORY_CRITERIA, help=argparse.SUPPRESS)
    parser.add_argument("--memory-shape", default="2x256", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_step:
        batch, seq = (int(v) for v in args.memory_shape.split("x"))
        print(json.dumps(memory_step(args.model, args.memory_step, batch, seq)))
        return
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.memory_shapes.split(",")]
    if args.memory_only:
        memory_only(args, shapes)
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-loraprune-") as tmp:
        rows, speed, label = compaction_rows(args.model, args.steps, args.reps, Path(tmp))
    memory = [] if args.no_memory else memory_table(args.model, args.threads, shapes)
    md = [
        "## LoRAPrune: compacted model vs dense base, memory of a pruning step", "",
        f"Model: {label}. Masks chosen by `criterion=lora_guided` after {args.steps} optimizer steps "
        "(LoRA r = 8 on all seven projections, batch 2 x 128 tokens of WikiText-2 validation text, cubic schedule "
        "to `sparsity.final = 0.5` with an event every 2 steps), one run per GQA policy; first 10% of layers and "
        "the last exempt. Exported (sliced, LoRA merged) and reloaded from disk "
        "(`from_pretrained(..., trust_remote_code=True)`); the dense base saved the same way (fp32 safetensors). "
        f"Forward in inference mode, fp32, no KV cache, random tokens; medians of {args.reps} alternating "
        f"repetitions, {args.threads} torch thread(s). Load average at start {load:.1f} on a shared 2-core "
        "machine: latencies are noisy.", "",
        *rows, "", *speed, "",
    ]
    if memory:
        md += [MEMORY_TEXT, "", *memory, ""]
    publish("loraprune_compaction", "\n".join([*md, *provenance()]), write=not args.no_write)


if __name__ == "__main__":
    main()
