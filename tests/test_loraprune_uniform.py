"""LoRAPrune ``method.structure=uniform``: the parameter budget, the shared counts, and the plain-checkpoint export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import METHOD_OVERRIDES, TINY_OVERRIDES, compose_root, crash_then_resume, metric_records
from safetensors.torch import load_file
from test_compile import COMPILED
from test_compile import STEPS as COMPILE_STEPS
from test_loraprune import HEADS, KV_HEADS, LAYERS, attach, batch, logits, tiny_llama, train
from test_method_contract import _assert_same_state as assert_same_state
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunedlora.config import SparsityConfig, TinyModelConfig
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.method import LoraPruneMethod
from prunedlora.methods.loraprune.uniform import (
    MATCH_TOLERANCE,
    LayerCounts,
    ModelShape,
    model_parameters,
    reference_layers,
    uniform_plan,
)
from prunedlora.models.tiny import build_byte_tokenizer
from prunedlora.train import checkpoint as ckpt
from prunedlora.train.recipe import run

SMOLLM2 = ModelShape(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                     vocab_size=49152, tie_word_embeddings=True)
"""SmolLM2-135M-Instruct's shape (its config.json); 134,515,008 parameters."""
SMOLLM2_PLANS = {0.25: LayerCounts(9, 3, 1277), 0.5: LayerCounts(6, 3, 924), 0.75: LayerCounts(3, 3, 572)}
"""The uniform layouts under ``gqa_balanced=false`` (the free head choice), worked by hand: at 50% per_layer exports
96,176,448 parameters (26 layers of 5 query heads, k/v expanded to 5 KV heads, 768 channels; 4 layers whole); a third
of the heads (one per KV group) and 924 channels give 96,153,408."""
SMOLLM2_PER_LAYER_EXPORTS = {(0.25, "query_head", False): 121_096_512, (0.5, "query_head", False): 96_176_448,
                             (0.5, "query_head", True): 94_259_520, (0.5, "kv_group", False): 92_342_592}
"""The analytic per_layer counts; real per_layer runs on SmolLM2 exported these, to the 10k that docs/RESULTS.md
prints (the sweep's loraprune-s0.25, 121.10M; the compaction benchmark's three GQA policies at 50%, 96.18M /
94.26M / 92.34M)."""
LLAMA2_7B = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                       intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
"""Multi-head attention: a KV group is one head, so uniform removes single heads."""
POLICIES = [{"gqa_policy": "query_head", "gqa_balanced": False}, {"gqa_policy": "query_head", "gqa_balanced": True},
            {"gqa_policy": "kv_group"}, {"prune_heads": False}]


# ------------------------------------------------------------------------------------------ budget
def test_smollm2_counts_and_the_reference_by_hand() -> None:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    assert ModelShape.from_config(config) == SMOLLM2
    full = LayerCounts(9, 3, 1536)
    assert model_parameters(SMOLLM2, [full] * 30) == sum(p.numel() for p in LlamaForCausalLM(
        LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})).parameters()) + 29 * 3_540_096 == 134_515_008
    unbalanced = LoraPruneConfig(gqa_balanced=False)  # SMOLLM2_PLANS: sized to the free head choice's budget
    reference = reference_layers(SMOLLM2, unbalanced, 0.5)
    assert reference[:3] == [full] * 3 and reference[29] == full and set(reference[3:29]) == {LayerCounts(5, 5, 768)}
    for fraction, kept in SMOLLM2_PLANS.items():
        plan = uniform_plan(SMOLLM2, unbalanced, fraction)
        assert plan.kept == kept and plan.heads_removed == 3 - kept.heads // 3
    for (fraction, policy, balanced), exported in SMOLLM2_PER_LAYER_EXPORTS.items():
        cfg = LoraPruneConfig(gqa_policy=policy, gqa_balanced=balanced)
        assert model_parameters(SMOLLM2, reference_layers(SMOLLM2, cfg, fraction)) == exported


