"""LoRAPrune (docs/methods.md §5): the LoRA-guided gradient, grouping, masks, GQA policies, compaction and export."""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.lora import lora_modules
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.loraprune.callback import LoraPruneCallback
from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.loraprune.method import LoraPruneMethod
from prunedlora.models.tiny import build_byte_tokenizer
from prunedlora.pruning.structure import (
    AttentionShape,
    plan_layer,
    prunable_layer_indices,
    select_pruned,
)
from prunedlora.pruning.structured_criteria import (
    TaylorCapture,
    feature_importance,
    group_sum,
    head_scores,
    l2_normalise,
    lora_guided_gradient,
)
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict

VOCAB = 259  # the byte tokenizer's, so export can save it
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 4  # GQA groups of 4 query heads
LAYERS = 5  # exempt: none first (floor(0.5)), the last one -> layers 0-3 prunable


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Matrices here are tiny: with 2+ intra-op threads on a shared, busy machine every GEMM waits for a
    second core (10x slower measured); one thread keeps the module well under a minute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=24, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


PROGRESSIVE = {"criterion": "channel_taylor", "refit": False, "gqa_balanced": False}


def attach(model: nn.Module, every: int = 1, final: float = 0.5, **overrides) -> LoraPruneMethod:
    # no lora_dropout: these tests compare masked, exported and resumed models exactly. The progressive method
    # (masks while LoRA trains; channel_taylor, no re-fit, free head choice) unless a test asks for more.
    cfg = LoraPruneConfig(rank=4, alpha=8.0, **{**PROGRESSIVE, "dropout": 0.0, **overrides})
    sparsity = SparsityConfig(schedule="cubic", final=final, every=every, warmup_frac=0.1, cooldown_frac=0.1)
    method = build_method(cfg, sparsity)
    method.attach(model)
    gen = torch.Generator().manual_seed(7)
    for m in lora_modules(model).values():  # non-zero B: BA and G_A matter in every criterion
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)
    return method


