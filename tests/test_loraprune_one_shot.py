"""One-shot LoRAPrune (``sparsity.schedule=one_shot``): the cut before the first step, its persisted base, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, kill_9_after_steps, run_cli
from test_loraprune import HEAD_DIM, HEADS, LAYERS, batch, logits, tiny_llama
from test_loraprune_calibrated import ROWS, SEQ, examples
from torch import nn

from prunedlora.adapters.lora import LoRALinear
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.base import AttachContext
from prunedlora.methods.loraprune import one_shot
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.method import LoraPruneMethod
from prunedlora.pruning.structure import attach_structure_masks
from prunedlora.pruning.structured_criteria import TaylorCapture


def cut(model: nn.Module, run_dir: Path | None = None, final: float = 0.5, **overrides) -> LoraPruneMethod:
    cfg = LoraPruneConfig(rank=4, alpha=8.0, **{"dropout": 0.0, "calibration_sequences": ROWS,
                                                "criterion": "activation", "refit": True, **overrides})
    method = build_method(cfg, SparsityConfig(schedule="one_shot", final=final))
    method.prepare(AttachContext(examples(), SEQ, run_dir=run_dir))
    method.attach(model)
    return method


def test_per_layer_cuts_the_prunable_layers_before_training_and_lora_trains_the_smaller_model() -> None:
    model = tiny_llama()
    method = cut(model)
    layers = model.model.layers
    for i in range(LAYERS - 1):  # layers 0-3 prunable, the last exempt (method.exempt_last)
        attn, mlp = layers[i].self_attn, layers[i].mlp
        assert isinstance(attn.o_proj, LoRALinear) and attn.o_proj.base_layer.in_features == HEADS // 2 * HEAD_DIM
        assert attn.o_proj.lora_A.in_features == HEADS // 2 * HEAD_DIM and mlp.down_proj.in_features == 12
        assert mlp.gate_proj.base_layer.out_features == mlp.gate_proj.lora_B.out_features == 12
    assert layers[-1].mlp.down_proj.in_features == 24 and layers[-1].self_attn.q_proj.out_features == HEADS * HEAD_DIM
    assert method.callbacks() == [] and method.masks == {}
    report = method.report(model)
    assert report["sparsity"] == pytest.approx(0.5) and report["prunable_layers"] == [0, 1, 2, 3]
    assert report["one_shot"]["refits"] == 8 and report["one_shot"]["refit_error_ratio"] < 1
    x = batch(1)
    model.train()
    model(input_ids=x, labels=x).loss.backward()  # trains: gradients reach the adapters of the compacted layers
    assert layers[0].mlp.down_proj.lora_A.weight.grad.shape == (4, 12)


@pytest.mark.parametrize("criterion", ["activation", "activation_taylor", "channel_taylor", "magnitude"])
def test_the_compacted_cut_equals_the_dense_model_masked_with_the_refitted_columns(criterion: str) -> None:
    """Physical compaction changes nothing: the dense model, masked by the cut's plans and holding the re-fitted
    weights in the kept columns, gives the one-shot model's logits. And the re-fit moved those weights."""
    model = tiny_llama()
    method = cut(model, criterion=criterion)
    reference = tiny_llama()
    masks = attach_structure_masks(reference, sorted(method.cut.plans))
    for i, plan in method.cut.plans.items():
        masks[i].head_mask.zero_()[plan.kept_heads] = 1
        masks[i].channel_mask.zero_()[plan.kept_channels] = 1
        cols = {"o_proj": torch.tensor([h * HEAD_DIM + d for h in plan.kept_heads for d in range(HEAD_DIM)]),
                "down_proj": torch.tensor(plan.kept_channels)}
        for name, owner in (("o_proj", "self_attn"), ("down_proj", "mlp")):
            dense = getattr(getattr(reference.model.layers[i], owner), name).weight
            refitted = getattr(getattr(model.model.layers[i], owner), name).base_layer.weight
            assert not torch.allclose(dense[:, cols[name]], refitted)
            with torch.no_grad():
                dense[:, cols[name]] = refitted
    x = batch(4, rows=3, length=16)
    torch.testing.assert_close(logits(model, x), logits(reference, x), atol=1e-5, rtol=0)


