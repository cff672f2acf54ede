"""LoRAPrune's calibrated events: the ``activation`` criteria and the least-squares re-fit (``method.refit``).

Progressive schedule only; the one-shot cut is ``test_loraprune_one_shot.py``. The tiny GQA model and the training
loop are ``test_loraprune.py``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recipe_helpers import compose_root
from test_loraprune import HEADS, LAYERS, VOCAB, batch, logits, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from prunedlora.adapters.lora import lora_modules
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.base import AttachContext
from prunedlora.methods.loraprune import events
from prunedlora.methods.loraprune.config import REFIT_ANCHORS, LoraPruneConfig
from prunedlora.methods.loraprune.method import LoraPruneMethod
from prunedlora.models.tiny import build_byte_tokenizer
from prunedlora.pruning import refit
from prunedlora.pruning.activation_scores import activation_layer_scores
from prunedlora.pruning.calibration import collect_input_stats
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.refit import kept_columns, refit_columns
from prunedlora.pruning.structured_criteria import effective_weight
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict
from prunedlora.validation import validate

ROWS, SEQ = 4, 16


def examples(count: int = 8, length: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, VOCAB, (length,), generator=gen).tolist()} for _ in range(count)]


def attach(model: nn.Module, every: int = 1, final: float = 0.5, context: bool = True, **overrides) -> LoraPruneMethod:
    # the paper's progressive layout (no re-fit, free head choice) unless a test asks for more
    cfg = LoraPruneConfig(rank=4, alpha=8.0, **{"dropout": 0.0, "calibration_sequences": ROWS, "refit": False,
                                                "gqa_balanced": False, **overrides})
    method = build_method(cfg, SparsityConfig(schedule="cubic", final=final, every=every))
    if context:
        method.prepare(AttachContext(examples(), SEQ))
    method.attach(model)
    gen = torch.Generator().manual_seed(7)
    for m in lora_modules(model).values():  # non-zero B: the adapter is part of what is re-fitted
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)
    return method


def start(model: nn.Module, method: LoraPruneMethod, max_steps: int):
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0), lr=1e-2)  # no weight decay
    (callback,) = method.callbacks()
    callback.on_train_start(model, optimizer, max_steps)
    return callback, optimizer


def step(model: nn.Module, callback, optimizer: torch.optim.Optimizer, t: int, before_update=None) -> dict:
    """One step in the recipe's order; ``before_update`` sees the model with the step's gradients, before the hook."""
    model.train()
    x = batch(t)
    model(input_ids=x, labels=x).loss.backward()
    model.eval()
    if before_update is not None:
        before_update()
    figures = callback.on_before_optimizer_step(t)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return figures


def train(model: nn.Module, method: LoraPruneMethod, steps: int):
    callback, optimizer = start(model, method, steps)
    for t in range(1, steps + 1):
        step(model, callback, optimizer, t)
    return callback


# ------------------------------------------------------------------------------------------ criteria
def test_the_activation_criteria_are_records_with_calibration_needs_and_selectable(data_root: Path) -> None:
    activation, combined = STRUCTURED_CRITERIA["activation"], STRUCTURED_CRITERIA["activation_taylor"]
    assert activation.calibrated and activation.needs == {"input_norms"} and activation.parts == ("activation",)
    assert combined.parts == ("activation", "channel_taylor") and combined.needs == {"input_norms", "output_gradients"}
    assert STRUCTURED_CRITERIA.function("activation") is activation_layer_scores
    for criterion in ("activation", "activation_taylor"):
        cfg = compose_root(["model=tiny", "method=loraprune", f"method.criterion={criterion}", "method.refit=true"],
                           data_root)
        validate(cfg)
        assert set(cfg.method.needs()) == STRUCTURED_CRITERIA[criterion].needs | {"input_gram", "base_rewrite"}


@pytest.mark.parametrize("criterion", ["activation", "activation_taylor"])
def test_an_event_cuts_by_the_calibration_pass_of_the_current_model(criterion: str) -> None:
    """Layer 0 (its inputs are not changed by an earlier cut) keeps its top units by ‖X_j‖·‖W̃[:, j]‖ on the rows,
    or, combined, by the mean of that vector and the normalised Taylor EMA."""
    model = tiny_llama()
    method = attach(model, criterion=criterion)
    callback, optimizer = start(model, method, max_steps=1)  # one step: the cubic schedule is at final at step 1
    layer, expected = model.model.layers[0], {}

    def expect() -> None:
        modules = {name: getattr(layer.self_attn if name == "o_proj" else layer.mlp, name)
                   for name in ("o_proj", "down_proj")}
        stats = collect_input_stats(model, modules, method._event_rows, gram=False)
        expected.update(activation_layer_scores(layer, stats, heads=True, channels=True))
        if criterion == "activation_taylor":  # this step's Taylor sums (peeked at: the hook takes them)
            sums = {key: probe.grad.clone() for key, probe in callback.capture.probes.items()}
            taylor = callback.capture.layer_scores(sums, 0, method.masks[0].shape, method.cfg)
            for kind in expected:  # the EMA of one step from zero is 0.1 x the vector: normalised again
                expected[kind] = (expected[kind] / expected[kind].norm() + taylor[kind] / taylor[kind].norm()) / 2

    step(model, callback, optimizer, 1, before_update=expect)
    mask = method.masks[0]
    assert set(torch.nonzero(mask.head_mask).flatten().tolist()) == set(expected["heads"].topk(HEADS // 2).indices
                                                                         .tolist())
    assert set(torch.nonzero(mask.channel_mask).flatten().tolist()) == set(expected["channels"].topk(12).indices
                                                                            .tolist())


# ---------------------------------------------------------------------------------------------- re-fit
@pytest.mark.parametrize("mode", ["keep", "merge"])
def test_an_event_refits_the_effective_weight_and_keeps_or_restarts_the_adapter(mode: str) -> None:
    """At the event the kept columns of layer 0's o_proj and down_proj hold the closed-form re-fit of W0 + s·BA on the
    calibration Gram of their (masked) inputs. keep: the adapter and its optimizer state are untouched; merge: B and
    the step's gradients of A and B are zero, their first moments cleared, the second moments kept."""
    model = tiny_llama()
    method = attach(model, every=2, criterion="activation", refit=True, refit_lora=mode)
    callback, optimizer = start(model, method, max_steps=2)
    step(model, callback, optimizer, 1)  # no event: Adam now has moments
    layer = model.model.layers[0]
    projections = {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
    before = {}

    def record() -> None:
        stats = collect_input_stats(model, projections, method._event_rows, gram=True)
        for name, module in projections.items():
            before[name] = {"weight": effective_weight(module), "gram": stats[name].gram,
                            "A": module.lora_A.weight.detach().clone(), "B": module.lora_B.weight.detach().clone(),
                            "sq": optimizer.state[module.lora_B.weight]["exp_avg_sq"].clone()}

    figures = step(model, callback, optimizer, 2, before_update=record)
    assert figures["refits"] == 2 * 4 and figures["refits_used"] >= 1 and figures["refit_error_ratio"] <= 1.0
    mask = method.masks[0]
    keeps = {"o_proj": kept_columns(mask.head_mask, 4), "down_proj": kept_columns(mask.channel_mask, 1)}
    for name, module in projections.items():
        seen = before[name]
        expected = refit_columns(seen["weight"], seen["gram"], keeps[name]).weight
        if mode == "merge":  # the adapter restarts: only the base holds the re-fit, and one AdamW step on B = 0 ...
            assert torch.equal(module.lora_B.weight, torch.zeros_like(module.lora_B.weight))  # ... with no gradient
            assert torch.equal(optimizer.state[module.lora_B.weight]["exp_avg"], torch.zeros_like(seen["B"]))
            assert torch.equal(optimizer.state[module.lora_B.weight]["exp_avg_sq"], seen["sq"] * 0.999)
            assert torch.equal(module.lora_A.weight, seen["A"])  # no gradient, no momentum, no decay: unchanged
            torch.testing.assert_close(module.base_layer.weight[:, keeps[name]], expected, atol=1e-5, rtol=1e-5)
        else:  # the update of this step moved A and B: the base is what the re-fit minus the adapter *was*
            old_delta = (seen["B"] @ seen["A"]) * module.scaling
            torch.testing.assert_close(module.base_layer.weight[:, keeps[name]] + old_delta[:, keeps[name]], expected,
                                       atol=1e-5, rtol=1e-5)
            assert not torch.equal(module.lora_B.weight, torch.zeros_like(module.lora_B.weight))


@pytest.mark.parametrize(("mode", "criterion"), [("keep", "activation"), ("merge", "channel_taylor"),
                                                 ("keep", "activation_taylor")])
def test_a_refitted_model_exports_to_its_masked_form(mode: str, criterion: str, tmp_path: Path) -> None:
    model = tiny_llama()
    method = attach(model, every=2, criterion=criterion, refit=True, refit_lora=mode)
    train(model, method, steps=6)
    keep = method.masks[0].channel_mask > 0
    original = tiny_llama().model.layers[0].mlp.down_proj.weight[:, keep]
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.base_layer.weight[:, keep], original)  # re-fitted
    assert method.report(model)["refit"] is True
    x = batch(99, rows=3, length=16)
    masked = logits(model, x)
    method.export(model, build_byte_tokenizer(), tmp_path, "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)


def test_refitted_base_weights_resume_from_the_callback_state() -> None:
    model = tiny_llama()
    method = attach(model, every=2, criterion="channel_taylor", refit=True)
    callback = train(model, method, steps=4)
    adapter, state = adapter_state_dict(model), callback.state_dict()
    assert set(state["refit_weights"]) == {f"{i}.{name}" for i in range(LAYERS - 1) for name in ("o_proj",
                                                                                               "down_proj")}
    fresh = tiny_llama()
    fresh_method = attach(fresh, every=2, criterion="channel_taylor", refit=True)
    load_adapter_state_dict(fresh, adapter)
    (fresh_callback,) = fresh_method.callbacks()
    x = batch(5)
    assert not torch.allclose(logits(fresh, x), logits(model, x), atol=1e-5)  # the masks alone are not the model
    fresh_callback.load_state_dict(state)
    torch.testing.assert_close(logits(fresh, x), logits(model, x), atol=0, rtol=0)


def test_events_whose_counts_do_not_rise_run_no_calibration_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    passes = []
    original = events.calibrate_layer_by_layer
    monkeypatch.setattr(events, "calibrate_layer_by_layer", lambda *a, **k: passes.append(1) or original(*a, **k))
    model = tiny_llama()
    method = attach(model, every=1, criterion="activation", refit=True)
    callback, optimizer = start(model, method, max_steps=12)
    targets = [step(model, callback, optimizer, t)["prune_target"] for t in range(1, 13)]
    counts = {callback.selector.counts(t, method.masks[0]) for t in targets if t > 0}
    assert 1 < len(passes) == len(counts) < len([t for t in targets if t > 0])


# ---------------------------------------------------------------------------------------------- refusals
PROGRESSIVE_FREE = "lora_guided or magnitude or true_gradient or channel_taylor"
"""The criteria a progressive schedule scores without calibration rows (the default, activation, reads them)."""


@pytest.mark.parametrize(("options", "schedule", "named", "fix"), [
    ({"refit": True, "criterion": "channel_taylor"}, "cubic", "method.refit=true with a progressive schedule",
     PROGRESSIVE_FREE),
    ({"criterion": "activation", "refit": False}, "cubic", "method.criterion=activation with a progressive schedule",
     PROGRESSIVE_FREE),
    ({"refit": True, "criterion": "magnitude"}, "one_shot", "method.refit=true with sparsity.schedule=one_shot",
     "magnitude"),
    # One-shot, channel_taylor reads the rows too: its backward pass runs over them (there is no training step yet).
    ({"criterion": "channel_taylor", "refit": False}, "one_shot",
     "method.criterion=channel_taylor with sparsity.schedule=one_shot", "magnitude")])
def test_a_cut_that_calibrates_without_calibration_data_is_refused(options: dict, schedule: str, named: str,
                                                                   fix: str) -> None:
    method = build_method(LoraPruneConfig(**options), SparsityConfig(schedule=schedule))
    with pytest.raises(ConfigError, match=f"{named} calibrate on rows of the training data, but none were given"
                                          f".*method.refit=false with method.criterion={fix}$"):
        method.attach(tiny_llama())  # no prepare(): no training rows


def test_refit_with_a_quantized_base_or_under_deepspeed_is_refused_before_anything_loads(data_root: Path) -> None:
    base = ["model=tiny", "method=loraprune", "method.refit=true", "sparsity=cubic"]
    for extra, named in ((["model.quantization=nf4"], "model.quantization=nf4"),
                         (["distributed=deepspeed_zero3"], "distributed=deepspeed_zero3"),
                         (["distributed=deepspeed_zero2"], "distributed=deepspeed_zero2")):
        with pytest.raises(ConfigError, match=f"method.refit=true with {named}.*sparsity.schedule=one_shot"):
            validate(compose_root([*base, *extra], data_root))
    for extra in (["model.quantization=nf4"], ["distributed=deepspeed_zero3"]):  # cut before training: accepted
        validate(compose_root([*base, *extra, "sparsity.schedule=one_shot"], data_root))


def test_refit_options_are_checked() -> None:
    assert REFIT_ANCHORS == refit.ANCHORS
    sparsity = SparsityConfig()
    text = " ".join(LoraPruneConfig(refit=True, refit_damping=-1, refit_anchor="w", refit_lora="drop",
                                    calibration_sequences=0).validate(sparsity))
    for key in ("method.refit_damping=-1", "method.refit_anchor=w", "method.refit_lora=drop",
                "method.calibration_sequences=0"):
        assert key in text, key
    # the default re-fit stays valid where nothing is pruned (it has no cut to act on)
    assert LoraPruneConfig(refit=True).validate(SparsityConfig(schedule="none", final=0.0)) == []