def batch(seed: int, rows: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, method: LoraPruneMethod, steps: int, lr: float = 1e-2) -> LoraPruneCallback:
    """A minimal loop with the recipe's order: backward -> on_before_optimizer_step -> step -> zero_grad."""
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0)[0]["params"], lr=lr)
    (callback,) = method.callbacks()
    callback.on_train_start(model, optimizer, steps)
    model.train()
    for step in range(1, steps + 1):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        callback.on_before_optimizer_step(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return callback


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# ------------------------------------------------------------------------------------------ criteria
def test_lora_guided_gradient_is_minus_one_sgd_step_of_ba() -> None:
    """docs/methods.md §5.2: B'A' - BA = -(G_B A + B G_A) + G_B G_A at eta = 1, i.e. -G^."""
    model = tiny_llama()
    attach(model)
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    modules = list(lora_modules(model).values())
    before = {m: (m.lora_B.weight.detach().clone() @ m.lora_A.weight.detach().clone()) for m in modules}
    g_hat = {m: lora_guided_gradient(m) for m in modules}
    torch.optim.SGD([p for m in modules for p in (m.lora_A.weight, m.lora_B.weight)], lr=1.0).step()
    for m in modules:
        change = m.lora_B.weight.detach() @ m.lora_A.weight.detach() - before[m]
        assert g_hat[m].abs().max() > 0
        torch.testing.assert_close(g_hat[m], -change, rtol=1e-4, atol=1e-6)


def test_head_scores_group_normalise_and_share_the_kv_score() -> None:
    """q + o per query head plus (k + v) of its KV head, each module's vector L2-normalised; kv_group sums."""
    model = tiny_llama()
    attach(model)
    x = batch(1)
    model(input_ids=x, labels=x).loss.backward()
    attn = model.model.layers[1].self_attn
    shape = AttentionShape.of(attn)
    assert (shape.num_heads, shape.num_kv_heads, shape.group_size) == (HEADS, KV_HEADS, 4)
    vec = {n: l2_normalise(group_sum(feature_importance(getattr(attn, n), "lora_guided", 1, int(n == "o_proj")),
                                     HEAD_DIM)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected = vec["q_proj"] + vec["o_proj"] + (vec["k_proj"] + vec["v_proj"]).repeat_interleave(4)
    got = head_scores(attn, shape, "lora_guided", 1, "query_head")
    torch.testing.assert_close(got, expected)
    assert all(abs(float(v.norm()) - 1) < 1e-3 for v in vec.values())  # eps = 1e-8 vs norms ~1e-4
    grouped = head_scores(attn, shape, "lora_guided", 1, "kv_group")
    torch.testing.assert_close(grouped, (vec["q_proj"] + vec["o_proj"]).view(2, 4).sum(1)
                               + vec["k_proj"] + vec["v_proj"])
    squared = head_scores(attn, shape, "lora_guided", 2, "query_head")
    assert not torch.allclose(squared, got)


def test_channel_taylor_equals_the_autograd_first_order_loss_change_of_removing_each_group() -> None:
    """|dL/d alpha| at alpha = 1 for a scale alpha on each head's slice of the o_proj input and on each channel of
    the down_proj input (autograd, float64) is the first-order loss change of zeroing that group; the hooks'
    sums over two micro-batches must equal it, and the scores are its L2-normalised magnitudes."""
    model = tiny_llama()
    method = attach(model, criterion="channel_taylor")
    model.double()
    (callback,) = method.callbacks()
    alphas = {}
    for i in method.masks:
        layer = model.model.layers[i]
        heads = torch.ones(HEADS, dtype=torch.float64, requires_grad=True)
        channels = torch.ones(24, dtype=torch.float64, requires_grad=True)
        alphas[i] = (heads, channels)
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, a=heads: (args[0] * a.repeat_interleave(HEAD_DIM),))
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args, a=channels: (args[0] * a,))
    model.train()
    for micro in range(2):  # a step of two micro-batches, each loss halved as the engine does
        x = batch(micro)
        (model(input_ids=x, labels=x).loss / 2).backward()
    sums = {key: total.double() for key, total in callback.capture.take().items()}  # accumulated in float32
    cfg = method.cfg
    for i, (heads, channels) in alphas.items():
        per_head = group_sum(sums[(i, "o_proj")], HEAD_DIM)
        torch.testing.assert_close(per_head, heads.grad, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(sums[(i, "down_proj")], channels.grad, rtol=1e-5, atol=1e-12)
        assert heads.grad.abs().min() > 0 and channels.grad.abs().min() > 0
        scores = TaylorCapture.layer_scores(sums, i, method.masks[i].shape, cfg)
        torch.testing.assert_close(scores["heads"], l2_normalise(heads.grad.abs()))
        torch.testing.assert_close(scores["channels"], l2_normalise(channels.grad.abs()))
        grouped = TaylorCapture.layer_scores(sums, i, method.masks[i].shape,
                                             LoraPruneConfig(criterion="channel_taylor", gqa_policy="kv_group"))
        torch.testing.assert_close(grouped["heads"], l2_normalise(heads.grad.view(KV_HEADS, 4).sum(1).abs()))
    assert callback.capture.take() == {}  # take() starts the next step's sums
    base = model.model.layers[0].mlp.down_proj.base_layer.weight
    assert base.grad is None and not base.requires_grad  # no weight gradient anywhere in the base


def test_channel_taylor_frees_each_step_without_the_cycle_collector() -> None:
    """The capture must not keep a step's autograd graph alive: with the cycle collector off, reference counting
    alone has to free every o_proj/down_proj input once backward is done (an earlier tensor hook closing over its
    own tensor leaked the whole graph, about 1 GB a step on SmolLM2, until the OOM killer came)."""
    model = tiny_llama()
    method = attach(model, criterion="channel_taylor")
    (callback,) = method.callbacks()
    inputs: list[weakref.ref] = []
    for i in method.masks:  # registered after the capture's hooks: they see the same tensors
        for projection in (model.model.layers[i].self_attn.o_proj, model.model.layers[i].mlp.down_proj):
            projection.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
    model.train()
    gc.collect()
    gc.disable()
    try:
        for step in range(2):
            x = batch(step)
            model(input_ids=x, labels=x).loss.backward()
        alive = sum(ref() is not None for ref in inputs)
    finally:
        gc.enable()
    assert len(inputs) == 2 * 2 * len(method.masks) and alive == 0
    assert set(callback.capture.take()) == {(i, name) for i in method.masks for name in ("o_proj", "down_proj")}


def test_channel_taylor_unchanged_by_gradient_checkpointing() -> None:
    """The recipe's non-reentrant checkpointing recomputes each layer's forward in backward, and the capture must
    still count every micro-batch exactly once."""
    sums = []
    for checkpointing in (False, True):
        model = tiny_llama()
        method = attach(model)
        (callback,) = method.callbacks()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        x = batch(0)
        model(input_ids=x, labels=x).loss.backward()
        sums.append(callback.capture.take())
    assert sums[0].keys() == sums[1].keys() and len(sums[0]) == 2 * len(method.masks)
    for key, total in sums[0].items():
        assert total.abs().max() > 0
        torch.testing.assert_close(sums[1][key], total)


def test_channel_taylor_needs_no_adapter_on_the_grouped_projections() -> None:
    sparsity = SparsityConfig(schedule="cubic")
    assert LoraPruneConfig(criterion="channel_taylor", target_modules=["q_proj", "v_proj"]).validate(sparsity) == []
    model = tiny_llama()
    method = attach(model, every=2, criterion="channel_taylor", target_modules=["q_proj", "v_proj"])
    callback = train(model, method, steps=6)
    assert callback.skipped == 0 and method.report(model)["sparsity"] == pytest.approx(0.5)


def _rankings(callback: LoraPruneCallback) -> dict[str, list[int]]:
    return {k: torch.argsort(v, stable=True).tolist() for k, v in sorted(callback.ema.values.items())}


def test_three_criteria_rank_differently_and_all_give_valid_masks() -> None:
    results = {}
    for criterion in ("lora_guided", "magnitude", "true_gradient"):
        model = tiny_llama()
        method = attach(model, every=2, criterion=criterion)
        base_before = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
        callback = train(model, method, steps=10)
        results[criterion] = _rankings(callback)
        assert set(method.masks) == {0, 1, 2, 3}  # the last layer is exempt
        for mask in method.masks.values():
            assert int(mask.head_mask.sum()) == HEADS // 2 and int(mask.channel_mask.sum()) == 12
            assert torch.equal(mask.kv_mask(), mask.head_mask.view(KV_HEADS, 4).amax(1))
        assert not hasattr(model.model.layers[4], "structure_mask")
        # true_gradient reads dL/dW0 but never updates W0 and leaves no gradient behind
        base = model.model.layers[0].self_attn.q_proj.base_layer.weight
        assert torch.equal(base.detach(), base_before) and base.grad is None
    assert results["lora_guided"] != results["magnitude"]
    assert results["lora_guided"] != results["true_gradient"]
    assert results["magnitude"] != results["true_gradient"]


def test_true_gradient_keeps_base_weights_out_of_the_optimizer() -> None:
    model = tiny_llama()
    method = attach(model, criterion="true_gradient")
    params = method.parameter_groups(model, 0.0)[0]["params"]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    (callback,) = method.callbacks()
    callback.on_train_start(model, optimizer, 10)
    base = model.model.layers[0].mlp.down_proj.base_layer.weight
    assert base.requires_grad and all(p is not base for p in params)
    assert not model.model.layers[4].mlp.down_proj.base_layer.weight.requires_grad  # exempt layer: no cost
    x = batch(3)
    model(input_ids=x, labels=x).loss.backward()
    assert base.grad is not None
    callback.on_before_optimizer_step(1)
    assert base.grad is None


def test_scoring_never_touches_base_weights_without_adapters() -> None:
    """magnitude with LoRA on q_proj only: the other projections are scored from W0 alone, read-only."""
    model = tiny_llama()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = attach(model, every=1, criterion="magnitude", target_modules=["q_proj"])
    train(model, method, steps=3)
    assert method.report(model)["sparsity"] > 0
    for name, param in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), dense[name.replace(".base_layer", "")]), name


