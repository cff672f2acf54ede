"""One contract for every registered method, through the real recipe on the tiny model.

A method gets every check below by being registered (``prunedlora.methods.registry``: its folder's ``config.py``);
its own test file keeps only its own math. For each method, with its registration's ``smoke_overrides`` so that
pruning events fall inside the run where the method prunes:

- step 0: the output equals the base model's (a method registered with ``starts_at_base=False``, SALR: the
  documented start, which a ``max_steps=0`` run exports);
- only the parameters the method hands the optimizer receive gradients, and those are exactly the trainable ones;
- (the exported folders, reloaded as a user would, give the trained model's logits: ``test_deploy.py``);
- 3 steps + crash + resume + 3 steps equals 6 uninterrupted steps, and the final checkpoints of both runs hold the
  same adapter state (masks included) and the same callback state.

A throwaway method registered inside a test (LoRA-FA: LoRA with A frozen at its initialisation, a config dataclass, a
``Method`` subclass and one ``register`` call, as a new method folder would hold) runs the same battery: adding a
method takes one folder (and one YAML, here a ConfigStore node), and no test edit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from recipe_helpers import (
    METHOD_OVERRIDES,
    TINY_OVERRIDES,
    compose_root,
    crash_then_resume,
    load_served,
    metric_records,
    throwaway_method,
)
from torch import nn

from prunedlora.config import MethodConfig, RootConfig
from prunedlora.methods import METHODS, Method, method_spec
from prunedlora.methods.base import Callback
from prunedlora.methods.lora.method import attach_lora, export_lora, rank_report
from prunedlora.train import checkpoint as ckpt
from prunedlora.train import recipe

STEPS, SAVE_EVERY, GRAD_ACCUM = 6, 3, 2
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_registered_method_is_covered_and_has_its_yaml_option() -> None:
    """The battery's list is the registry's, and the registry is exactly the method folders with a YAML option."""
    assert set(METHOD_OVERRIDES) == set(METHODS)
    assert set(METHODS) == {path.stem for path in (CONFIGS / "method").glob("*.yaml")}
    for name in METHODS:
        assert method_spec(name).schema().name == name


@dataclass
class Observed:
    """What the instrumented method saw inside the recipe."""

    tokens: torch.Tensor
    base: torch.Tensor | None = None
    start: torch.Tensor | None = None
    trainable: set[str] = field(default_factory=set)
    optimized: set[str] = field(default_factory=set)
    with_grad: set[str] = field(default_factory=set)


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(tokens).logits.float()
    model.train(was_training)
    return out


class GradientProbe(Callback):
    """Records which parameters hold a gradient when the first step's gradients are complete."""

    def __init__(self, seen: Observed) -> None:
        self.seen = seen

    def on_train_start(self, model, optimizer, max_steps) -> None:
        self.model = model
        names = {id(p): n for n, p in model.named_parameters()}
        self.seen.optimized = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}

    def on_before_optimizer_step(self, step: int) -> dict:
        if step == 1:
            self.seen.with_grad = {n for n, p in self.model.named_parameters() if p.grad is not None}
        return {}


def _instrument(monkeypatch: pytest.MonkeyPatch, seen: Observed) -> None:
    """Wrap the recipe's method: logits before and after ``attach``, and a gradient probe."""
    build = recipe.build_method

    def instrumented(*args, **kwargs):
        method = build(*args, **kwargs)
        attach, callbacks = method.attach, method.callbacks

        def attach_and_look(model):
            seen.base = _logits(model, seen.tokens)
            adapted = attach(model)
            seen.start = _logits(model, seen.tokens)
            seen.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            return adapted

        method.attach = attach_and_look
        method.callbacks = lambda: [*callbacks(), GradientProbe(seen)]
        return method

    monkeypatch.setattr(recipe, "build_method", instrumented)


def _config(name: str, data_root: Path, *extra: str) -> RootConfig:
    return compose_root([*TINY_OVERRIDES, f"method={name}", *method_spec(name).smoke_overrides,
                         f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}", f"train.grad_accum={GRAD_ACCUM}",
                         *extra], data_root)


