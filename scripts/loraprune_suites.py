"""LoRAPrune's two grids for ``python -m scripts.compare``: ``structure`` (per_layer against uniform) and
``recovery`` (issue 29: the objective, the criterion, the re-fit, the schedule and the structure, one factor at a time
around one default, with SALR and PrunedLoRA with and without distillation). Both run on the quality suite's budget
(PTB fine-tune, WikiText-2 and PTB perplexity)."""

from __future__ import annotations

import math
from collections.abc import Callable

from scripts.suite_types import Run, value

PAPER_LAYOUT = ("sparsity.schedule=cubic", "method.refit=false", "method.gqa_balanced=false", "recovery=ce")
"""LoRAPrune's progressive pipeline as measured before issue 29 made one-shot the default (the paper's schedule, no
re-fit, free head choice, cross-entropy): the rows that name only a criterion run it."""
STRUCTURE_SEEDS = (42, 1)
STRUCTURE_SPARSITIES = (0.5, 0.25)


def _structure_run(s: float, structure: str, seed: int) -> Run:
    """LoRAPrune's default criterion with an explicit ``method.structure`` (per_layer keeps the older label)."""
    tag = "" if structure == "per_layer" else f"-{structure}"
    label = f"loraprune-channel_taylor{tag}-s{s:.2f}" + ("" if seed == 42 else f"-seed{seed}")
    overrides = ("method=loraprune", "method.criterion=channel_taylor", f"method.structure={structure}",
                 *PAPER_LAYOUT, f"sparsity.final={s}", "sparsity.every=5",
                 *(() if seed == 42 else (f"train.seed={seed}",)))
    return Run(label, overrides, s, series=f"loraprune ({structure}, {s:.0%})", structure=structure, seed=seed)


def structure_runs() -> tuple[Run, ...]:
    """per_layer and uniform paired per sparsity and seed: the first pairs answer the default question first."""
    return tuple(_structure_run(s, structure, seed) for s in STRUCTURE_SPARSITIES for seed in STRUCTURE_SEEDS
                 for structure in ("per_layer", "uniform"))


def structure_verdicts(rows: dict[str, dict]) -> list[str]:
    """Issue 23's rule: uniform becomes the default if its PPL is within 5% of per_layer's (seed means)."""
    out = []
    for s in STRUCTURE_SPARSITIES:
        runs = {structure: {seed: _structure_run(s, structure, seed).label for seed in STRUCTURE_SEEDS}
                for structure in ("per_layer", "uniform")}
        seeds = [seed for seed in STRUCTURE_SEEDS if all(runs[k][seed] in rows for k in runs)]
        for key in ("wikitext2/ppl", "ptb/ppl"):
            what = f"LoRAPrune uniform within 5% of per_layer at {s:.0%} (the default rule)"
            values = {k: [value(rows, runs[k][seed], key) for seed in seeds] for k in runs}
            if not seeds or None in values["per_layer"] + values["uniform"]:
                out.append(f"{what}: not measured ({key}: no seed finished for both).")
                continue
            uniform, per_layer = (sum(values[k]) / len(seeds) for k in ("uniform", "per_layer"))
            params = [value(rows, runs["uniform"][seed], "params_after_export") or 0.0 for seed in seeds]
            reference = [value(rows, runs["per_layer"][seed], "params_after_export") or 1.0 for seed in seeds]
            out.append(f"{what}: {'yes' if uniform <= 1.05 * per_layer else 'no'} (uniform {uniform:.4g} vs per_layer "
                       f"{per_layer:.4g}, {uniform / per_layer - 1:+.1%}, {key}, mean of seeds "
                       f"{', '.join(map(str, seeds))}; exported parameters uniform / per_layer "
                       f"{sum(params) / sum(reference):.4f}).")
    return out


# ------------------------------------------------------------------------------------------------ recovery
RECOVERY_DEFAULT = {"schedule": "one_shot", "criterion": "activation", "refit": True, "objective": "mix",
                    "structure": "per_layer", "gqa_balanced": True, "refit_lora": "keep"}
"""The configuration the recovery grid varies one factor at a time around (the candidate new default).
``gqa_balanced``: the same number of query heads removed from every KV group, so no layer needs k/v expanded (with
no training at 50% on SmolLM2: WikiText-2 PPL 89.2 at 94.26M parameters, against 106.7 at 96.18M without)."""
RECOVERY_VARIANTS = (("objective", "ce"), ("objective", "distill"), ("refit", False), ("schedule", "progressive"),
                     ("gqa_balanced", False), ("criterion", "channel_taylor"), ("criterion", "activation_taylor"),
                     ("structure", "uniform"))
"""One factor changed per row, in the order they are worth running."""
RECOVERY_SEEDS = (42, 1)
REFIT_LORA_MERGE = {"schedule": "progressive", "refit_lora": "merge"}
"""``method.refit_lora=merge`` acts at progressive events only (a one-shot cut has no trained adapter yet), so its
row is judged against the progressive row, not the default."""