# ------------------------------------------------------------------------------------------ schedule
def test_exempt_layers_and_selection_rules() -> None:
    assert prunable_layer_indices(32, 0.1, 1) == list(range(3, 31))  # authors' code: 0-2 and 31 exempt
    assert prunable_layer_indices(30, 0.1, 1) == list(range(3, 29))  # SmolLM2-135M
    assert prunable_layer_indices(2, 0.1, 1) == [0]
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    scores = torch.tensor([0.1, 9.0, 0.5, 0.3])  # the removed unit's high score does not bring it back
    assert select_pruned(scores, keep, 2).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert select_pruned(scores, keep, 0).tolist() == keep.tolist()  # cumulative: never undone
    assert select_pruned(scores, keep, 4).sum() == 1  # floor: one unit always stays


def test_masks_are_cumulative_and_follow_the_cubic_schedule() -> None:
    model = tiny_llama()
    method = attach(model, every=2)
    optimizer = torch.optim.AdamW(method.parameter_groups(model, 0.0)[0]["params"], lr=1e-2)
    (callback,) = method.callbacks()
    steps = 20
    callback.on_train_start(model, optimizer, steps)
    previous = {i: (m.head_mask.clone(), m.channel_mask.clone()) for i, m in method.masks.items()}
    targets = []
    for step in range(1, steps + 1):
        x = batch(step)
        model(input_ids=x, labels=x).loss.backward()
        figures = callback.on_before_optimizer_step(step)
        targets.append(figures["prune_target"])
        optimizer.step()
        optimizer.zero_grad()
        for i, m in method.masks.items():
            assert torch.all(m.head_mask <= previous[i][0]) and torch.all(m.channel_mask <= previous[i][1])
            assert int((m.channel_mask == 0).sum()) == math.floor(figures["prune_target"] * 24 + 1e-9)
            previous[i] = (m.head_mask.clone(), m.channel_mask.clone())
    assert targets[:2] == [0.0, 0.0] and targets[-1] == 0.5  # warm-up (2 steps), then cubic up to final
    assert all(a <= b for a, b in zip(targets, targets[1:]))
    assert figures["sparsity"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- masking
def test_masking_a_head_removes_it_through_the_o_proj_input() -> None:
    """Masked model == dense model with the head's o_proj columns and the channel's down columns zeroed."""
    model = tiny_llama()
    method = attach(model)
    reference = tiny_llama()
    attach(reference)  # same seeds: same base, A and B; its masks stay all ones
    x = batch(5)
    method.masks[1].head_mask[3] = 0
    method.masks[1].channel_mask[[0, 5]] = 0
    o = reference.model.layers[1].self_attn.o_proj
    down = reference.model.layers[1].mlp.down_proj
    with torch.no_grad():
        for lin in (o.base_layer, o.lora_A):
            lin.weight[:, 3 * HEAD_DIM:4 * HEAD_DIM] = 0
        for lin in (down.base_layer, down.lora_A):
            lin.weight[:, [0, 5]] = 0
    torch.testing.assert_close(logits(model, x), logits(reference, x))


# -------------------------------------------------------------------------------------------- export
def _export(model: nn.Module, method: LoraPruneMethod, out: Path) -> tuple[dict, nn.Module]:
    figures = method.export(model, build_byte_tokenizer(), out, "tiny")
    return figures, AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True).eval()


