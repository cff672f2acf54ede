"""A diverging run stops cleanly: the last good checkpoint survives, nothing is exported, and a re-run resumes."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY_OVERRIDES, compose_root, metric_records

from prunedlora.config import RootConfig, TrainConfig
from prunedlora.methods.base import Callback
from prunedlora.train import checkpoint as ckpt
from prunedlora.train import recipe
from prunedlora.train.engine import TorchEngine
from prunedlora.train.loop import guarded_optimizer_step
from prunedlora.train.nonfinite import NonFiniteGuard, TrainingDiverged
from prunedlora.train.optim import build_scheduler


class Poison(Callback):
    """Writes a NaN into the first trainable weight (after the update) or gradient (before it) at ``step``."""

    def __init__(self, step: int | None, where: str = "weight") -> None:
        self.step, self.where = step, where

    def on_train_start(self, model, optimizer, max_steps) -> None:
        self.param = next(p for p in model.parameters() if p.requires_grad)

    def on_before_optimizer_step(self, step: int) -> dict:
        if step == self.step and self.where == "grad":
            self.param.grad.view(-1)[0] = float("nan")
        return {}

    def on_step_end(self, step: int) -> dict:
        if step == self.step and self.where == "weight":
            with torch.no_grad():
                self.param.view(-1)[0] = float("nan")
        return {}


def _poisoned(monkeypatch: pytest.MonkeyPatch, poison: Poison) -> None:
    """The recipe's method hands the loop one more callback: ``poison``."""
    build = recipe.build_method

    def build_with_poison(*args, **kwargs):
        method = build(*args, **kwargs)
        own = method.callbacks
        method.callbacks = lambda: [*own(), poison]
        return method

    monkeypatch.setattr(recipe, "build_method", build_with_poison)


@pytest.fixture
def cfg(data_root: Path) -> RootConfig:
    tiny = compose_root(TINY_OVERRIDES, data_root)
    return replace(tiny, train=replace(tiny.train, max_steps=6, save_every=2, keep_checkpoints=1))


def _checkpoint_steps(run_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]


def test_a_nan_loss_stops_the_run_and_a_fixed_rerun_resumes_from_the_last_good_checkpoint(
        cfg: RootConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = recipe.run(cfg, tmp_path / "full")
    poison = Poison(step=3)  # weights NaN after step 3: step 4's loss is NaN
    _poisoned(monkeypatch, poison)
    with pytest.raises(TrainingDiverged, match=r"step 4: loss nan") as err:
        recipe.run(cfg, tmp_path / "run")
    assert "step_0000002" in str(err.value) and "nothing was exported" in str(err.value)
    assert _checkpoint_steps(tmp_path / "run") == ["step_0000002"]
    assert not any((tmp_path / "run" / name).exists() for name in ("model", "adapter", "summary.json"))
    assert [r["step"] for r in metric_records(tmp_path / "run")] == [1, 2, 3]

    poison.step = None  # the cause is fixed; the same command resumes from step 2
    resumed = recipe.run(cfg, tmp_path / "run")
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    assert (tmp_path / "run" / "model").is_dir()


def test_a_poisoned_state_is_never_checkpointed_over_the_last_good_one(
        cfg: RootConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Poisoned right before the save at step 4 (keep_checkpoints=1): writing it would rotate step 2 away."""
    _poisoned(monkeypatch, Poison(step=4))
    with pytest.raises(TrainingDiverged, match=r"step 4: .* not finite .*not saved") as err:
        recipe.run(cfg, tmp_path)
    assert "step_0000002" in str(err.value)
    assert _checkpoint_steps(tmp_path) == ["step_0000002"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(t).all() for t in state[ckpt.ADAPTER_KEY].values() if t.is_floating_point())


def test_skip_nonfinite_steps_past_a_bad_step_after_a_resume(cfg: RootConfig, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _poisoned(monkeypatch, Poison(step=3, where="grad"))  # a gradient that overflows at step 3, every time
    with pytest.raises(TrainingDiverged, match=r"step 3: gradient norm nan"):
        recipe.run(cfg, tmp_path)
    # train.skip_nonfinite may change between starts: the re-run resumes from step 2 and skips step 3.
    summary = recipe.run(replace(cfg, train=replace(cfg.train, skip_nonfinite=1)), tmp_path)
    records = metric_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.get("nonfinite_skipped") for r in records] == [None, None, 1, None, None, None]
    assert math.isfinite(summary["final_loss"])
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(t).all() for t in state[ckpt.ADAPTER_KEY].values() if t.is_floating_point())


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_skipped_step_leaves_weights_and_optimizer_untouched_and_the_allowance_is_bounded(bad: str) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    cfg = TrainConfig(max_steps=10, lr=0.1, warmup_ratio=0.0)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    engine = TorchEngine(layer, optimizer, scheduler, grad_accum=1, max_grad_norm=1.0,
                         device=torch.device("cpu"), bf16=False)
    guard = NonFiniteGuard(allowed=1)

    def bad_step(step: int) -> dict:
        loss = layer(torch.randn(2, 4)).pow(2).mean()
        loss.backward()
        if bad == "grad":
            layer.weight.grad[0, 0] = float("inf")
        return guarded_optimizer_step(engine, [], step, float("nan") if bad == "loss" else loss.item(), guard)

    before = [p.detach().clone() for p in layer.parameters()]
    assert bad_step(1) == {"nonfinite_skipped": 1, **({"grad_norm": math.inf} if bad == "grad" else {})}
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    assert not optimizer.state and all(p.grad is None for p in layer.parameters())
    assert scheduler.last_epoch == 1  # the schedule follows the step count
    with pytest.raises(TrainingDiverged, match="step 2"):
        bad_step(2)
