"""For suites that repeat configurations over seeds (``Suite.seeded``): the mean ± stderr table and loss plots.

``compare`` calls :func:`seed_sections` after the per-run table. A configuration is a ``Run.series``; its runs
differ only in ``train.seed``. The statistics themselves (mean, standard error, paired checks) are ``seed_stats``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scripts._publish import figure_link
from scripts.compare_suites import Suite
from scripts.seed_stats import by_seed, mean_stderr

SMOOTH = 5
"""Training-loss plot: centred moving average over this many steps (one step is 2 x 256 tokens, a noisy loss)."""
REFERENCE = "lora r8"
"""The series the loss plot's lower panel subtracts, seed by seed."""


def annotate(suite: Suite, rows: dict[str, dict]) -> dict[str, dict]:
    """Rows with ``_series`` and ``_seed`` from the suite's runs (the row itself does not know them)."""
    runs = {run.label: run for run in suite.runs}
    return {label: {**row, "_series": runs[label].series, "_seed": runs[label].seed}
            for label, row in rows.items() if label in runs}


def seed_table(suite: Suite, rows: dict[str, dict]) -> str:
    """One row per series: n, each metric's per-seed values, mean ± stderr."""
    series = list(dict.fromkeys(run.series for run in suite.runs if run.series))
    head = ["configuration", "seeds"]
    for _, header in suite.metrics:
        head += [f"{header} per seed", f"{header} mean ± stderr"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---|---:|" * len(suite.metrics)]
    for name in series:
        seeds = sorted(s for s in (row["_seed"] for row in rows.values() if row["_series"] == name))
        cells = [name, ", ".join(map(str, seeds)) or "none finished"]
        for key, _ in suite.metrics:
            values = by_seed(rows, name, key)
            ordered = [values[s] for s in sorted(values)]
            if not ordered:
                cells += ["–", "–"]
                continue
            mean, err = mean_stderr(ordered)
            cells += [" / ".join(f"{v:.4f}" for v in ordered),
                      f"{mean:.4f} ± {err:.4f}" if err is not None else f"{mean:.4f} (one seed)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from ``metrics.jsonl``, and the steps where components were pruned."""
    out = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            out[int(record["step"])] = float(record["loss"])
    return out


def _events(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        record: dict[str, Any] = json.loads(line)
        if record.get("pruned_this_step"):
            steps.append(int(record["step"]))
    return steps


def _smooth(values: list[float], width: int) -> list[float]:
    half = width // 2
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [sum(c[s] for c in curves) / len(curves) for s in steps]


def loss_plot(suite: Suite, run_dirs: dict[str, Path], finished: set[str], path: Path,
              reference: str = REFERENCE) -> Path | None:
    """Training loss per series (mean over the finished seeds, moving average), pruning events dotted.

    Top: the loss itself. Bottom: the loss minus ``reference``'s in the same seed. Runs of one seed see the
    same batches in the same order, so the difference removes most of the batch-to-batch noise and shows
    what each pruning event costs and how fast it is recovered.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = {name: {r.seed: run_dirs[r.label] for r in suite.runs if r.series == name and r.label in finished}
            for name in dict.fromkeys(run.series for run in suite.runs if run.series)}
    runs = {name: dirs for name, dirs in runs.items() if dirs}
    if not runs:
        return None
    fig = Figure(figsize=(9, 7), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    ref = {seed: _losses(d) for seed, d in runs.get(reference, {}).items()}
    for k, (name, dirs) in enumerate(runs.items()):
        color = f"C{k}"
        steps, mean = _mean_curve([_losses(d) for d in dirs.values()])
        top.plot(steps, _smooth(mean, SMOOTH), color=color, label=f"{name} ({len(dirs)} seed(s))")
        paired = [{s: c[s] - ref[seed][s] for s in c if s in ref[seed]}
                  for seed, c in ((seed, _losses(d)) for seed, d in dirs.items()) if seed in ref]
        if paired and name != reference:
            steps, diff = _mean_curve(paired)
            bottom.plot(steps, _smooth(diff, SMOOTH), color=color, label=f"{name} ({len(paired)} seed(s))")
        for ax in (top, bottom):
            for step in _events(next(iter(dirs.values()))):
                ax.axvline(step, color=color, alpha=0.3, linestyle=":")
    top.set_ylabel(f"training loss\n(seed mean, moving avg {SMOOTH})")
    top.set_title(f"{suite.name}: training loss; dotted lines: pruning events (line colour)")
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel(f"minus {reference}, same seed\n(seed mean, moving avg {SMOOTH})")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def seed_sections(suite: Suite, rows: dict[str, dict], run_dirs: dict[str, Path], figures: Path,
                  budget: str) -> list[str]:
    """The mean ± stderr table and the loss plot, as markdown parts of the suite's section."""
    annotated = annotate(suite, rows)
    parts = ["Per configuration (seeds that finished; stderr = sample sd / √n):", seed_table(suite, annotated)]
    figures.mkdir(parents=True, exist_ok=True)
    plot = loss_plot(suite, run_dirs, set(rows), figures / f"{suite.name}_{budget}_training_loss.png")
    if plot is not None:
        parts.append(figure_link(plot))
    return parts
