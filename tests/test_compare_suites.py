"""``scripts/compare.py``: every run of every suite and budget composes and validates (a typo would otherwise
surface minutes into a 45-minute comparison), and runs that suites share have one configuration."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from recipe_helpers import compose_root

from prunedlora.config import validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare_suites import BUDGETS, SUITES  # noqa: E402


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_run_composes_and_validates(suite: str, budget: str) -> None:
    for run in SUITES[suite].runs:
        cfg = compose_root([*BUDGETS[budget][SUITES[suite].data], *SUITES[suite].eval_overrides, *run.overrides])
        validate(cfg)
        assert cfg.train.seed == 42 and cfg.model.name == "smollm2_135m"
        if run.sparsity:
            assert cfg.sparsity.final == run.sparsity, run.label


def test_labels_shared_across_suites_mean_the_same_run() -> None:
    seen: dict[tuple[str, str], tuple[str, ...]] = {}
    for suite in SUITES.values():
        for run in suite.runs:
            key = (suite.data, run.label)
            assert seen.setdefault(key, run.overrides) == run.overrides, run.label
    # the sweep reuses the comparison's runs at its sparsities
    methods = {r.label for r in SUITES["methods"].runs}
    assert {"prunedlora-s0.75", "loraprune-s0.50", "salr-s0.50", "lora-r8"} <= methods
    assert methods & {r.label for r in SUITES["sweep"].runs} == {"prunedlora-s0.75", "loraprune-s0.50", "salr-s0.50",
                                                                 "lora-r8"}


def test_prunedlora_runs_reach_their_rank_within_the_cpu_budget() -> None:
    steps = int(next(o for o in BUDGETS["cpu"]["gsm8k"] if o.startswith("train.max_steps=")).split("=")[1])
    for s in (0.25, 0.5, 0.75):
        cfg = compose_root([*BUDGETS["cpu"]["gsm8k"], *next(r for r in SUITES["sweep"].runs
                                                             if r.label == f"prunedlora-s{s:.2f}").overrides])
        target = cfg.method.target_rank(cfg.sparsity.final)
        events = (cfg.method.init_rank - target) // cfg.sparsity.per_event
        assert target == round(32 * (1 - s)) and events * cfg.sparsity.every <= steps // 2  # half the steps recover