def _assert_same_state(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), where
    else:
        assert a == b, where


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.slow  # three tiny recipe runs per method (data, export): seconds each
@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_method_contract(name: str, data_root: Path, tmp_path: Path, tokens: torch.Tensor,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    check_contract(name, data_root, tmp_path, tokens, monkeypatch)


def check_contract(name: str, data_root: Path, tmp_path: Path, tokens: torch.Tensor,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The battery (module docstring) for the registered method ``name``."""
    starts_at_base = method_spec(name).starts_at_base
    cfg = _config(name, data_root)
    seen = Observed(tokens)
    _instrument(monkeypatch, seen)
    full = recipe.run(cfg, tmp_path / "full")

    # Step 0: the base model's output (or the method's documented start).
    if starts_at_base:
        torch.testing.assert_close(seen.start, seen.base, atol=1e-5, rtol=0)
    # Only what the optimizer updates gets gradients, and that is exactly what is trainable.
    assert seen.optimized == seen.trainable and seen.trainable
    assert seen.with_grad <= seen.optimized, sorted(seen.with_grad - seen.optimized)[:5]

    # 3 steps + crash + resume + 3 steps == 6 steps: losses, adapter state (masks) and callback state.
    resumed = crash_then_resume(cfg, tmp_path / "resumed", SAVE_EVERY * GRAD_ACCUM + 1, monkeypatch)
    losses = [[r["loss"] for r in metric_records(tmp_path / d)] for d in ("resumed", "full")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / d / "checkpoints")) for d in ("resumed", "full")]
    for key in (ckpt.STEP_KEY, ckpt.ADAPTER_KEY, ckpt.CALLBACKS_KEY):
        _assert_same_state(final[0][key], final[1][key], key)

    if not starts_at_base:  # the documented start is what a run without training deploys
        start = seen.start
        recipe.run(_config(name, data_root, "train.max_steps=0"), tmp_path / "untrained")
        torch.testing.assert_close(_logits(load_served(tmp_path / "untrained"), tokens), start, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- a method added in a test
@dataclass
class LoraFaConfig(MethodConfig):
    """LoRA-FA (Zhang et al. 2023, arXiv 2308.03303): LoRA whose A stays at its random initialisation."""

    name: str = "lora_fa"


class LoraFaMethod(Method):
    """Only B trains; everything else is plain LoRA's."""

    cfg: LoraFaConfig

    def attach(self, model: nn.Module) -> list[str]:
        names = attach_lora(model, self.cfg, self.cfg.rank)
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
        return names

    def report(self, model: nn.Module) -> dict[str, Any]:
        return rank_report(model)

    def export(self, model: nn.Module, tokenizer: Any, out_dir: Path, base_model_id: str,
               formats: Sequence[str] | None = None) -> dict[str, Any]:
        return export_lora(model, tokenizer, out_dir, base_model_id, formats)


@pytest.fixture
def lora_fa() -> Iterator[str]:
    """LoRA-FA registered as a method folder's ``config.py`` would, and as a ``method`` option without a YAML."""
    with throwaway_method("lora_fa", LoraFaConfig, LoraFaMethod) as name:
        yield name


@pytest.mark.slow  # the battery: three tiny recipe runs
def test_a_method_registered_in_a_test_runs_the_recipe_and_the_battery(lora_fa: str, data_root: Path,
                                                                        tmp_path: Path, tokens: torch.Tensor,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert lora_fa in METHODS and METHODS[lora_fa] is LoraFaMethod
    check_contract(lora_fa, data_root, tmp_path, tokens, monkeypatch)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["method"] == lora_fa and (tmp_path / "full" / "adapter" / "adapter_config.json").is_file()
    adapter = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "full" / "checkpoints"))[ckpt.ADAPTER_KEY]
    assert any(".lora_B." in key for key in adapter)  # B trained; A, frozen at its init, is not in the state
    assert not any(".lora_A." in key for key in adapter)
