"""Short training runs timed side by side, for the benchmarks that compare two settings of one method
(``bench_one_shot``: one-shot against progressive; ``bench_distill_cost``: distillation against cross-entropy).

Every arm is ``prunedlora-train`` on the quality budget's data and settings (``cpu-fp32``, PTB, 2 x 256 tokens a step,
float32; ``python -m scripts.compare --budget cpu-fp32``) with ``--steps`` optimizer steps and no evaluation. An arm's
train tokens/s is its tokens over the sum of its step times (``metrics.jsonl``: work done inside a step, such as a
pruning event or a teacher forward, counts; setup before the first step does not). The arms alternate inside each
round, in reverse order every other round, so load from other processes hits them alike: compare them by the ratio
within a round, and quote the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts._publish import REPO
from scripts.compare_suites import BUDGETS


def add_arguments(parser: argparse.ArgumentParser, steps: int = 40) -> None:
    """``--steps``, ``--rounds``, ``--threads``, ``--model`` and ``--no-write``."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2_135m", help="a model preset (tiny: a smoke run of the script)")
    parser.add_argument("--no-write", action="store_true")


def run_arm(overrides: tuple[str, ...], args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One training run with the method ``overrides``: tokens/s over its steps, mean step seconds, peak memory, the
    seconds of a one-shot cut before the first step, the exported parameter count and the teacher weights held."""
    run_dir = out / f"arm-{time.time_ns()}"
    budget = [o for o in BUDGETS["cpu-fp32"]["ptb"] if not o.startswith(("train.max_steps", "eval.", "model="))]
    command = [f"model={args.model}", *budget, *overrides, f"train.max_steps={args.steps}",
               f"train.save_every={args.steps}", "train.log_every=1", "eval.enabled=false", "logging.progress=false",
               f"train.num_threads={args.threads}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    exe = Path(sys.executable).with_name("prunedlora-train")
    subprocess.run([str(exe), *command], cwd=REPO, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    seconds = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(steps),
            "peak_memory_mb": max(r.get("peak_memory_mb") or 0.0 for r in steps),
            "cut_s": summary.get("one_shot", {}).get("one_shot_s", 0.0),
            "params": summary.get("params_after_export", 0),
            "teacher_held_mb": summary.get("recovery", {}).get("teacher_held_mb", 0.0)}


def alternate(arms: dict[str, tuple[str, ...]], args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Every arm once per round, in the given order in odd rounds and reversed in even ones; results per arm."""
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="prunedlora_bench_") as tmp:
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else reversed(arms):
                results[arm].append(run_arm(arms[arm], args, Path(tmp)))
                print(f"round {round_ + 1}: {arm} {results[arm][-1]}", flush=True)
    return results


def ratios(results: dict[str, list[dict[str, float]]], numerator: str, denominator: str, key: str) -> list[float]:
    """``key`` of ``numerator`` over ``denominator``, round by round."""
    return [a[key] / b[key] for a, b in zip(results[numerator], results[denominator], strict=True)]