def _recovery_run(s: float = 0.5, seed: int = 42, **change: object) -> Run:
    """LoRAPrune at ``s`` with ``RECOVERY_DEFAULT`` except ``change``; the label names every setting."""
    c = {**RECOVERY_DEFAULT, **change}
    label = (f"loraprune-{c['schedule']}-{c['criterion']}-{'refit' if c['refit'] else 'norefit'}-{c['objective']}"
             f"{'' if c['structure'] == 'per_layer' else '-' + str(c['structure'])}"
             f"{'-balanced' if c['gqa_balanced'] else ''}{'-merge' if c['refit_lora'] == 'merge' else ''}-s{s:.2f}"
             f"{'' if seed == 42 else f'-seed{seed}'}")
    overrides = ("method=loraprune", f"method.criterion={c['criterion']}", f"method.refit={str(c['refit']).lower()}",
                 f"method.structure={c['structure']}", f"method.gqa_balanced={str(c['gqa_balanced']).lower()}",
                 f"method.refit_lora={c['refit_lora']}", f"recovery={c['objective']}", f"sparsity.final={s}",
                 *(("sparsity.schedule=one_shot",) if c["schedule"] == "one_shot"
                   else ("sparsity.schedule=cubic", "sparsity.every=5")),
                 *(() if seed == 42 else (f"train.seed={seed}",)))
    series = f"loraprune ({', '.join(f'{k}={v}' for k, v in change.items()) or 'default'})"
    return Run(label, overrides, s, series=series, structure=str(c["structure"]), seed=seed)


def recovery_overrides(**change: object) -> tuple[str, ...]:
    """The method overrides of the recovery grid's row with ``change`` (``scripts.bench_one_shot`` times two)."""
    return _recovery_run(**change).overrides


def _with_objective(label: str, overrides: tuple[str, ...], s: float, objective: str, seed: int = 42) -> Run:
    """``label`` names the cross-entropy row at seed 42 (the objective every method trained with before issue 29)."""
    label += ("" if objective == "ce" else f"-{objective}") + ("" if seed == 42 else f"-seed{seed}")
    return Run(label, (*overrides, f"recovery={objective}", *(() if seed == 42 else (f"train.seed={seed}",))), s,
               seed=seed)


SALR_OBJECTIVES = ("ce", "mix", "distill")
PRUNEDLORA_OBJECTIVES = ("ce", "mix")


def salr_row(objective: str, seed: int = 42) -> Run:
    """SALR at 50% on the Wanda base (the quality suite's row) with ``recovery=objective``."""
    overrides = ("method=salr", "method.base_criterion=wanda", "method.pattern='unstructured'", "sparsity.final=0.5")
    return _with_objective("salr-wanda-s0.50", overrides, 0.5, objective, seed)


def prunedlora_row(objective: str, seed: int = 42) -> Run:
    """PrunedLoRA at its defaults, r0 = 32 pruned to 8 (``sparsity.final=0.75``), with ``recovery=objective``."""
    return _with_objective("prunedlora-ptb-s0.75", ("method=prunedlora", "sparsity.final=0.75"), 0.75, objective, seed)
CURRENT_DEFAULT = ("loraprune-channel_taylor-s0.50", "loraprune-channel_taylor-s0.50-seed1")
"""LoRAPrune's default before the grid (channel_taylor, progressive, no re-fit, cross-entropy), two seeds."""


def recovery_runs() -> tuple[Run, ...]:
    """Seed 42 first, in the order worth running: the default, one factor at a time, 25%, SALR, PrunedLoRA, the
    adapter's re-fit; then seed 1 in the same order."""
    return tuple(run for seed in RECOVERY_SEEDS for run in (
        _recovery_run(seed=seed), *(_recovery_run(seed=seed, **{k: v}) for k, v in RECOVERY_VARIANTS),
        *(r for r in structure_runs() if r.label == CURRENT_DEFAULT[RECOVERY_SEEDS.index(seed)]),
        _recovery_run(0.25, seed), *(salr_row(o, seed) for o in SALR_OBJECTIVES),
        *(prunedlora_row(o, seed) for o in PRUNEDLORA_OBJECTIVES), _recovery_run(seed=seed, **REFIT_LORA_MERGE)))


def _geomean(rows: dict[str, dict], labels: list[str]) -> tuple[float, float, float] | None:
    """Seed means of WikiText-2 and PTB PPL over ``labels`` and their geometric mean (None: any missing)."""
    values = [(value(rows, label, "wikitext2/ppl"), value(rows, label, "ptb/ppl")) for label in labels]
    if not values or any(None in pair for pair in values):
        return None
    wiki, ptb = (sum(v[i] for v in values) / len(values) for i in (0, 1))
    return wiki, ptb, math.sqrt(wiki * ptb)


