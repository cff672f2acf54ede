"""What a suite of ``python -m scripts.compare`` is made of (``Run``, ``Suite``), and the two helpers every suite's
verdicts use to read the collected rows (``value``, ``compare``). The suites themselves: ``scripts.compare_suites``
(and ``scripts.loraprune_suites`` for LoRAPrune's structure and recovery grids)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Run:
    label: str
    """Run-directory name; two suites naming the same label must give it the same overrides."""
    overrides: tuple[str, ...]
    sparsity: float | None = None
    """Where the run sits on a sweep plot (None: not plotted)."""
    series: str | None = None
    """Line of the sweep plot (default: the method name)."""
    structure: str = ""
    """Shown when the run has no ranks to report (the untouched base)."""
    train: bool = True
    """False: evaluate the base model only (``prunedlora-eval``)."""
    seed: int | None = None
    """The run's ``train.seed`` when a suite repeats a configuration over seeds (None: the budget's)."""


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    runs: tuple[Run, ...]
    data: str
    """Training data of every run ("gsm8k" or "ptb"): picks the budget's overrides and the run folder."""
    metrics: tuple[tuple[str, str], ...]
    """(``<task>/<metric>`` key of the report row, column header)."""
    setup: Callable[[str], str]
    """Budget name -> a paragraph saying what every run shared."""
    verdicts: Callable[[dict[str, dict]], list[str]]
    plot_metrics: tuple[tuple[str, str], ...] = ()
    papers: str = ""
    eval_overrides: tuple[str, ...] = ()
    """Evaluation settings of this suite's own runs (eval keys may differ between runs that share a directory:
    a finished run is never evaluated again)."""
    seeded: bool = False
    """Runs repeat over seeds: the section adds a mean ± stderr table per ``series`` and the training loss
    around the pruning events (``compare_seeds``, ``seed_stats``)."""


def value(rows: dict[str, dict], label: str, key: str) -> float | None:
    """Row ``label``'s ``key`` as a float (None: the run or the metric is missing)."""
    v = rows.get(label, {}).get(key)
    return float(v) if v is not None else None


def compare(rows: dict[str, dict], a: str, b: str, key: str, what: str, lower_is_better: bool = True) -> str:
    """One verdict line: does run ``a`` beat run ``b`` on ``key``."""
    va, vb = value(rows, a, key), value(rows, b, key)
    if va is None or vb is None:
        return f"{what}: not measured ({key} missing)."
    better = va < vb if lower_is_better else va > vb
    return f"{what}: {'yes' if better else 'no'} ({a} {va:.4g} vs {b} {vb:.4g}, {key})."
