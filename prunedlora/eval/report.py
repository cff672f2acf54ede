"""Sweep report: one CSV, one markdown table and one plot per metric for a multirun directory.

    prunedlora-report <multirun dir> [--out DIR]        (or: python -m scripts.report ...)

Every run under the directory (any folder with a ``summary.json`` or an ``eval/results.json``) becomes one
row: its path, Hydra overrides, method, sparsity (the configured ``sparsity.final`` from
``.hydra/config.yaml``; the achieved fraction from ``summary.json`` as ``sparsity_achieved``), final rank
summary, parameter counts, final loss, peak memory during training and median training tokens/s
(``metrics.jsonl``, first step left out), the run's wall time and every evaluation metric as ``<task>/<metric>`` (from
``eval/results.json``, else ``summary.json``'s ``eval``; standalone evaluations filed under the run in
``evals/<time>/`` add the tasks the run's own evaluation lacks), with ``<task>/n``, the items it evaluated.

Then, for each metric, a PNG of the metric against the sparsity each run *reached* (``sparsity_achieved``;
methods that prune nothing sit at 0 and are drawn as a dashed reference line), one line per method. Runs
sharing method and target (seeds) become one point: the mean, with a ±1 s.d. error bar when there are
several. A point whose runs fell short of their target by more than ``TARGET_TOLERANCE`` is drawn hollow and
labelled with the target. The title says whether lower or higher is better; the y label gives the items
evaluated per run. A metric that is 0 for every run gets no plot (an axis around nothing but zeros says
nothing); ``report.md`` lists it instead.

Outputs go to ``<multirun dir>/report/`` (``--out`` to change): ``report.csv``, ``report.md`` and
``<task>_<metric>.png``; re-running regenerates them. Plots use matplotlib's Agg canvas directly (no
display, no global backend switch).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FIXED_COLUMNS = ["run", "method", "objective", "sparsity", "sparsity_achieved", "seed", "ranks", "rank_mean",
                 "params_total", "params_trainable", "params_after_export", "final_loss", "peak_memory_mb",
                 "tokens_per_s", "wall_time_s", "overrides"]
REPORT_DIR = "report"
EVALS_DIR = "evals"
"""Standalone evaluations of a run (``prunedlora-eval run_dir=...``) are filed in ``<run>/evals/<time>/``."""
TARGET_TOLERANCE = 0.01
"""A run whose reached sparsity is more than this below its target did not reach it."""
LOWER_IS_BETTER = ("ppl", "nll", "loss", "word_perplexity", "byte_perplexity", "bits_per_byte")
HIGHER_IS_BETTER = ("exact_match_strict", "exact_match_flexible", "acc", "acc_macro", "pass@1")


# ------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def find_runs(root: Path) -> list[Path]:
    """Folders under ``root`` holding a ``summary.json`` or an ``eval/results.json``, in path order."""
    found = {p.parent for p in root.rglob("summary.json")}
    found |= {p.parent.parent for p in root.rglob("results.json") if p.parent.name == "eval"}
    report = root / REPORT_DIR
    # <run>/evals/<time>/ belongs to <run>'s row (collect_run reads it), unless it is all there is.
    return sorted(d for d in found if report not in d.parents and d != report
                  and not (d.parent.name == EVALS_DIR and d.parent.parent in found))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _override_value(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        k, _, v = item.lstrip("+~").partition("=")
        if k == key:
            return v
    return None


def training_figures(metrics_file: Path) -> dict[str, float | None]:
    """From ``metrics.jsonl``: the median training tokens/s over the steps after the first (which pays one-off
    warm-up) and the peak memory during training (the last logged high-water mark, before export and eval)."""
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {"tokens_per_s": None, "peak_memory_mb": None}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    speeds = [float(r["tokens_per_s"]) for r in records
              if r.get("step", 0) > 1 and _number(r.get("tokens_per_s")) is not None]
    peaks = [float(r["peak_memory_mb"]) for r in records if _number(r.get("peak_memory_mb")) is not None]
    return {"tokens_per_s": statistics.median(speeds) if speeds else None, "peak_memory_mb": max(peaks, default=None)}


def summarize_ranks(ranks: Any) -> tuple[str, float | None]:
    """``("8", 8.0)`` when every module has rank 8, ``("mean 6.5 (4-8)", 6.5)`` otherwise; ``("", None)`` if none."""
    values = [v for v in (ranks.values() if isinstance(ranks, dict) else []) if _number(v) is not None]
    if not values:
        return "", None
    mean = sum(values) / len(values)
    lo, hi = min(values), max(values)
    return (f"{lo:g}" if lo == hi else f"mean {mean:.3g} ({lo:g}-{hi:g})"), mean


def collect_run(run_dir: Path, root: Path) -> dict[str, Any]:
    """One report row for ``run_dir`` (see the module docstring for where each column comes from)."""
    summary = _read_json(run_dir / "summary.json") or {}
    results = _read_json(run_dir / "eval" / "results.json") or {}
    identity = results.get("model", {}) if isinstance(results.get("model"), dict) else {}
    # An evaluation-only folder describes a run elsewhere: take method and sparsity from that run's config.
    config_dir = run_dir
    if not summary and identity.get("run_dir") and Path(identity["run_dir"]).is_dir():
        config_dir = Path(identity["run_dir"])
    config = _read_yaml(config_dir / ".hydra" / "config.yaml") or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    method = summary.get("method") or identity.get("method") or (config.get("method") or {}).get("name")
    sparsity = _number((config.get("sparsity") or {}).get("final"))
    if sparsity is None:
        sparsity = _number(_override_value(overrides, "sparsity.final"))
    ranks, rank_mean = summarize_ranks(summary.get("ranks"))
    row: dict[str, Any] = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else ".",
        "method": method,
        "objective": (summary.get("recovery") or {}).get("objective", "ce") if summary else None,
        "sparsity": sparsity,
        "sparsity_achieved": _number(summary.get("sparsity")),
        "ranks": ranks,
        "rank_mean": rank_mean,
        **{k: summary.get(k) for k in ("params_total", "params_trainable", "params_after_export")},
        "final_loss": _number(summary.get("final_loss")),
        **training_figures(run_dir / "metrics.jsonl"),
        "wall_time_s": _number(summary.get("wall_time_s")),
        "overrides": " ".join(str(o) for o in overrides),
    }
    row["seed"] = (config.get("train") or {}).get("seed")
    evaluations = [results] + [_read_json(p) or {} for p in sorted((run_dir / EVALS_DIR).glob("*/eval/results.json"))]
    for doc in evaluations:
        metrics = doc.get("results") if isinstance(doc.get("results"), dict) else summary.get("eval") or {}
        settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
        for task, values in metrics.items():
            if any(key.startswith(f"{task}/") for key in row):
                continue  # the run's own evaluation first, then the standalone ones for tasks it lacked
            for metric, value in (values or {}).items():
                row[f"{task}/{metric}"] = _number(value)
            n = _number((settings.get(task) or {}).get("n"))
            row[f"{task}/n"] = int(n) if n is not None else None
    return row


def collect(root: Path) -> list[dict[str, Any]]:
    """Rows for every run under ``root``."""
    return [collect_run(d, root) for d in find_runs(root)]


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Evaluation metric columns (``<task>/<metric>``), in first-seen order; item counts left out."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in FIXED_COLUMNS and not key.endswith("/n"):
                seen.setdefault(key, None)
    return list(seen)


def count_columns(rows: list[dict[str, Any]]) -> list[str]:
    """``<task>/n`` columns: the items each task evaluated per run."""
    return list(dict.fromkeys(key for row in rows for key in row if key.endswith("/n")))


# ------------------------------------------------------------------------------------------- writing
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = FIXED_COLUMNS + metric_columns(rows) + count_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows = runs; columns = run, method, recovery objective, sparsity, ranks, params, final loss, each metric."""
    columns = ["run", "method", "objective", "sparsity", "sparsity_achieved", "ranks", "params_total",
               "params_trainable", "params_after_export", "final_loss"] + metric_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def direction(metric: str) -> str:
    """``"lower is better"``, ``"higher is better"`` or ``""`` (unknown) for ``<task>/<metric>``."""
    name = metric.rsplit("/", 1)[-1]
    return "lower is better" if name in LOWER_IS_BETTER else "higher is better" if name in HIGHER_IS_BETTER else ""


