"""Pruning building blocks shared by the methods: sparsity schedules and rank-component criteria."""

from __future__ import annotations

from prunedlora.pruning.rank_criteria import CRITERIA, obs_prune, obs_prune_one, select_global
from prunedlora.pruning.schedules import SCHEDULE_FNS, is_event, resolve_schedule, target_fraction

__all__ = [
    "CRITERIA",
    "SCHEDULE_FNS",
    "is_event",
    "obs_prune",
    "obs_prune_one",
    "resolve_schedule",
    "select_global",
    "target_fraction",
]
