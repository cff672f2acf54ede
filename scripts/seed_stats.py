"""Statistics over seeds for suites that repeat configurations (``Suite.seeded``): per-seed values, mean and
standard error, paired checks. Rows here carry ``_series`` and ``_seed`` (``compare_seeds.annotate``).

The standard error is the sample standard deviation over seeds divided by √n (n = the seeds that finished), so with
three seeds it is itself rough: read differences of one stderr as noise. Imports nothing from the other scripts:
``compare_suites`` (the verdicts) and ``compare_seeds`` (the tables) both use it.
"""

from __future__ import annotations

import math


def by_seed(rows: dict[str, dict], series: str, key: str) -> dict[int, float]:
    """seed -> ``key`` of every finished run of ``series``."""
    return {row["_seed"]: float(row[key]) for row in rows.values()
            if row.get("_series") == series and row.get(key) is not None}


def series_values(rows: dict[str, dict], series: str, key: str) -> list[float]:
    """``key`` of every finished run of ``series`` (rows from ``compare_seeds.annotate``), in seed order."""
    values = by_seed(rows, series, key)
    return [values[s] for s in sorted(values)]


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired(rows: dict[str, dict], a: str, b: str, key: str, what: str) -> str:
    """Whether ``a`` is at or below ``b`` in every seed both finished, with the per-seed differences."""
    va, vb = by_seed(rows, a, key), by_seed(rows, b, key)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        return f"{what}: not measured (no seed finished for both)."
    diffs = [va[s] - vb[s] for s in seeds]
    verdict = "yes" if all(d <= 0 for d in diffs) else "no"
    detail = ", ".join(f"seed {s}: {d:+.4f}" for s, d in zip(seeds, diffs, strict=True))
    return f"{what}: {verdict} ({a} minus {b}, {key}: {detail}; {len(seeds)} seed(s))."