@pytest.mark.parametrize("settings", POLICIES)
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape", [SMOLLM2, ModelShape.from_config(LlamaConfig(
    vocab_size=259, hidden_size=TinyModelConfig.hidden_size, intermediate_size=TinyModelConfig.intermediate_size,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)), LLAMA2_7B], ids=["smollm2", "tiny", "llama2"])
def test_uniform_matches_per_layer_within_one_percent(shape: ModelShape, fraction: float, settings: dict) -> None:
    """The count the issue asks for: the uniform export within 1% of per_layer's, non-embedding parameters too."""
    cfg = LoraPruneConfig(**settings)
    plan = uniform_plan(shape, cfg, fraction)
    embeddings = model_parameters(shape, [])
    assert abs(plan.parameters - plan.reference_parameters) <= MATCH_TOLERANCE * (plan.reference_parameters
                                                                                  - embeddings)
    assert plan.parameters == model_parameters(shape, [plan.kept] * shape.num_layers)
    assert 1 <= plan.kept.channels < shape.intermediate_size
    assert shape.hidden_size % plan.kept.heads == 0  # what transformers 5's LlamaConfig accepts
    if plan.head_unit == "kv_group":  # whole groups (multi-head attention: single heads)
        assert plan.kept == LayerCounts((shape.num_kv_heads - plan.heads_removed) * shape.group_size,
                                        shape.num_kv_heads - plan.heads_removed, plan.kept.channels)
    else:  # the same number of query heads from every group
        assert plan.kept == LayerCounts((shape.group_size - plan.heads_removed) * shape.num_kv_heads,
                                        shape.num_kv_heads, plan.kept.channels)
    assert plan.head_unit == ("kv_group" if cfg.prune_heads and (
        cfg.gqa_policy == "kv_group" or shape.group_size == 1) else "per_group")
    if not cfg.prune_heads:
        assert plan.kept.heads == shape.num_heads and plan.heads_removed == 0


def test_the_schedule_shares_counts_and_moves_heads_by_whole_units() -> None:
    plan = uniform_plan(SMOLLM2, LoraPruneConfig(), 0.75)  # 2 heads of every group of 3, 964 channels
    counts = [plan.removed_at(k / 100) for k in range(101)]
    assert counts[0] == (0, 0) and counts[-1] == (2, 964)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(counts, counts[1:]))
    assert [h for h, _ in counts].index(1) == 25 and [h for h, _ in counts].index(2) == 75  # nearest whole head
    assert counts[50][1] == 482
    # 8 heads in 2 groups on hidden 32: 6 heads would not load, so the heads go 8 -> 4 in one step
    plan = uniform_plan(ModelShape.from_config(tiny_llama().config), LoraPruneConfig(), 0.5)
    assert (plan.kept.heads, plan.heads_removed, plan.head_steps) == (4, 2, (0, 2))
    assert [plan.removed_at(p)[0] for p in (0.2, 0.3, 0.7, 0.75, 1.0)] == [0, 0, 0, 2, 2]


# ----------------------------------------------------------------------------------- per_layer's count
@pytest.mark.parametrize(("settings", "final"), [({"gqa_policy": "kv_group"}, 0.5),
                                                 ({"gqa_balanced": True}, 0.5),
                                                 ({}, 0.375)])  # 5 of 8 heads over 2 groups: always expanded
def test_the_reference_count_is_what_per_layer_exports(settings: dict, final: float, tmp_path: Path) -> None:
    model = tiny_llama()
    method = attach(model, every=2, final=final, **settings)
    train(model, method, steps=8)
    figures = method.export(model, build_byte_tokenizer(), tmp_path, "tiny")
    shape = ModelShape.from_config(tiny_llama().config)
    assert figures["params_after_export"] == model_parameters(shape, reference_layers(shape, method.cfg, final))