def test_taylor_scores_come_from_a_backward_over_the_rows_without_weight_gradients() -> None:
    model = tiny_llama()
    rows = torch.randint(3, 200, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    layers = {i: model.model.layers[i] for i in range(2)}
    sums = one_shot.taylor_sums(model, rows, layers, batch_size=2)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # restored, and never computed
    capture = TaylorCapture(layers)  # the same sums from plain backward passes
    for half in rows.split(2):
        model(input_ids=half, labels=half).loss.backward()
    expected = capture.take()
    assert set(sums) == set(expected)
    for key in sums:
        torch.testing.assert_close(sums[key], expected[key], rtol=1e-5, atol=1e-7)


def test_uniform_cuts_every_layer_alike() -> None:
    model = tiny_llama()
    method = cut(model, structure="uniform")
    shapes = {(layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
               layer.mlp.down_proj.in_features) for layer in model.model.layers}
    kept = method.plan.kept
    assert shapes == {(kept.heads * HEAD_DIM, kept.kv_heads * HEAD_DIM, kept.channels)}
    assert sorted(method.cut.plans) == list(range(LAYERS))


def test_lora_guided_cannot_score_before_the_first_step() -> None:
    for criterion in ("lora_guided", "true_gradient"):
        (problem,) = LoraPruneConfig(criterion=criterion).validate(SparsityConfig(schedule="one_shot"))
        assert f"method.criterion={criterion} with sparsity.schedule=one_shot" in problem
        assert "activation or activation_taylor" in problem or "channel_taylor" in problem


# --------------------------------------------------------------------------------------- the persisted base
def test_the_pruned_base_is_saved_once_and_rebuilt_without_calibrating(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_llama()
    first_method = cut(first, tmp_path)
    saved = tmp_path / "checkpoints" / one_shot.PRUNED_BASE
    assert sorted(p.name for p in saved.iterdir()) == [one_shot.PLANS_FILE, one_shot.REFIT_FILE]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))

    def no_calibration(*args, **kwargs):
        raise AssertionError("a saved cut must be loaded, not computed again")

    monkeypatch.setattr(one_shot, "calibrate_layer_by_layer", no_calibration)
    monkeypatch.setattr("prunedlora.methods.loraprune.method.one_shot_cut", no_calibration)
    second = tiny_llama()
    method = cut(second, tmp_path)
    assert method.cut.plans == first_method.cut.plans and method.cut.refitted == first_method.cut.refitted
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    with pytest.raises(ConfigError, match="one-shot cut of another configuration"):
        cut(tiny_llama(), tmp_path, final=0.25)


# ------------------------------------------------------------------------------------------------ resume
ARGS = [*TINY, "method=loraprune", "sparsity.schedule=one_shot", "method.criterion=activation_taylor",
        "method.refit=true", "method.calibration_sequences=2", "model.tiny.hidden_size=128",
        "model.tiny.intermediate_size=512", "model.tiny.num_hidden_layers=3", "train.max_steps=12",
        "train.save_every=2", "train.keep_checkpoints=1", "eval.enabled=false", "method.dropout=0.1"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_one_shot_run_killed_with_sigkill_resumes_bit_exactly(tmp_path: Path, data_root: Path) -> None:
    """kill -9 mid-training, then the same command: the same losses, bit for bit (dropout on: the RNG resumes too),
    from the saved pruned base (no second calibration), which checkpoint rotation never removes."""
    straight = run_cli(["prunedlora-train", *ARGS, f"hydra.run.dir={tmp_path / 'straight'}"], data_root)
    assert straight.returncode == 0, straight.stderr[-3000:]
    victim = tmp_path / "victim"
    kill_9_after_steps(ARGS, victim, data_root, steps=5)
    assert not (victim / "summary.json").exists()
    assert (victim / "checkpoints" / one_shot.PRUNED_BASE / one_shot.PLANS_FILE).is_file()
    resumed = run_cli(["prunedlora-train", *ARGS, f"hydra.run.dir={victim}"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "pruned base loaded" in log and "resuming from" in log and "calibration:" not in log
    assert _losses(victim) == _losses(tmp_path / "straight")  # exactly
    summaries = [json.loads((d / "summary.json").read_text()) for d in (tmp_path / "straight", victim)]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
    assert summaries[0]["params_after_export"] == summaries[1]["params_after_export"] < summaries[0]["params_total"]
    assert (victim / "checkpoints" / one_shot.PRUNED_BASE).is_dir()  # never rotated (keep_checkpoints=1)
