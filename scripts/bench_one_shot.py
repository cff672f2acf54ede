"""LoRAPrune's training speed, one-shot against progressive, side by side: the recovery grid's default row and its
``schedule=progressive`` row (issue 29's target: one-shot trains at >= 1.3x progressive's tokens/s at 50%).

    python -m scripts.bench_one_shot [--steps 40] [--rounds 2] [--threads 1] [--model smollm2_135m] [--no-write]

Both arms are ``method=loraprune`` runs of ``scripts/_training_arms.py`` (the quality budget's settings, ``--steps``
steps, no evaluation) at the recovery default (``activation``, re-fit, ``gqa_balanced``, ``recovery=mix``) at 50%:

- ``one_shot``: the cut, re-fit and compaction before the first step (``sparsity.schedule=one_shot``), then LoRA on
  the smaller model;
- ``progressive``: the paper's cubic schedule with an event every 5 steps, as the grid's row (at 40 steps that is 7
  events, about the 200-step run's density of one event per 5 steps), masks on the full-size model.

Each arm's train tokens/s is its tokens over the sum of its step times: the events' calibration and re-fit are
inside the steps they happen in; the one-shot cut before the first step is not, and is reported apart. The arms
alternate, and the section quotes the median over rounds of the ratio within a round.

Writes the ``loraprune_one_shot_speed`` section of ``docs/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics

from scripts._publish import provenance, publish
from scripts._training_arms import add_arguments, alternate, ratios
from scripts.loraprune_suites import recovery_overrides

ARMS = {"one_shot": recovery_overrides(), "progressive": recovery_overrides(schedule="progressive")}
"""The recovery grid's default row and its progressive row, setting for setting."""
TARGET = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()

    results = alternate(ARMS, args)
    per_round = ratios(results, "one_shot", "progressive", "tokens_per_s")
    rows = ["| arm | train tokens/s (per round) | median | peak memory (MB) | cut before step 1 (s) | exported "
            "parameters |", "|---|---|---:|---:|---:|---:|"]
    for arm, runs in results.items():
        rates = [r["tokens_per_s"] for r in runs]
        rows.append(f"| {arm} | {', '.join(f'{t:.0f}' for t in rates)} | {statistics.median(rates):.0f} | "
                    f"{max(r['peak_memory_mb'] for r in runs):.0f} | "
                    f"{statistics.median(r['cut_s'] for r in runs):.0f} | {runs[0]['params'] / 1e6:.2f}M |")
    ratio = statistics.median(per_round)
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
        f"One-shot / progressive train tokens/s, per round: {', '.join(f'{r:.2f}x' for r in per_round)}; median "
        f"{ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'not met'}).",
        "",
        *provenance(),
    ])
    publish("loraprune_one_shot_speed", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