@pytest.mark.parametrize(("policy", "balanced", "criterion"), [
    ("query_head", False, "lora_guided"), ("kv_group", False, "lora_guided"), ("query_head", True, "lora_guided"),
    ("query_head", False, "channel_taylor"), ("kv_group", False, "channel_taylor")])
def test_export_after_training_matches_the_masked_model(policy: str, balanced: bool, criterion: str,
                                                        tmp_path: Path) -> None:
    model = tiny_llama()
    method = attach(model, every=2, gqa_policy=policy, gqa_balanced=balanced, criterion=criterion)
    train(model, method, steps=8)
    report = method.report(model)
    x = batch(99, rows=3, length=16)
    masked = logits(model, x)
    figures, loaded = _export(model, method, tmp_path)
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(model, x), masked, atol=1e-4, rtol=0)  # the in-memory compacted model
    assert report["kept_heads_per_layer"] == [4, 4, 4, 4, 8] and report["kept_channels_per_layer"] == [12] * 4 + [24]
    assert report["sparsity"] == pytest.approx(0.5)
    if policy == "kv_group":  # whole groups: one KV head left, standard GQA
        assert figures["exported_num_key_value_heads_per_layer"] == [1, 1, 1, 1, 2]
    if balanced:  # two of four query heads from each group: both KV heads stay, never expanded
        assert figures["exported_num_key_value_heads_per_layer"] == [2] * 5 and figures["gqa_expanded_layers"] == []
    assert figures["params_after_export"] == sum(p.numel() for p in loaded.parameters())
    assert figures["params_after_export"] < figures["params_before_export"] == sum(
        p.numel() for p in tiny_llama().parameters())
    assert type(loaded).__name__ == "PrunedLlamaForCausalLM"
    assert not any("lora" in n or "structure_mask" in n for n in loaded.state_dict())


