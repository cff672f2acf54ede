"""What distilling from the unpruned model costs per training step: each method's ``recovery=mix`` (the cross-entropy
and the KL to the teacher, half each) against ``recovery=ce`` on the same settings, side by side.

    python -m scripts.bench_distill_cost [--steps 20] [--rounds 2] [--threads 1] [--model smollm2_135m] [--no-write]

The arms are the recovery grid's rows (``python -m scripts.compare --suite recovery``) at both objectives, run by
``scripts/_training_arms.py`` (the quality budget's settings, ``--steps`` steps, no evaluation):

- ``loraprune``: the default (one-shot cut to 50%, ``activation``, re-fit, ``gqa_balanced``); its teacher is a held
  copy of the unpruned base in ``recovery.teacher_dtype`` (bf16), since the cut model no longer contains it;
- ``prunedlora``: rank 32 -> 8; its teacher is the training model with the adapters switched off (no copy);
- ``salr``: 50% unstructured Wanda; its teacher is the training model with the dense weights the pruning replaced
  swapped back in (held in bf16).

A distilling step adds one forward of the teacher under ``no_grad`` and the KL over the vocabulary to the student's
forward and backward. With a frozen base the backward costs about one forward (no weight gradient for the base; a
profile of SALR's step on SmolLM2 put it at 1.1x the forward), so a cross-entropy step is about two forwards and a
teacher of the same size adds about half of it; the KL over a 49k vocabulary adds about a third of a forward more.
Each method's cost is the ratio of its two arms' step seconds within a round; the section quotes the median over
rounds.

Writes the ``distill_step_cost`` section of ``docs/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics

from scripts._publish import provenance, publish
from scripts._training_arms import add_arguments, alternate, ratios
from scripts.loraprune_suites import prunedlora_row, recovery_overrides, salr_row

METHODS = {
    "loraprune": {"ce": recovery_overrides(objective="ce"), "mix": recovery_overrides()},
    "prunedlora": {objective: prunedlora_row(objective).overrides for objective in ("ce", "mix")},
    "salr": {objective: salr_row(objective).overrides for objective in ("ce", "mix")},
}
"""Each method's two arms, setting for setting the recovery grid's rows."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, steps=20)
    args = parser.parse_args()

    arms = {f"{method}-{objective}": overrides for method, pair in METHODS.items()
            for objective, overrides in pair.items()}
    results = alternate(arms, args)
    rows = ["| method | teacher weights held (MB) | ce step (s, per round) | mix step (s, per round) | mix / ce, per "
            "round | median | peak memory ce / mix (MB) |", "|---|---:|---|---|---|---:|---:|"]
    for method in METHODS:
        ce, mix = results[f"{method}-ce"], results[f"{method}-mix"]
        cost = ratios(results, f"{method}-mix", f"{method}-ce", "step_s")
        seconds = {name: ", ".join(f"{r['step_s']:.2f}" for r in runs) for name, runs in (("ce", ce), ("mix", mix))}
        rows.append(
            f"| {method} | {mix[0]['teacher_held_mb']:.0f} | {seconds['ce']} | {seconds['mix']} | "
            f"{', '.join(f'{c:.2f}x' for c in cost)} | "
            f"{statistics.median(cost):.2f}x | {max(r['peak_memory_mb'] for r in ce):.0f} / "
            f"{max(r['peak_memory_mb'] for r in mix):.0f} |")
    markdown = "\n".join([
        "## Distillation's cost per training step",
        "",
        f"`model={args.model}`, the quality budget's PTB rows (2 x 256 tokens a step, float32), {args.steps} steps "
        f"per arm, {args.rounds} alternating rounds, {args.threads} thread(s). Each method's recovery grid row with "
        "`recovery=mix` (half cross-entropy, half KL to the unpruned model) against the same row with `recovery=ce`. "
        "Step seconds are the mean over the steps; the one-shot cut before step 1 is not in them. With a frozen base a "
        "step is about two forwards, so a teacher of the student's size adds about half, and the KL a sixth more.",
        "",
        *rows,
        "",
        *provenance(),
    ])
    publish("distill_step_cost", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