def _reached_x(row: dict[str, Any]) -> float | None:
    """The sparsity a run reached; a finished run whose method reports none pruned nothing (0)."""
    achieved = _number(row.get("sparsity_achieved"))
    if achieved is not None:
        return achieved
    return 0.0 if row.get("params_total") is not None else None


@dataclass
class Point:
    """One plotted point: the runs of one method at one target (seeds), averaged."""

    x: float
    y: float
    err: float | None
    """Standard deviation over seeds (None: one seed)."""
    runs: int
    """Distinct seeds behind the point."""
    target: float | None
    reached: bool


def points(rows: list[dict[str, Any]], metric: str) -> dict[str, list[Point]]:
    """Per method, its points sorted by reached sparsity (module docstring: grouping, error bars, targets)."""
    groups: dict[tuple[str, float | None], dict[Any, list[tuple[float, float]]]] = {}
    for i, row in enumerate(rows):
        x, y = _reached_x(row), _number(row.get(metric))
        if x is None or y is None:
            continue
        prunes = _number(row.get("sparsity_achieved")) is not None
        target = _number(row.get("sparsity")) if prunes else None
        seed = row.get("seed") if row.get("seed") is not None else f"row{i}"
        # Runs of one seed (a dense method swept over targets it ignores) are one sample, not several.
        groups.setdefault((str(row.get("method")), target), {}).setdefault(seed, []).append((x, y))
    out: dict[str, list[Point]] = {}
    for (method, target), by_seed in groups.items():
        xs = [statistics.fmean(x for x, _ in xy) for xy in by_seed.values()]
        ys = [statistics.fmean(y for _, y in xy) for xy in by_seed.values()]
        x = statistics.fmean(xs)
        reached = target is None or x >= target - TARGET_TOLERANCE
        err = statistics.stdev(ys) if len(ys) > 1 else None
        out.setdefault(method, []).append(Point(x, statistics.fmean(ys), err, len(ys), target, reached))
    return {m: sorted(p, key=lambda q: (q.x, q.target or 0.0)) for m, p in sorted(out.items())}


