"""Sparsity schedules: the target fraction pruned at optimizer step t (the ``sparsity`` config group).

Every schedule is a pure function of the step, so a resumed run needs no schedule state, and every
method reads the same numbers. The value is **piecewise constant and changes only at pruning events**,
the steps ``t = k * every`` with ``k >= 1``:

- before the first event (``t < every``, in particular at step 0) the target is 0: nothing is ever
  pruned at step 0 (docs/methods.md, Decisions item 1: at B = 0 a step-0 ranking is noise);
- at an event step the schedule's shape is evaluated at that step;
- between events the previous event's value holds: ``target_fraction(t) = shape(every * (t // every))``.

Shapes (``T = max_steps``):

- ``constant`` (the paper's PrunedLoRA schedule, docs/methods.md §3.3): ``per_event`` units (K2 rank components per
  module) every ``every`` (K1) steps, ``min(final, (t // every) * per_event / units)`` with ``units`` = r0.
  A ``per_event`` in (0, 1) is a fraction p of the *remaining* rank instead (geometric decay):
  ``min(final, 1 - (1 - p)^(t // every))``.
- ``geometric`` (PrunedLoRA's default, docs/methods.md Decisions item 0): the same fraction of the remaining rank
  every event, chosen so that ``final`` is reached at the last event at or before ``end_frac * T``
  (``n = max(1, floor(end_frac T / every))`` events, ``1 - (1 - final)^(k / n)`` after the k-th). The
  relative cut is equal at every event, and the last part of training runs at the final rank, so the
  model has time to recover; the constant schedule's last events are its largest relative cuts, under a
  learning rate already decayed (32 -> 28 is 12.5% of the rank, 12 -> 8 is 33%).
- ``linear`` / ``cubic`` (AdaLoRA §2, LoRAPrune §5): ``initial`` while ``s <= warmup_frac * T``,
  ``final`` once ``s >= T - cooldown_frac * T``, in between ``initial + (final - initial) * p`` (linear)
  or ``final + (initial - final) * (1 - p)^3`` (cubic) with ``p`` the progress through the ramp. The
  final value is reached at the first event at or after ``T - cooldown_frac * T``; when no event falls
  in the cool-down (``cooldown_frac * T < every``) the last event may stop short of it.
- ``none``: 0 at every step.
- ``auto``: the calling method's default (``default=``; PrunedLoRA passes ``geometric``).
- ``one_shot`` (``ONE_SHOT``) is no function of the step: the method cuts to ``final`` once, before the first step
  (LoRAPrune, SALR), and the methods that prune while training refuse it (``resolve_schedule`` too).

All shapes are monotone non-decreasing in t and never exceed ``final`` (given ``initial <= final``,
which the config validation enforces).
"""

from __future__ import annotations

from collections.abc import Callable

from prunedlora.config import SparsityConfig

ScheduleFn = Callable[[SparsityConfig, float, int, int, int | None], float]
"""``(cfg, final, event_step, max_steps, units) -> fraction``; ``final`` is what the schedule ramps to."""


def _ramp(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, shape: Callable[[float], float]
          ) -> float:
    """``initial`` -> ``final`` between warm-up and cool-down, following ``shape`` (0 -> 0, 1 -> 1)."""
    initial = min(cfg.initial, final)
    start = cfg.warmup_frac * max_steps
    end = max_steps - cfg.cooldown_frac * max_steps
    if end <= start:  # degenerate ramp (rejected by validation): jump straight to final
        return final if event_step > start else initial
    progress = min(1.0, max(0.0, (event_step - start) / (end - start)))
    return min(final, initial + (final - initial) * shape(progress))


def _constant(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, units: int | None) -> float:
    events = event_step // cfg.every
    if 0 < cfg.per_event < 1:  # a fraction of the remaining rank per event
        return min(final, 1.0 - (1.0 - cfg.per_event) ** events)
    if units is None or units <= 0:
        raise ValueError("the constant schedule counts components per module: pass units= (e.g. r0)")
    return min(final, events * cfg.per_event / units)


def geometric_events(cfg: SparsityConfig, max_steps: int) -> int:
    """How many events the geometric schedule spreads ``final`` over: those at or before ``end_frac * T``."""
    return max(1, int(cfg.end_frac * max_steps + 1e-9) // cfg.every)


def _geometric(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, units: int | None) -> float:
    n, k = geometric_events(cfg, max_steps), event_step // cfg.every
    return final if k >= n else min(final, 1.0 - (1.0 - final) ** (k / n))


def _linear(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, units: int | None) -> float:
    return _ramp(cfg, final, event_step, max_steps, lambda p: p)


def _cubic(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, units: int | None) -> float:
    # final + (initial - final)(1 - p)^3  ==  initial + (final - initial)(1 - (1 - p)^3)
    return _ramp(cfg, final, event_step, max_steps, lambda p: 1.0 - (1.0 - p) ** 3)


def _none(cfg: SparsityConfig, final: float, event_step: int, max_steps: int, units: int | None) -> float:
    return 0.0


SCHEDULE_FNS: dict[str, ScheduleFn] = {
    "none": _none,
    "constant": _constant,
    "geometric": _geometric,
    "linear": _linear,
    "cubic": _cubic,
}
"""The shapes by name; with ``auto`` they are ``prunedlora.validation.SCHEDULES`` (a test keeps the two in step)."""


ONE_SHOT = "one_shot"
"""``sparsity.schedule`` of a cut to ``final`` before the first step (no per-step target)."""


def resolve_schedule(name: str, default: str) -> str:
    """The schedule that runs: ``name``, or ``default`` when ``name`` is ``auto``."""
    if name == ONE_SHOT:
        raise ValueError("sparsity.schedule=one_shot cuts once before the first step and has no per-step target; "
                         "the methods that prune while training need another schedule (auto, cubic, geometric...)")
    resolved = default if name == "auto" else name
    if resolved not in SCHEDULE_FNS:
        raise ValueError(f"sparsity.schedule={name} resolves to {resolved}, not one of {', '.join(SCHEDULE_FNS)}")
    return resolved


def is_event(cfg: SparsityConfig, step: int) -> bool:
    """Whether optimizer step ``step`` is a pruning event (``step = k * every``, ``k >= 1``)."""
    return step > 0 and step % cfg.every == 0


def target_fraction(cfg: SparsityConfig, step: int, max_steps: int, *, units: int | None = None,
                    default: str, final: float | None = None) -> float:
    """Target fraction pruned at optimizer step ``step`` (1-based; 0 means before any update).

    Args:
        cfg: the ``sparsity`` group.
        step: optimizer step; the value holds from one event (``k * every``) to the next.
        max_steps: total optimizer steps (``train.max_steps``); sets the linear/cubic ramp.
        units: what one ``per_event`` count is a fraction of (``constant`` only; r0 for PrunedLoRA).
        default: the schedule ``auto`` stands for (the method's own default).
        final: the fraction the schedule reaches, when a method derives its own (PrunedLoRA: ``1 - target / r0``,
            which ``method.rank`` may set); None: ``cfg.final``. ``cfg`` itself is never changed.

    Returns:
        A fraction in ``[0, final]``, non-decreasing in ``step``, 0 before the first event.
    """
    event_step = cfg.every * (step // cfg.every)
    if event_step <= 0:
        return 0.0
    final = cfg.final if final is None else final
    return SCHEDULE_FNS[resolve_schedule(cfg.schedule, default)](cfg, final, event_step, max_steps, units)