def test_export_with_unequal_gqa_groups_expands_kv_exactly(tmp_path: Path) -> None:
    """Query heads kept unequally across KV groups -> k/v expanded to one KV head per query head."""
    model = tiny_llama()
    method = attach(model, final=0.0)
    train(model, method, steps=2)  # moves the LoRA factors; final=0 prunes nothing, the masks are set below
    plans = {  # layer -> kept query heads (groups are heads 0-3 and 4-7)
        0: [0, 1, 2, 4],  # 3 + 1: unequal -> expanded, 4 KV heads
        1: [1, 3, 5, 6],  # 2 + 2: standard GQA, 2 KV heads, groups of 2
        2: [4, 6],  # group 0 gone entirely: 1 KV head, groups of 2
        3: [7],  # the floor: a single head
    }
    for i, heads in plans.items():
        keep = torch.zeros(HEADS)
        keep[heads] = 1
        method.masks[i].head_mask.copy_(keep)
    method.masks[2].channel_mask[[0, 3, 4, 23]] = 0
    x = batch(42, rows=2, length=20)
    masked = logits(model, x)
    figures, loaded = _export(model, method, tmp_path)
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)
    assert figures["gqa_expanded_layers"] == [0]
    assert figures["exported_num_attention_heads_per_layer"] == [4, 4, 2, 1, 8]
    assert figures["exported_num_key_value_heads_per_layer"] == [4, 2, 1, 1, 2]
    assert figures["exported_intermediate_size_per_layer"] == [24, 24, 20, 24, 24]
    attn = [layer.self_attn for layer in loaded.model.layers]
    assert [a.num_key_value_groups for a in attn] == [1, 2, 2, 1, 4]
    assert attn[0].k_proj.weight.shape == (4 * HEAD_DIM, HEADS * HEAD_DIM)
    assert attn[2].o_proj.weight.shape == (HEADS * HEAD_DIM, 2 * HEAD_DIM)
    assert loaded.model.layers[2].mlp.down_proj.weight.shape == (HEADS * HEAD_DIM, 20)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "pruned_llama" and config["architectures"] == ["PrunedLlamaForCausalLM"]
    manifest = json.loads((tmp_path / "model" / "pruning_manifest.json").read_text())
    assert manifest["layers"][0] == {"kept_heads": [0, 1, 2, 4], "kv_source": [0, 0, 0, 1],
                                     "kept_channels": list(range(24)), "expanded": True}
    # the KV cache copes with per-layer head counts: cached greedy decoding == recomputing every step
    prompt = x[:1, :6]
    generated = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    recomputed = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(generated, recomputed)


def test_plan_layer_keeps_standard_gqa_when_counts_are_equal() -> None:
    shape = AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
    plan = plan_layer(shape, torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0.0]), torch.ones(5))  # 3 + 1 + 0
    assert (plan.kept_heads, plan.kv_source, plan.expanded) == ([0, 1, 2, 3], [0, 0, 0, 1], True)
    plan = plan_layer(shape, torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 0.0]), torch.ones(5))
    assert (plan.kv_source, plan.expanded) == ([0, 2], False)


# ---------------------------------------------------------------------------------- config, resume
def test_config_validation() -> None:
    assert LoraPruneConfig().validate(SparsityConfig(schedule="auto")) == []
    sparsity = SparsityConfig(schedule="cubic")  # lora_guided scores from training gradients: progressive only
    assert LoraPruneConfig().validate(sparsity) == []
    problems = LoraPruneConfig(prune_every=5, criterion="grad", gqa_policy="x", score_power=3,
                               ).validate(SparsityConfig(schedule="constant"))
    text = " ".join(problems)
    for key in ("method.prune_every=5", "sparsity.every=5", "method.criterion=grad", "method.gqa_policy=x",
                "method.score_power=3", "sparsity.schedule=constant"):
        assert key in text, key
    (problem,) = LoraPruneConfig(criterion="lora_guided", target_modules=["q_proj", "up_proj"]).validate(sparsity)
    assert "lacks ['k_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj']" in problem
    assert LoraPruneConfig(criterion="magnitude", target_modules=["q_proj"]).validate(sparsity) == []
    assert LoraPruneConfig(gqa_policy="kv_group", gqa_balanced=True).validate(sparsity) == []  # no effect there
    with pytest.raises(ConfigError):
        build_method(LoraPruneConfig(name="nope"), sparsity)