def _count_label(rows: list[dict[str, Any]], metric: str) -> str:
    counts = sorted({int(n) for r in rows if (n := _number(r.get(metric.split("/")[0] + "/n"))) is not None})
    if not counts:
        return ""
    return f" (n={counts[0]} per run)" if len(counts) == 1 else f" (n={counts[0]}-{counts[-1]} per run)"


def _offset_from(ax: Any, point: Point) -> Any:
    """Text coordinates in points, measured from ``point`` (so labels of neighbouring points stack evenly)."""
    from matplotlib.text import OffsetFrom

    return OffsetFrom(ax.transData, (point.x, point.y), unit="points")


def plot_metric(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """PNG of ``metric`` against the reached sparsity, one line per method; None when there is nothing to show
    (no run has both values, or the metric is 0 for every run)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = points(rows, metric)
    ys = [p.y for pts in series.values() for p in pts]
    if not ys or all(y == 0 for y in ys):
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = iter(f"C{i}" for i in range(100))
    short = False
    for method, pts in series.items():
        color = next(colors)
        if all(p.target is None and p.x == 0 for p in pts):  # prunes nothing: a reference level across the plot
            mean = statistics.fmean(p.y for p in pts)
            ax.axhline(mean, color=color, linestyle="--", linewidth=1, label=f"{method} (no pruning)")
        xs, means = [p.x for p in pts], [p.y for p in pts]
        errs = [p.err or 0.0 for p in pts]
        dense = all(p.target is None and p.x == 0 for p in pts)
        ax.errorbar(xs, means, yerr=errs if any(errs) else None, color=color, marker="o", capsize=3,
                    linestyle="-" if len(pts) > 1 else "none", label=None if dense else method)
        same_x: dict[float, list[tuple[Point, str]]] = {}
        for p in pts:
            if not p.reached:
                short = True
                ax.plot([p.x], [p.y], marker="o", markersize=11, markerfacecolor="white", markeredgecolor=color,
                        markeredgewidth=2, linestyle="none", zorder=3)
            label = ", ".join(([f"target {p.target:g}"] if not p.reached else [])
                              + ([f"{p.runs} seeds"] if p.runs > 1 else []))
            if label:
                same_x.setdefault(round(p.x, 4), []).append((p, label))
        for group in same_x.values():  # targets that ended at the same sparsity: one column of linked labels
            group.sort(key=lambda item: -item[0].y)
            top = group[0][0]
            for k, (p, label) in enumerate(group):
                ax.annotate(label, (p.x, p.y), xytext=(14, -13 * k), textcoords=_offset_from(ax, top), ha="left",
                            va="center", fontsize=8, color=color,
                            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6} if len(group) > 1 else None)
    if short:
        ax.plot([], [], marker="o", markerfacecolor="white", markeredgecolor="black", linestyle="none",
                label="target not reached")
    targets = [p.target or 0.0 for pts in series.values() for p in pts]
    xs_all = [p.x for pts in series.values() for p in pts]
    ax.set_xlim(-0.02, max(0.1, max(xs_all + targets) * 1.1))
    ax.margins(y=0.12)  # room for the labels of the lowest and highest points
    ax.set_xlabel("sparsity reached (fraction pruned)")
    ax.set_ylabel(metric + _count_label(rows, metric))
    several = any(p.runs > 1 for pts in series.values() for p in pts)
    better = direction(metric)
    subtitle = "mean ± 1 s.d. where a point has several seeds" if several else "one run per point"
    ax.set_title(f"{metric}" + (f" ({better})" if better else "") + f"\n{subtitle}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("/", "_").replace("@", "_at_")) + ".png"


def write_report(root: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Collect ``root`` and write the CSV, the markdown table and the plots; returns what was written.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; give a multirun directory (e.g. multirun/<date>).")
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"No runs under {root}: no summary.json or eval/results.json was found.")
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    plots, unplotted = [], []
    for metric in metric_columns(rows):
        plot = plot_metric(rows, metric, out / plot_name(metric))
        if plot is None:
            unplotted.append(metric)
        else:
            plots.append(plot)
    note = f"\nNot plotted (0 for every run, or no run with a sparsity): {', '.join(unplotted)}.\n" if unplotted else ""
    (out / "report.md").write_text(f"# Sweep report: {root}\n\n{table}\n{note}", encoding="utf-8")
    return {"rows": rows, "csv": write_csv(rows, out / "report.csv"), "markdown": out / "report.md",
            "table": table, "plots": plots, "unplotted": unplotted}


def main(argv: list[str] | None = None) -> int:
    """``prunedlora-report <multirun dir> [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="prunedlora-report",
                                     description="Collect a sweep's runs into a CSV, a markdown table and plots.")
    parser.add_argument("multirun_dir", type=Path, help="a multirun directory (or any folder holding run dirs)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: <multirun_dir>/{REPORT_DIR})")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.multirun_dir, args.out)
    except FileNotFoundError as exc:
        print(f"prunedlora-report: error: {exc}", file=sys.stderr)
        return 2
    print(written["table"])
    print(f"\n{len(written['rows'])} runs -> {written['csv']}, {written['markdown']}, {len(written['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