# ------------------------------------------------------------------------------------------- training
def _assert_uniform(masks: dict, units: tuple[int, int], policy: str) -> None:
    heads, channels = units
    for mask in masks.values():
        per_group = mask.head_mask.view(KV_HEADS, HEADS // KV_HEADS).sum(1)
        if policy == "kv_group":
            assert int((mask.kv_mask() == 0).sum()) == heads and set(per_group.tolist()) <= {0.0, HEADS / KV_HEADS}
        else:
            assert per_group.tolist() == [HEADS / KV_HEADS - heads] * KV_HEADS
        assert int((mask.channel_mask == 0).sum()) == channels


@pytest.mark.parametrize(("policy", "criterion"), [("query_head", "channel_taylor"), ("kv_group", "lora_guided"),
                                                   ("query_head", "magnitude")])
def test_every_layer_is_pruned_alike_and_the_export_is_a_plain_llama(policy: str, criterion: str,
                                                                     tmp_path: Path) -> None:
    model = tiny_llama()
    method = attach(model, every=2, structure="uniform", gqa_policy=policy, criterion=criterion)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0)[0]["params"], lr=1e-2)
    (callback,) = method.callbacks()
    steps = 12
    callback.on_train_start(model, optimizer, steps)
    model.train()
    for step in range(1, steps + 1):  # after every event: the same counts everywhere, equal GQA groups
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        figures = callback.on_before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad()
        _assert_uniform(method.masks, method.plan.removed_at(figures["prune_target"] / 0.5), policy)
    model.eval()
    assert sorted(method.masks) == list(range(LAYERS))  # exempt layers too
    plan = method.plan
    masks = [(m.head_mask.clone(), m.channel_mask.clone()) for m in method.masks.values()]
    assert len({tuple(h.tolist()) for h, _ in masks}) > 1  # each layer chose its own heads or channels
    report = method.report(model)
    assert report["structure"] == "uniform" and report["uniform_plan"]["kept"] == vars(plan.kept)
    assert report["kept_heads_per_layer"] == [plan.kept.heads] * LAYERS
    assert report["kept_channels_per_layer"] == [plan.kept.channels] * LAYERS

    x = batch(99, rows=3, length=16)
    masked = logits(model, x)
    figures = method.export(model, build_byte_tokenizer(), tmp_path, "tiny")
    model_dir = tmp_path / "model"
    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # no trust_remote_code
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)
    assert type(loaded) is LlamaForCausalLM
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list(model_dir.glob("*.py"))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"],
            config["head_dim"]) == (plan.kept.heads, plan.kept.kv_heads, plan.kept.channels, 4)
    # one weight file, and the loader reads every tensor in it
    assert sorted(p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")) == [
        "model.safetensors"]
    assert set(load_file(model_dir / "model.safetensors")) == set(loaded.state_dict())
    assert figures["params_after_export"] == sum(p.numel() for p in loaded.parameters()) == plan.parameters
    assert abs(plan.parameters / plan.reference_parameters - 1) < MATCH_TOLERANCE
    prompt = x[:1, :6]  # the KV cache works on the pruned shapes
    cached = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False,
                                               pad_token_id=0))