@pytest.mark.parametrize(("criterion", "structure"), [("channel_taylor", "per_layer"), ("lora_guided", "per_layer"),
                                                     ("channel_taylor", "uniform")])
def test_masks_and_ema_resume_from_a_checkpoint(criterion: str, structure: str) -> None:
    model = tiny_llama()
    method = attach(model, every=2, criterion=criterion, structure=structure)
    callback = train(model, method, steps=6)
    adapter, state = adapter_state_dict(model), callback.state_dict()
    assert "model.layers.1.structure_mask.head_mask" in adapter
    assert ("model.layers.4.structure_mask.head_mask" in adapter) == (structure == "uniform")  # the last layer
    fresh = tiny_llama()
    fresh_method = attach(fresh, every=2, criterion=criterion, structure=structure)
    load_adapter_state_dict(fresh, adapter)
    (fresh_callback,) = fresh_method.callbacks()
    fresh_callback.load_state_dict(state)
    x = batch(11)
    torch.testing.assert_close(logits(fresh, x), logits(model, x))
    assert _rankings(fresh_callback) == _rankings(callback)
    for i in method.masks:
        assert torch.equal(fresh_method.masks[i].head_mask, method.masks[i].head_mask)


@pytest.mark.parametrize(("quantization", "criterion", "structure"),
                         [("nf4", "lora_guided", "per_layer"), ("int8", "lora_guided", "per_layer"),
                          ("nf4", "channel_taylor", "per_layer"), ("nf4", "channel_taylor", "uniform")])
def test_quantized_base_trains_with_output_masks_and_exports_a_float_model(quantization: str, criterion: str,
                                                                          structure: str, tmp_path: Path) -> None:
    """bitsandbytes base: lora_guided scores W0 dequantized per module, channel_taylor the activations; masks act
    on outputs; export dequantizes (uniform: into a plain checkpoint that loads without remote code)."""
    pytest.importorskip("bitsandbytes")
    from prunedlora.config import ModelConfig, TinyModelConfig
    from prunedlora.models.load import load_model

    model, tokenizer = load_model(ModelConfig(name="tiny", name_or_path="tiny", quantization=quantization,
                                              tiny=TinyModelConfig(num_hidden_layers=3)))
    method = attach(model, every=1, criterion=criterion, structure=structure)
    train(model, method, steps=3)
    assert method.report(model)["sparsity"] > 0
    x = batch(8)
    # Reference in train mode (no dropout here): bitsandbytes dequantizes and multiplies in float32. An eval-mode
    # forward would repack the weights for its bf16 CPU kernel, lossily (see models.surgery.dequantized_weight).
    model.train()
    masked = logits(model, x)
    model.eval()
    figures = method.export(model, tokenizer, tmp_path, "tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model",
                                                  trust_remote_code=structure == "per_layer").eval()
    torch.testing.assert_close(logits(loaded, x), masked, atol=1e-4, rtol=0)
    assert figures["params_after_export"] < figures["params_before_export"]
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())


# ----------------------------------------------------------------------------------------------- e2e
@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path: Path, data_root: Path) -> None:
    """``prunedlora-train model=tiny method=loraprune``: model/ loads with trust_remote_code and is smaller."""
    from cli_helpers import TINY, run_cli

    run_dir = tmp_path / "run"
    result = run_cli(["prunedlora-train", *TINY, "method=loraprune", "train.max_steps=40", "train.num_threads=1",
                      "eval.enabled=false", f"hydra.run.dir={run_dir}"], data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sparsity"] == pytest.approx(0.5) and summary["prunable_layers"] == [0]
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model", trust_remote_code=True)
    params = sum(p.numel() for p in loaded.parameters())
    assert params == summary["params_after_export"] < summary["params_total"]
    assert loaded.model.layers[0].self_attn.q_proj.out_features == 2 * loaded.config.head_dim
