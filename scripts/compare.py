"""Every method on one model, one data set, one budget and one seed: tables and plots in ``docs/RESULTS.md``.

    python -m scripts.compare --suite methods      # lora, droplora, prunedlora, adalora, loraprune, salr
    python -m scripts.compare --suite sweep        # prunedlora, loraprune, salr at sparsity 0.25 / 0.5 / 0.75
    python -m scripts.compare --suite quality      # LoRAPrune and SALR at 50% on PTB: WikiText-2 / PTB PPL
    python -m scripts.compare --suite prunedlora   # PrunedLoRA 32 -> 8 variants vs LoRA r8 / r16, seeds 42, 1, 2
    python -m scripts.compare --suite structure    # LoRAPrune per_layer vs uniform at 50% / 25%, seeds 42, 1
    options: [--jobs 2] [--threads 1] [--out runs/compare] [--budget cpu|gpu] [--dry-run] [--collect-only]
             [--no-write] [--only label,label]

Every row is a real run: a ``prunedlora-train`` subprocess (``prunedlora-eval`` for the untouched base
model) with its own run directory ``<out>/<budget>-<data>/<run label>``. Runs whose configs coincide across suites
share that directory (the sweep reuses the comparison's 50% and 75% runs), a finished run is never repeated
(the run-dir guard hands back its summary) and an interrupted one resumes from its last checkpoint. ``--jobs``
runs go side by side, each pinned to ``--threads`` torch threads (on a 2-core machine, two 1-thread jobs beat
one 2-thread job; tokens/s are then per job, measured while the other job runs).

The rows come from :func:`prunedlora.eval.report.collect_run` (the same reader as ``prunedlora-report``);
each suite then writes its section of ``docs/RESULTS.md`` (command line, machine, settings, table, the papers'
numbers, and the claimed orderings checked against ours) and its plots under ``docs/figures/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from prunedlora.eval.report import collect_run, plot_metric
from scripts._publish import (
    FIGURES,
    REPO,
    command_line,
    figure_link,
    machine_description,
    publish,
    run_commit,
    run_logged,
)
from scripts.compare_seeds import annotate, seed_sections
from scripts.compare_suites import BUDGETS, SUITES, Run, Suite


@dataclass
class Outcome:
    run: Run
    run_dir: Path
    returncode: int
    seconds: float


def _command(run: Run, run_dir: Path, threads: int, budget_overrides: list[str]) -> list[str]:
    exe = Path(sys.executable).parent / ("prunedlora-train" if run.train else "prunedlora-eval")
    threads_override = [f"train.num_threads={threads}"] if run.train else []
    run_keys = {o.split("=", 1)[0] for o in run.overrides}  # a run's own value (e.g. train.seed) wins
    shared = [o for o in budget_overrides if o.split("=", 1)[0] not in run_keys]
    return [str(exe), *shared, *run.overrides, *threads_override, f"hydra.run.dir={run_dir}"]


def run_commits(outcomes: list[Outcome]) -> list[str]:
    """The commits the runs were made at, from the first line of each ``<label>.log``."""
    return sorted({commit if (commit := run_commit(o.run_dir)) is not None else "unknown" for o in outcomes})


def _finished(run: Run, run_dir: Path) -> bool:
    return (run_dir / ("summary.json" if run.train else "eval/results.json")).is_file()


def execute(run: Run, run_dir: Path, threads: int, budget_overrides: list[str]) -> Outcome:
    """Run one job (unless finished), its output in ``<run_dir>.log``; never raises on a failed job."""
    if _finished(run, run_dir):
        return Outcome(run, run_dir, 0, 0.0)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    command = _command(run, run_dir, threads, budget_overrides)
    start = time.perf_counter()
    code = run_logged(command, run_dir.with_name(run_dir.name + ".log"), env)
    seconds = time.perf_counter() - start
    print(f"[{'ok' if code == 0 else f'FAILED rc={code}'}] {run.label} in {seconds / 60:.1f} min -> {run_dir}",
          flush=True)
    return Outcome(run, run_dir, code, seconds)


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _millions(value: object) -> str:
    return "–" if value is None else f"{float(value) / 1e6:.2f}M"


def table(suite: Suite, rows: dict[str, dict]) -> str:
    head = ["run", "method", "objective", "sparsity (target / achieved)", "final rank", "trainable",
            "params after export", "peak train mem (MB)", "train tok/s", *(header for _, header in suite.metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
    for run in suite.runs:
        row = rows.get(run.label)
        if row is None:
            lines.append(f"| {run.label} | missing: not run, or failed (see its log) |" + " |" * (len(head) - 2))
            continue
        sparsity = f"{_fmt(run.sparsity)} / {_fmt(row.get('sparsity_achieved'), 3)}" if run.train else "–"
        method = row.get("method") if run.train else "none (base model)"
        objective = row.get("objective") or "–"  # ce for runs made before there was a choice
        cells = [run.label, method, objective, sparsity, row.get("ranks") or run.structure,
                 _millions(row.get("params_trainable")), _millions(row.get("params_after_export")),
                 _fmt(row.get("peak_memory_mb"), 5), _fmt(row.get("tokens_per_s"), 3)]
        cells += [_fmt(row.get(key)) for key, _ in suite.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(suite: Suite, rows: dict[str, dict], budget: str) -> list[Path]:
    """Metric vs sparsity, one line per method (the dense LoRA run drawn at sparsity 0 as the reference)."""
    points = []
    for run in suite.runs:
        row = rows.get(run.label)
        if row is not None and run.sparsity is not None:
            points.append({**row, "sparsity": run.sparsity, "method": run.series or row.get("method")})
    FIGURES.mkdir(parents=True, exist_ok=True)
    out = []
    for key, _ in suite.plot_metrics:
        path = FIGURES / f"{suite.name}_{budget}_{key.replace('/', '_')}.png"
        if plot_metric(points, key, path) is not None:
            out.append(path)
    return out


def suite_section(suite: Suite, budget: str, rows: dict[str, dict], outcomes: list[Outcome], *, jobs: int,
                  threads: int) -> str:
    """The suite's section of ``docs/RESULTS.md`` (its plots written); a seeded suite's verdicts may judge the seeds
    that finished."""
    figures = plots(suite, rows, budget) if suite.plot_metrics else []
    ran = sum(o.seconds for o in outcomes)
    provenance = (f"Job time summed over the runs done by this invocation: {ran / 60:.0f} min." if ran else
                  "Collected from finished run directories (`--collect-only`); each run's command line heads its "
                  "`<label>.log`.") + f" Runs made at commit {', '.join(run_commits(outcomes))}."
    parts = [
        f"## {suite.title} ({budget} budget)",
        f"`{command_line()}`",
        f"Machine: {machine_description()} (per job: {threads} torch thread(s), {jobs} job(s) side by side). "
        f"Date: {time.strftime('%Y-%m-%d')}. {provenance}",
        suite.setup(budget),
        table(suite, rows),
    ]
    parts += [figure_link(p) for p in figures]
    if suite.seeded:
        parts += seed_sections(suite, rows, {o.run.label: o.run_dir for o in outcomes}, FIGURES, budget)
    if suite.papers:
        parts.append(suite.papers)
    if suite.seeded:  # paired per-seed checks over the seeds that finished (each verdict says how many)
        verdicts = suite.verdicts(annotate(suite, rows))
    else:
        verdicts = suite.verdicts(rows)  # each verdict says "not measured" where its runs are missing
    heading = "What the papers claim, checked at this scale" if suite.papers else "Our rules and targets, checked"
    parts.append(f"{heading}:\n\n" + "\n".join(f"- {v}" for v in verdicts))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: tables and plots from the finished runs already in --out")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument("--only", default="",
                        help="comma-separated run labels: run only these, in this order; the suite's other runs are "
                             "collected where finished (as --collect-only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # what machine_description reports: the jobs' thread count
    suite = SUITES[args.suite]
    budget_overrides = [*BUDGETS[args.budget][suite.data], *suite.eval_overrides]
    folder = args.out / f"{args.budget}-{suite.data}"
    run_dirs = {run.label: folder / run.label for run in suite.runs}
    only = [label for label in args.only.split(",") if label]
    if unknown := sorted(set(only) - set(run_dirs)):
        parser.error(f"--only names runs not in suite {suite.name}: {', '.join(unknown)}; its runs: "
                     f"{', '.join(run_dirs)}")
    if args.dry_run:
        for run in suite.runs:
            print(" ".join(_command(run, run_dirs[run.label], args.threads, budget_overrides)))
        return 0
    by_label = {r.label: r for r in suite.runs}
    to_run = [] if args.collect_only else [by_label[label] for label in only] if only else list(suite.runs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = {o.run.label: o for o in pool.map(
            lambda r: execute(r, run_dirs[r.label], args.threads, budget_overrides), to_run)}
    outcomes = [done.get(r.label) or Outcome(r, run_dirs[r.label], 0 if _finished(r, run_dirs[r.label]) else 1, 0.0)
                for r in suite.runs]
    rows = {o.run.label: collect_run(o.run_dir, o.run_dir.parent) for o in outcomes
            if o.returncode == 0 and _finished(o.run, o.run_dir)}
    markdown = suite_section(suite, args.budget, rows, outcomes, jobs=args.jobs, threads=args.threads)
    publish(f"compare_{suite.name}_{args.budget}", markdown, write=not args.no_write)
    failed = [o.run.label for o in outcomes if o.run.label in done and o.returncode != 0]
    if failed:
        print(f"failed runs (logs beside their run dirs in {folder}): {', '.join(failed)}")
    if missing := [o.run.label for o in outcomes if o.run.label not in done and o.returncode != 0]:
        print(f"not run in this call and not finished before: {', '.join(missing)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
