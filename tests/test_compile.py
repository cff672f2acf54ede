"""``train.compile``: every method trains the same under torch.compile, through its pruning events and a resume.

The tests compile with the ``aot_eager`` backend: it captures the same graphs as ``inductor`` (the dynamo
tracing, guards and recompilations that masks, hooks and pruning events stress) without generating C++ kernels,
which take minutes per graph on 2 cores. ``scripts/bench_throughput.py`` measures ``inductor`` itself.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from recipe_helpers import METHOD_OVERRIDES, TINY_OVERRIDES, compose_root, crash_then_resume, metric_records
from torch._dynamo.utils import counters

from prunedlora.config import ConfigError
from prunedlora.train.recipe import run
from prunedlora.validation import validate

COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
STEPS = ["train.max_steps=6", "train.save_every=3", "train.bf16=true", "train.packing=true"]
"""Packed rows: every micro-batch has one shape, so a run compiles exactly one graph unless something recompiles
(pruning events, mask resampling, hooks); with padded rows a second, shape-dynamic graph follows the first."""


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metric_records(run_dir)]


def _fresh_dynamo() -> None:
    """Forget earlier compilations and their counts (``torch._dynamo.reset`` keeps the counters)."""
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.slow  # one eager and one compiled tiny run per method
@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_a_compiled_run_trains_like_an_eager_run(name: str, data_root: Path, tmp_path: Path) -> None:
    overrides = [*TINY_OVERRIDES, f"method={name}", *METHOD_OVERRIDES[name], *STEPS]
    eager = run(compose_root(overrides, data_root), tmp_path / "eager")
    _fresh_dynamo()
    compiled = run(compose_root([*overrides, *COMPILED], data_root), tmp_path / "compiled")
    assert _graphs() == 1  # pruning events, masks and hooks recompile nothing
    # bf16 autocast: the compiled graph may fuse and reorder the same operations
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=2e-2, abs=2e-2)
    assert compiled.get("ranks") == eager.get("ranks")
    assert compiled["params_after_export"] == eager["params_after_export"]


@pytest.mark.slow
def test_compiled_runs_resume_and_survive_gradient_checkpointing(data_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_root([*TINY_OVERRIDES, "method=prunedlora", *METHOD_OVERRIDES["prunedlora"], *STEPS, *COMPILED,
                        "train.gradient_checkpointing=true", "train.grad_accum=2"], data_root)
    _fresh_dynamo()
    full = run(cfg, tmp_path / "full")
    # Checkpointed layers replay their forward: side effects there (statistics hooks) break the graph at a fixed
    # number of places, and the first steps specialise the checkpoint wrapper; nothing grows with the steps.
    assert _graphs() <= 6
    resumed = crash_then_resume(cfg, tmp_path / "resumed", 3 * 2 + 1, monkeypatch)
    assert _losses(tmp_path / "resumed") == pytest.approx(_losses(tmp_path / "full"), abs=1e-5)
    assert resumed["ranks"] == full["ranks"]


@pytest.mark.slow
def test_a_distilling_run_keeps_one_compiled_graph(data_root: Path, tmp_path: Path) -> None:
    """recovery=mix: the teacher forward runs eagerly beside the compiled training call, with LoRAPrune's adapters
    swapped out and masks opened and both put back before the student runs: nothing recompiles."""
    overrides = [*TINY_OVERRIDES, "method=loraprune", *METHOD_OVERRIDES["loraprune"], *STEPS, "recovery=mix"]
    run(compose_root(overrides, data_root), tmp_path / "eager")
    _fresh_dynamo()
    run(compose_root([*overrides, *COMPILED], data_root), tmp_path / "compiled")
    assert _graphs() == 1
    for key in ("loss", "loss_ce", "loss_kl"):
        compiled, eager = ([r[key] for r in metric_records(tmp_path / d)] for d in ("compiled", "eager"))
        assert compiled == pytest.approx(eager, rel=2e-2, abs=2e-2), key
    assert metric_records(tmp_path / "compiled")[-1]["loss_kl"] > 0


@pytest.mark.parametrize("override, fragment", [
    ("distributed=deepspeed_zero3", "distributed=deepspeed_zero3"),
    ("model.quantization=nf4", "model.quantization=nf4"),
    ("train.compile_backend=tvm", "train.compile_backend=tvm"),
])
def test_combinations_that_cannot_compile_are_refused_up_front(override: str, fragment: str) -> None:
    cfg = compose_root(["model=tiny", "train.compile=true", override])
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


def test_compile_is_off_by_default_and_leaves_the_module_uncompiled() -> None:
    from prunedlora.train.engine import TorchEngine

    cfg = compose_root(["model=tiny"])
    assert cfg.train.compile is False
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = TorchEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                         grad_accum=1, max_grad_norm=None, device=torch.device("cpu"), bf16=False)
    assert engine.forward is model
    compiled = TorchEngine(model, optimizer, engine.scheduler, grad_accum=1, max_grad_norm=None,
                           device=torch.device("cpu"), bf16=False, compile_backend="aot_eager")
    assert compiled.forward is not model and compiled.model is model
    assert replace(cfg.train, compile=True).compile_backend == "inductor"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHOD_OVERRIDES))
def test_inductor_on_cuda_trains_like_eager(name: str, data_root: Path, tmp_path: Path) -> None:
    """The real backend on the real device (``scripts/gpu_check.sh`` runs the ``gpu`` marker)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: run scripts/gpu_check.sh on a GPU machine")
    overrides = [*TINY_OVERRIDES, f"method={name}", *METHOD_OVERRIDES[name], *STEPS, "train.device=cuda"]
    run(compose_root(overrides, data_root), tmp_path / "eager")
    _fresh_dynamo()
    run(compose_root([*overrides, "train.compile=true"], data_root), tmp_path / "compiled")
    assert _graphs() == 1
    assert _losses(tmp_path / "compiled") == pytest.approx(_losses(tmp_path / "eager"), rel=2e-2, abs=2e-2)
