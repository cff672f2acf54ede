"""Figures written into run directories (matplotlib, Agg canvas, imported lazily).

The figures draw on their own ``Figure`` with an Agg canvas instead of ``pyplot``, so importing or
calling this module never changes matplotlib's global backend or opens a window.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def rank_grid(ranks: dict[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """Arrange ``module name -> rank`` as layer × module type.

    The layer is the first integer component of the name (``model.layers.3.self_attn.q_proj`` -> 3;
    names without one go to a row ``-``), the module type its last component.

    Returns:
        (row labels, column labels, grid) with ``nan`` where a layer has no module of that type.
    """
    cells: dict[tuple[str, str], int] = {}
    for name, rank in ranks.items():
        match = _LAYER.search(name)
        cells[(match.group(1) if match else "-", name.rsplit(".", 1)[-1])] = rank
    rows = sorted({r for r, _ in cells}, key=lambda r: (r == "-", int(r) if r != "-" else 0))
    cols = list(dict.fromkeys(c for _, c in cells))  # first-appearance order: q, k, v, o
    grid = [[float(cells.get((r, c), math.nan)) for c in cols] for r in rows]
    return rows, cols, grid


def rank_heatmap(ranks: dict[str, int], path: Path, title: str, max_rank: int | None = None) -> Path:
    """Heatmap of final ranks (layer × module type), each cell annotated with its rank.

    Args:
        ranks: module name -> final active rank.
        path: where to write the PNG (parent directories are created).
        title: figure title (e.g. the method, r0 and target).
        max_rank: top of the colour scale (r0); default the largest rank.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib costs ~0.5 s to import
    from matplotlib.figure import Figure

    rows, cols, grid = rank_grid(ranks)
    top = max_rank if max_rank is not None else max(ranks.values(), default=1)
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.2 + 0.35 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(top, 1), aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                # Dark text on the bright end of viridis, light text elsewhere.
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 * top else "white")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="final rank")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
