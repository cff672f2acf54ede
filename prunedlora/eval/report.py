"""Sweep report: one CSV, one markdown table and one plot per metric for a multirun directory.

    prunedlora-report <multirun dir> [--out DIR]        (or: python scripts/report.py ...)

Every run under the directory (any folder with a ``summary.json`` or an ``eval/results.json``) becomes one
row: its path, Hydra overrides, method, sparsity (the configured ``sparsity.final`` from
``.hydra/config.yaml``; the achieved fraction from ``summary.json`` as ``sparsity_achieved``), final rank
summary, parameter counts, final loss, peak memory during training and median training tokens/s
(``metrics.jsonl``, first step left out), the run's wall time and every evaluation metric as ``<task>/<metric>`` (from
``eval/results.json``, else ``summary.json``'s ``eval``). Then, for each metric, a PNG of the metric against
sparsity with one line per method (runs sharing method and sparsity, e.g. seeds, are averaged).

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
from pathlib import Path
from typing import Any

import yaml

FIXED_COLUMNS = ["run", "method", "sparsity", "sparsity_achieved", "ranks", "rank_mean", "params_total",
                 "params_trainable", "params_after_export", "final_loss", "peak_memory_mb", "tokens_per_s",
                 "wall_time_s", "overrides"]
REPORT_DIR = "report"


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
    return sorted(d for d in found if report not in d.parents and d != report)


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
    metrics = results.get("results") if isinstance(results.get("results"), dict) else summary.get("eval") or {}
    for task, values in metrics.items():
        for metric, value in (values or {}).items():
            row[f"{task}/{metric}"] = _number(value)
    return row


def collect(root: Path) -> list[dict[str, Any]]:
    """Rows for every run under ``root``."""
    return [collect_run(d, root) for d in find_runs(root)]


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key not in FIXED_COLUMNS:
                seen.setdefault(key, None)
    return list(seen)


# ------------------------------------------------------------------------------------------- writing
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = FIXED_COLUMNS + metric_columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows = runs; columns = run, method, sparsity, ranks, params, final loss, each metric."""
    columns = ["run", "method", "sparsity", "sparsity_achieved", "ranks", "params_total", "params_trainable",
               "params_after_export", "final_loss"] + metric_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _series(rows: list[dict[str, Any]], metric: str, x: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per method: sorted x values and the mean metric at each (runs sharing method and x averaged)."""
    points: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(metric))
        if xv is None or yv is None:
            continue
        points.setdefault(str(row.get("method")), {}).setdefault(xv, []).append(yv)
    return {m: (sorted(p), [sum(p[k]) / len(p[k]) for k in sorted(p)]) for m, p in sorted(points.items())}


def plot_metric(rows: list[dict[str, Any]], metric: str, path: Path, x: str = "sparsity") -> Path | None:
    """PNG of ``metric`` against ``x``, one line per method; None when no run has both values."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = _series(rows, metric, x)
    if not series:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="method")
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
    (out / "report.md").write_text(f"# Sweep report: {root}\n\n{table}\n", encoding="utf-8")
    plots = [p for m in metric_columns(rows) if (p := plot_metric(rows, m, out / plot_name(m))) is not None]
    return {"rows": rows, "csv": write_csv(rows, out / "report.csv"), "markdown": out / "report.md",
            "table": table, "plots": plots}


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