def _finished(rows: dict[str, dict], labels: list[str]) -> list[str]:
    return [label for label in labels if label in rows]


def _seed_means(rows: dict[str, dict], *arms: Callable[[int], Run]) -> tuple[list[int], list[tuple]] | None:
    """Each arm's ``_geomean`` over the seeds every arm finished (None: no such seed)."""
    seeds = [seed for seed in RECOVERY_SEEDS if all(_geomean(rows, [arm(seed).label]) for arm in arms)]
    return (seeds, [_geomean(rows, [arm(seed).label for seed in seeds]) for arm in arms]) if seeds else None


def _versus(rows: dict[str, dict], what: str, arm: Callable[[int], Run], reference: Callable[[int], Run],
            reference_name: str) -> str:
    """``what``: ``arm`` against ``reference`` on the geometric mean of the seed means of WikiText-2 and PTB PPL."""
    measured = _seed_means(rows, arm, reference)
    if measured is None:
        return f"{what}: not measured."
    seeds, (g, ref) = measured
    return (f"{what} (geometric mean of WikiText-2 and PTB PPL, seeds {', '.join(map(str, seeds))}): {g[2]:.4g} vs "
            f"{ref[2]:.4g} ({g[0]:.4g} / {g[1]:.4g} vs {ref[0]:.4g} / {ref[1]:.4g}): the {reference_name} is "
            f"{'better' if ref[2] < g[2] else 'worse'}.")


def recovery_verdicts(rows: dict[str, dict]) -> list[str]:
    """Issue 29's targets, then each variant against the default on the geometric mean of the two PPLs (seed means
    over the seeds both finished), PrunedLoRA's objectives, and the adapter's re-fit."""
    default = [_recovery_run(seed=seed).label for seed in RECOVERY_SEEDS]
    out = []
    new, old = _geomean(rows, _finished(rows, default)), _geomean(rows, _finished(rows, list(CURRENT_DEFAULT)))
    what = "The recovery default beats channel_taylor on both sets, WikiText-2 <= 100 and PTB < 57.0 (target)"
    if new is None or old is None:
        out.append(f"{what}: not measured.")
    else:
        ok = new[0] <= 100 and new[1] < 57.0 and new[0] < old[0] and new[1] < old[1]
        out.append(f"{what}: {'yes' if ok else 'no'} (default {new[0]:.4g} / {new[1]:.4g}, channel_taylor "
                   f"{old[0]:.4g} / {old[1]:.4g}; seeds {', '.join(_finished(rows, default))} against "
                   f"{', '.join(_finished(rows, list(CURRENT_DEFAULT)))}).")
    salr = {}
    for objective in SALR_OBJECTIVES:
        labels = _finished(rows, [salr_row(objective, seed).label for seed in RECOVERY_SEEDS])
        if (g := _geomean(rows, labels)) is not None:
            salr[objective] = (g[2], len(labels))
    best = min(salr, key=lambda o: salr[o][0], default=None)
    out.append("SALR with its best objective: geometric mean of WikiText-2 and PTB at most 48.5 (target): " + (
        f"{'yes' if salr[best][0] <= 48.5 else 'no'} ({best} {salr[best][0]:.4g}; "
        + ", ".join(f"{o} {g:.4g} ({n} seed{'s' * (n > 1)})" for o, (g, n) in salr.items()) + ")."
        if best is not None else "not measured."))
    one_shot, progressive = _recovery_run().label, _recovery_run(schedule="progressive").label
    tok_one, tok_prog = value(rows, one_shot, "tokens_per_s"), value(rows, progressive, "tokens_per_s")
    out.append("One-shot against progressive train tokens/s at 50%, from these rows (they ran beside different jobs; "
               "the side-by-side measurement of the 1.3x target is `python -m scripts.bench_one_shot`): " + (
                   f"{tok_one:.3g} vs {tok_prog:.3g}, {tok_one / tok_prog:.2f}x."
                   if tok_one is not None and tok_prog is not None else "not measured."))
    for k, v in RECOVERY_VARIANTS:
        out.append(_versus(rows, f"{k}={v} against the default", lambda seed, k=k, v=v: _recovery_run(
            seed=seed, **{k: v}), lambda seed: _recovery_run(seed=seed), "default"))
    out.append(_versus(rows, "PrunedLoRA with recovery=mix against recovery=ce", lambda seed: prunedlora_row(
        "mix", seed), lambda seed: prunedlora_row("ce", seed), "cross-entropy row"))
    out.append(_versus(rows, "method.refit_lora=merge against keep, progressive schedule", lambda seed: _recovery_run(
        seed=seed, **REFIT_LORA_MERGE), lambda seed: _recovery_run(seed=seed, schedule="progressive"), "keep row"))
    return out