def test_a_run_stopped_between_events_still_exports_a_plain_llama(tmp_path: Path) -> None:
    """The last event short of the final counts (too few steps for the cubic ramp): still one shape."""
    model = tiny_llama()
    method = attach(model, every=2, final=0.75, structure="uniform")
    (callback,) = method.callbacks()
    callback.on_train_start(model, torch.optim.SGD([torch.zeros(1)]), 40)  # a 40-step schedule, stopped at 12
    for step in range(1, 13):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        target = callback.on_before_optimizer_step(step)["prune_target"]
    heads, channels = method.plan.removed_at(target / 0.75)
    assert 0 < channels < method.plan.channels_removed
    model.eval()
    x = batch(5)
    masked = logits(model, x)
    method.export(model, build_byte_tokenizer(), tmp_path, "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.intermediate_size == 24 - channels
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- config
def test_structure_validation() -> None:
    sparsity = SparsityConfig(schedule="auto")
    assert LoraPruneConfig().structure == "per_layer"
    for settings in POLICIES[:3]:
        assert LoraPruneConfig(structure="uniform", **settings).validate(sparsity) == []
    (problem,) = LoraPruneConfig(structure="layerwise").validate(sparsity)
    assert "method.structure=layerwise is not one of per_layer, uniform" in problem
    (problem,) = LoraPruneConfig(structure="uniform", prune_channels=False).validate(sparsity)
    assert "method.prune_channels=true or method.structure=per_layer" in problem


# ---------------------------------------------------------------------------------------------- recipe
UNIFORM = ["method=loraprune", *METHOD_OVERRIDES["loraprune"], "method.structure=uniform"]


@pytest.mark.slow  # three tiny recipe runs
def test_uniform_through_the_recipe_resumes_and_exports_a_plain_llama(data_root: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract battery's export and resume checks for structure=uniform (test_method_contract runs per_layer)."""
    cfg = compose_root([*TINY_OVERRIDES, *UNIFORM, "train.max_steps=6", "train.save_every=3", "train.grad_accum=2"],
                       data_root)
    tokens = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7))
    trained = []
    export = LoraPruneMethod.export

    def look_and_export(self, model, *args, **kwargs):
        trained.append(logits(model, tokens))
        return export(self, model, *args, **kwargs)

    monkeypatch.setattr(LoraPruneMethod, "export", look_and_export)
    full = run(cfg, tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").eval()  # no trust_remote_code
    torch.testing.assert_close(logits(loaded, tokens), trained[0], atol=1e-4, rtol=0)
    plan = full["uniform_plan"]
    assert full["structure"] == "uniform" and full["prunable_layers"] == [0, 1, 2]
    assert full["kept_heads_per_layer"] == [plan["kept"]["heads"]] * 3 == full["exported_num_attention_heads_per_layer"]
    assert full["kept_channels_per_layer"] == [plan["kept"]["channels"]] * 3 and plan["kept"]["channels"] < 128
    assert full["params_after_export"] == plan["parameters"] == sum(p.numel() for p in loaded.parameters())
    assert abs(plan["parameters_vs_per_layer"]) < MATCH_TOLERANCE

    resumed = crash_then_resume(cfg, tmp_path / "resumed", 3 * 2 + 1, monkeypatch)
    losses = [[r["loss"] for r in metric_records(tmp_path / d)] for d in ("resumed", "full")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and resumed["final_loss"] == pytest.approx(
        full["final_loss"], abs=1e-6)
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / d / "checkpoints")) for d in ("resumed", "full")]
    for key in (ckpt.STEP_KEY, ckpt.ADAPTER_KEY, ckpt.CALLBACKS_KEY):
        assert_same_state(final[0][key], final[1][key], key)
    torch.testing.assert_close(trained[1], trained[0], atol=1e-5, rtol=0)  # the resumed run's model before export


@pytest.mark.slow  # one eager and one compiled tiny run
def test_a_compiled_uniform_run_trains_like_an_eager_one(data_root: Path, tmp_path: Path) -> None:
    overrides = [*TINY_OVERRIDES, *UNIFORM, *COMPILE_STEPS]
    eager = run(compose_root(overrides, data_root), tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = run(compose_root([*overrides, *COMPILED], data_root), tmp_path / "compiled")
    assert int(counters["stats"]["unique_graphs"]) == 1  # masks on every layer recompile nothing either
    losses = [[r["loss"] for r in metric_records(tmp_path / d)] for d in ("compiled", "eager")]
    assert losses[0] == pytest.approx(losses[1], rel=2e-2, abs=2e-2)
    assert compiled["params_after_export"] == eager["params_after_export"] < eager["params_total"]
