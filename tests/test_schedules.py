"""Sparsity schedules (prunedlora.pruning.schedules): shapes, event cadence, monotonicity, the config group."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from prunedlora.compose import register_configs
from prunedlora.config import ConfigError, RootConfig, SparsityConfig
from prunedlora.pruning.schedules import ONE_SHOT, SCHEDULE_FNS, is_event, resolve_schedule, target_fraction
from prunedlora.validation import SCHEDULES, validate

T = 100  # max_steps


def fractions(cfg: SparsityConfig, max_steps: int = T, units: int | None = 32) -> list[float]:
    return [target_fraction(cfg, t, max_steps, units=units, default="constant") for t in range(max_steps + 1)]


# ------------------------------------------------------------------------------------------ shapes
def test_the_config_accepts_exactly_the_shapes_and_auto() -> None:
    assert set(SCHEDULE_FNS) | {"auto", ONE_SHOT} == set(SCHEDULES)


def test_a_method_derived_final_moves_the_end_point_and_leaves_the_config_alone() -> None:
    """``final=`` (PrunedLoRA's target rank) is reached instead of ``cfg.final``; ``cfg`` is never changed."""
    for shape in ("constant", "geometric", "linear", "cubic"):
        cfg = SparsityConfig(schedule=shape, initial=0.6, final=0.9, every=10, per_event=0.5)
        f = [target_fraction(cfg, t, T, units=32, default="constant", final=0.5) for t in range(T + 1)]
        assert max(f) == pytest.approx(0.5) and f[-1] == pytest.approx(0.5), shape
        assert (cfg.initial, cfg.final) == (0.6, 0.9)


def test_constant_is_per_event_units_every_k1_steps_capped_at_final() -> None:
    cfg = SparsityConfig(schedule="constant", final=0.5, every=10, per_event=2)
    f = fractions(cfg)
    assert f[0] == 0.0 and f[9] == 0.0  # first event at step K1, never step 0
    assert f[10] == pytest.approx(2 / 32) and f[19] == pytest.approx(2 / 32)  # holds between events
    assert f[20] == pytest.approx(4 / 32)
    assert f[80] == pytest.approx(0.5) and f[100] == pytest.approx(0.5)  # 8 events of 2 reach 16 of 32
    assert f[70] == pytest.approx(14 / 32)


def test_constant_with_a_fractional_per_event_removes_that_share_of_the_remaining_rank() -> None:
    cfg = SparsityConfig(schedule="constant", final=0.75, every=10, per_event=0.25)
    f = fractions(cfg, units=None)  # a fraction needs no units
    assert f[9] == 0.0 and f[10] == pytest.approx(0.25) and f[20] == pytest.approx(1 - 0.75**2)
    assert f[40] == pytest.approx(1 - 0.75**4) and f[50] == pytest.approx(0.75)  # 1 - 0.75^5 > 0.75: capped


def test_geometric_reaches_final_by_end_frac_with_equal_relative_cuts() -> None:
    cfg = SparsityConfig(schedule="geometric", final=0.75, every=5, end_frac=0.6)
    f = fractions(cfg, max_steps=60, units=None)
    # events at 5, 10, ..., 35 (the last one at or before 0.6 * 60 = 36): 7 equal cuts of the remaining rank
    remaining = [1 - f[t] for t in range(0, 40, 5)]
    ratios = [b / a for a, b in zip(remaining, remaining[1:])]
    assert ratios == pytest.approx([0.25 ** (1 / 7)] * 7)
    assert f[35] == 0.75 and f[34] < 0.75 and f[60] == 0.75
    # 32 -> 8 in ranks per module (what uniform allocation keeps)
    assert [32 - round(f[t] * 32) for t in range(0, 40, 5)] == [32, 26, 22, 18, 14, 12, 10, 8]


def test_prunedlora_default_schedule_is_geometric_and_done_by_sixty_percent() -> None:
    from prunedlora.methods.prunedlora.callback import DEFAULT_SCHEDULE

    cfg = SparsityConfig(schedule="auto", final=0.75, every=10)
    assert DEFAULT_SCHEDULE == "geometric" and cfg.end_frac <= 0.6
    f = [target_fraction(cfg, t, T, default=DEFAULT_SCHEDULE) for t in range(T + 1)]
    assert f[60] == 0.75 and f[59] < 0.75  # 100 steps: events 10..60 carry the cuts, the last 40 steps recover


def test_per_event_and_end_frac_are_validated_with_the_key_and_a_fix() -> None:
    for overrides, fragment in ((["sparsity.per_event=1.5"], "sparsity.per_event=1.5"),
                                (["sparsity.per_event=0"], "sparsity.per_event=0"),
                                (["sparsity.end_frac=1.5"], "sparsity.end_frac=1.5")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            validate(compose_root(["model=tiny", "method=prunedlora", *overrides]))
    validate(compose_root(["model=tiny", "method=prunedlora", "sparsity=constant", "sparsity.per_event=0.25"]))


def test_prunedlora_warns_when_its_schedule_cannot_reach_the_target(caplog: pytest.LogCaptureFixture) -> None:
    from prunedlora.methods.prunedlora.callback import PrunedLoraCallback
    from prunedlora.methods.prunedlora.config import PrunedLoraConfig

    for sparsity, steps, warned in ((SparsityConfig(final=0.75, every=10), 8, True),  # no event at all
                                    (SparsityConfig(final=0.75, every=10), 30, False),
                                    (SparsityConfig(schedule="constant", final=0.75, every=10, per_event=2), 20, True)):
        caplog.clear()
        callback = PrunedLoraCallback({}, PrunedLoraConfig(init_rank=8), sparsity, target=2)
        with caplog.at_level(logging.WARNING, logger="prunedlora.methods.prunedlora"):
            callback.on_train_start(None, None, steps)
        assert ("short of the target rank" in caplog.text) == warned, (sparsity, steps)


def test_constant_needs_units() -> None:
    with pytest.raises(ValueError, match="units"):
        target_fraction(SparsityConfig(schedule="constant"), 10, T, default="constant")


@pytest.mark.parametrize("shape", ["linear", "cubic"])
def test_ramps_hold_initial_through_warmup_and_final_through_cooldown(shape: str) -> None:
    cfg = SparsityConfig(schedule=shape, initial=0.1, final=0.5, every=10, warmup_frac=0.1, cooldown_frac=0.2)
    f = fractions(cfg, units=None)
    assert f[0] == 0.0 and f[9] == 0.0  # before the first event: nothing
    assert f[10] == pytest.approx(0.1)  # first event at the end of the warm-up: initial
    assert f[80] == pytest.approx(0.5) and f[100] == pytest.approx(0.5)  # cool-down starts at 100 - 20
    # ramp over [10, 80]: progress at the event step 40 is 30/70
    p = 30 / 70
    expected = {"linear": 0.1 + 0.4 * p, "cubic": 0.5 + (0.1 - 0.5) * (1 - p) ** 3}[shape]
    assert f[40] == pytest.approx(expected) and f[49] == pytest.approx(expected)


def test_cubic_front_loads_and_linear_does_not() -> None:
    base = SparsityConfig(initial=0.0, final=0.8, every=5, warmup_frac=0.0, cooldown_frac=0.0)
    lin = fractions(replace(base, schedule="linear"), units=None)
    cub = fractions(replace(base, schedule="cubic"), units=None)
    assert lin[50] == pytest.approx(0.4) and cub[50] == pytest.approx(0.8 * (1 - 0.5**3))
    assert all(c >= x - 1e-12 for c, x in zip(cub, lin))


def test_none_is_zero_and_auto_is_the_methods_default() -> None:
    assert fractions(SparsityConfig(schedule="none", final=0.5)) == [0.0] * (T + 1)
    auto = SparsityConfig(schedule="auto", final=0.5, every=10, per_event=2)
    assert fractions(auto) == fractions(replace(auto, schedule="constant"))
    cubic = [target_fraction(auto, t, T, default="cubic") for t in range(T + 1)]
    assert cubic == fractions(replace(auto, schedule="cubic"), units=None)
    assert resolve_schedule("auto", "constant") == "constant" and resolve_schedule("linear", "constant") == "linear"


@pytest.mark.parametrize("shape", sorted(SCHEDULE_FNS))
@pytest.mark.parametrize("every, max_steps", [(1, 37), (7, 100), (10, 95)])
def test_every_shape_is_monotone_zero_at_step_zero_never_above_final_and_changes_only_at_events(
        shape: str, every: int, max_steps: int) -> None:
    cfg = SparsityConfig(schedule=shape, initial=0.05, final=0.6, every=every, per_event=3)
    f = fractions(cfg, max_steps=max_steps, units=16)
    assert f[0] == 0.0
    assert all(b >= a for a, b in zip(f, f[1:]))
    assert max(f) <= cfg.final + 1e-12
    for t in range(1, max_steps + 1):
        if not is_event(cfg, t):
            assert f[t] == f[t - 1], t  # between events the previous event's value holds


def test_events_are_multiples_of_every_and_never_step_zero() -> None:
    cfg = SparsityConfig(every=10)
    assert [t for t in range(0, 41) if is_event(cfg, t)] == [10, 20, 30, 40]


# ------------------------------------------------------------------------------------ config group
def compose_root(overrides: list[str]) -> RootConfig:
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


@pytest.mark.parametrize("final, target", [(0.5, 16), (0.75, 8)])
def test_sweep_over_sparsity_final_composes_for_prunedlora(final: float, target: int) -> None:
    """Each value of ``prunedlora-train -m model=tiny method=prunedlora sparsity.final=0.5,0.75``."""
    cfg = compose_root(["model=tiny", "method=prunedlora", f"sparsity.final={final}"])
    validate(cfg)
    assert cfg.sparsity.final == final and cfg.method.init_rank == 32
    assert cfg.method.final_rank(cfg.sparsity.final) == target


@pytest.mark.parametrize("option", ["default", "constant", "geometric", "linear", "cubic"])
def test_every_sparsity_option_validates_with_prunedlora(option: str) -> None:
    cfg = compose_root(["model=tiny", "method=prunedlora", f"sparsity={option}"])
    validate(cfg)
    f = [target_fraction(cfg.sparsity, t, 200, units=32, default="constant") for t in range(201)]
    assert f[0] == 0.0 and f[-1] == pytest.approx(cfg.sparsity.final)
