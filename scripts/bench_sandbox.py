"""HumanEval pass@1 wall time with and without bubblewrap around each completion.

    python -m scripts.bench_sandbox [--problems 20] [--reps 5] [--no-write]

Scores the canonical solutions of the first ``--problems`` HumanEval problems of the local mirror
(``PRUNEDLORA_DATA_ROOT``) with ``prunedlora.eval.humaneval.pass_at_k``, one call per problem as lm-eval
makes it, at ``eval.sandbox=python`` (the Python guards in a subprocess, in an empty network namespace when
``unshare`` works: the path before bubblewrap) and ``eval.sandbox=bwrap``. The two levels alternate
completion by completion, in ABBA order (a shared machine drifts within seconds, so whole sweeps one after
the other compare badly); a repetition's wall time for a level is the sum of its ``--problems`` calls. The
table reports medians over repetitions, the ratio bwrap / python (the target is <= 1.3) and pass@1, which
must be 1.0 at both levels. Writes the ``humaneval_sandbox``
section of ``docs/RESULTS.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from prunedlora.config import DataConfig
from prunedlora.data import load_records
from prunedlora.eval.humaneval import pass_at_k
from prunedlora.eval.sandbox import bwrap_problem
from scripts._publish import command_line, git_commit, publish

LEVELS = ("python", "bwrap")


def score(problem: dict, level: str) -> tuple[float, float]:
    """(wall seconds, pass@1) of ``problem``'s canonical solution at ``level``."""
    start = time.perf_counter()
    value = pass_at_k([problem["test"] + f"\ncheck({problem['entry_point']})\n"],
                      [[problem["prompt"] + problem["canonical_solution"]]], k=[1], allow_code_execution=True,
                      sandbox=level)["pass@1"]
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if bwrap_problem() is not None:
        print(f"bubblewrap does not work here: {bwrap_problem()}", file=sys.stderr)
        return 1
    root = os.environ.get("PRUNEDLORA_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    problems = load_records("humaneval", "test", DataConfig(root=root, hub=False))[: args.problems]
    times: dict[str, list[float]] = {lvl: [] for lvl in LEVELS}
    passes: dict[str, set[float]] = {lvl: set() for lvl in LEVELS}
    for rep in range(args.reps):
        wall = dict.fromkeys(LEVELS, 0.0)
        values: dict[str, list[float]] = {lvl: [] for lvl in LEVELS}
        for i, problem in enumerate(problems):
            for level in LEVELS if (rep + i) % 2 == 0 else LEVELS[::-1]:  # ABBA
                seconds, value = score(problem, level)
                wall[level] += seconds
                values[level].append(value)
        for level in LEVELS:
            times[level].append(wall[level])
            passes[level].add(sum(values[level]) / len(values[level]))
        print(f"rep {rep}: " + ", ".join(f"{lvl} {wall[lvl]:.2f} s" for lvl in LEVELS), flush=True)
    med = {lvl: statistics.median(times[lvl]) for lvl in LEVELS}
    ratio = med["bwrap"] / med["python"]
    n = len(problems)
    seen = {lvl: ", ".join(f"{p:.2f}" for p in sorted(passes[lvl])) for lvl in LEVELS}
    rows = [f"| {lvl} | {med[lvl]:.2f} | {1000 * med[lvl] / n:.0f} | {seen[lvl]} |"
            for lvl in LEVELS]  # pass@1 lists every value seen over the repetitions (one, 1.00, when all is well)
    md = "\n".join([
        "## HumanEval sandbox: pass@1 wall time with and without bubblewrap",
        "",
        f"`{command_line()}`",
        "",
        f"Canonical solutions of the first {n} HumanEval problems, one completion each, scored one after the other "
        f"as lm-eval does, the two levels alternating completion by completion (ABBA); medians over {args.reps} "
        f"repetitions of the {n} completions' summed wall time; {os.cpu_count()} CPUs shared with "
        f"other jobs, commit {git_commit()}. `python` = the Python guards in a subprocess (empty network namespace "
        "via `unshare`), `bwrap` = the same inside bubblewrap.",
        "",
        "| eval.sandbox | wall time (s) | per completion (ms) | pass@1 |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"bwrap / python: **{ratio:.2f}x** (target <= 1.3x).",
    ])
    publish("humaneval_sandbox", md, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
