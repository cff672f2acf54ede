"""LoRAPrune's training speed, one-shot against progressive, side by side: the recovery grid's default row and its
``schedule=progressive`` row (issue 29's target: one-shot trains at >= 1.3x progressive's tokens/s at 50%).

    python -m scripts.bench_one_shot [--steps 40] [--rounds 2] [--threads 1] [--model smollm2_135m] [--no-write]

Both arms are ``prunedlora-train method=loraprune`` on the quality budget's data and settings (``cpu-fp32``, PTB,
2 x 256 tokens a step, float32; ``python -m scripts.compare --budget cpu-fp32``) with ``--steps`` optimizer steps
and no evaluation, at the recovery default (``activation``, re-fit, ``gqa_balanced``, ``recovery=mix``) at 50%:

- ``one_shot``: the cut, re-fit and compaction before the first step (``sparsity.schedule=one_shot``), then LoRA on
  the smaller model;
- ``progressive``: the paper's cubic schedule with an event every 5 steps, as the grid's row (at 40 steps that is 7
  events, about the 200-step run's density of one event per 5 steps), masks on the full-size model.

Each arm's train tokens/s is its tokens over the sum of its step times (``metrics.jsonl``: the events' calibration
and re-fit are inside the steps they happen in; the one-shot cut before the first step is not, and is reported
apart). The arms alternate inside each round (``one_shot`` first in odd rounds), so load from other processes hits
both alike; the ratio is taken within each round, and the section quotes the median over rounds.

Writes the ``loraprune_one_shot_speed`` section of ``docs/RESULTS.md`` unless ``--no-write``.
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

from scripts._publish import REPO, provenance, publish
from scripts.compare_suites import BUDGETS
from scripts.loraprune_suites import recovery_overrides

ARMS = {"one_shot": recovery_overrides(), "progressive": recovery_overrides(schedule="progressive")}
"""The recovery grid's default row and its progressive row, setting for setting."""
TARGET = 1.3


def run_arm(arm: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """One training run; its tokens/s over the steps, peak memory and the one-shot cut's seconds."""
    run_dir = out / f"{arm}-{time.time_ns()}"
    budget = [o for o in BUDGETS["cpu-fp32"]["ptb"] if not o.startswith(("train.max_steps", "eval.", "model="))]
    overrides = [f"model={args.model}", *budget, *ARMS[arm], f"train.max_steps={args.steps}",
                 f"train.save_every={args.steps}", "train.log_every=1", "eval.enabled=false", "logging.progress=false",
                 f"train.num_threads={args.threads}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    exe = Path(sys.executable).with_name("prunedlora-train")
    subprocess.run([str(exe), *overrides], cwd=REPO, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    seconds = sum(r["step_time_s"] for r in steps)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tokens_per_s": tokens / seconds, "train_s": seconds,
            "peak_memory_mb": max(r.get("peak_memory_mb") or 0.0 for r in steps),
            "cut_s": summary.get("one_shot", {}).get("one_shot_s", 0.0),
            "params": summary.get("params_after_export", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2_135m", help="a model preset (tiny: a smoke run of the script)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="bench_one_shot_") as tmp:
        for round_ in range(args.rounds):
            for arm in ARMS if round_ % 2 == 0 else reversed(ARMS):
                results[arm].append(run_arm(arm, args, Path(tmp)))
                print(f"round {round_ + 1}: {arm} {results[arm][-1]}", flush=True)
    ratios = [one["tokens_per_s"] / prog["tokens_per_s"]
              for one, prog in zip(results["one_shot"], results["progressive"], strict=True)]
    rows = ["| arm | train tokens/s (per round) | median | peak memory (MB) | cut before step 1 (s) | exported "
            "parameters |", "|---|---|---:|---:|---:|---:|"]
    for arm, per_round in results.items():
        rates = [r["tokens_per_s"] for r in per_round]
        rows.append(f"| {arm} | {', '.join(f'{t:.0f}' for t in rates)} | {statistics.median(rates):.0f} | "
                    f"{max(r['peak_memory_mb'] for r in per_round):.0f} | "
                    f"{statistics.median(r['cut_s'] for r in per_round):.0f} | {per_round[0]['params'] / 1e6:.2f}M |")
    ratio = statistics.median(ratios)
    markdown = "\n".join([
        "## LoRAPrune: one-shot against progressive training speed",
        "",
        f"`model={args.model}`, the quality budget's PTB rows (2 x 256 tokens a step, float32), {args.steps} steps "
        f"per arm, {args.rounds} alternating rounds, {args.threads} thread(s); the recovery default (`activation`, "
        "re-fit, `gqa_balanced`, `recovery=mix`) at 50%, one-shot (`sparsity.schedule=one_shot`) against the "
        "paper's progressive schedule (cubic, an event every 5 steps). Train tokens/s: tokens over the sum of step "
        "times, events included; the one-shot cut runs before the first step and is its own column.",
        "",
        *rows,
        "",
        f"One-shot / progressive train tokens/s, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; median "
        f"{ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'not met'}).",
        "",
        *provenance(),
    ])
    publish("loraprune_one_shot_speed", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
