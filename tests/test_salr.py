"""SALR (docs/methods.md §6): masks, residual SVD bound, concatenated adapters, bitmap storage, export, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from adapter_helpers import randomize_b
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.salr import SalrLinear, residual_factors, salr_modules, truncated_svd
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.export import weight_files
from prunedlora.export.bitmap import BITMAP_FILE, STORAGE_FILE
from prunedlora.export.compressed import load_salr_export
from prunedlora.methods import build_method
from prunedlora.methods.salr.config import SalrConfig
from prunedlora.methods.salr.export import plain_bases
from prunedlora.methods.salr.formats import sparse_base_weight
from prunedlora.methods.salr.method import SalrMethod
from prunedlora.pruning.bitmap import (
    BitmapLinear,
    BitmapTensor,
    SemiStructuredLinear,
    check,
    decode,
    encode,
    load_bitmaps,
    save_bitmaps,
    semi_structured_available,
    size_report,
)
from prunedlora.pruning.fused_bitmap import FusedBitmapLinear
from prunedlora.pruning.magnitude import (
    global_threshold,
    mask_function,
    per_matrix_mask,
    prune_,
    threshold_mask,
    two_four_mask,
)
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict

VOCAB = 97
R_RES, RANK, ALPHA = 4, 4, 8.0
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
TASK_B = r"lora_B\.weight$"
"""The task adapter's B (at B = 0 it contributes nothing); the residual adapter's factors are named otherwise."""


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def salr_cfg(**kw) -> SalrConfig:
    """The paper's pipeline (magnitude base); the activation-aware criteria are tested in test_salr_bases.py."""
    return SalrConfig(**{"residual_rank": R_RES, "rank": RANK, "alpha": ALPHA, "base_criterion": "magnitude", **kw})


def attach(model: nn.Module, final: float = 0.5, **kw) -> SalrMethod:
    method = build_method(salr_cfg(**kw), SparsityConfig(final=final))
    method.attach(model)
    return method


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def random_sparse(shape: tuple[int, int], dtype: torch.dtype, density: float = 0.5) -> torch.Tensor:
    w = torch.randn(shape).to(dtype)
    return w.masked_fill(torch.rand(shape) > density, 0.0)


# ------------------------------------------------------------------------------------------ bitmap
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (33, 29), (16, 1), (5, 64), (3, 8)])
def test_bitmap_round_trip_is_bit_identical(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = random_sparse(shape, dtype)
    w.view(-1)[0] = -0.0  # a signed zero survives too (stored as a value: its bit pattern is non-zero)
    bitmap = encode(w)
    check(bitmap)
    assert bitmap.mask.shape == (shape[0], math.ceil(shape[1] / 8)) and bitmap.row_offsets.dtype == torch.int64
    assert torch.equal(decode(bitmap).view(INT_VIEW[dtype]), w.view(INT_VIEW[dtype]))


def test_bitmap_layout_is_lsb_first_with_a_zero_tail() -> None:
    w = torch.zeros(2, 11)
    w[0, [0, 3, 8, 10]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, 7] = 5.0
    bitmap = encode(w)
    # row 0: byte 0 has bits 0 and 3 (0b1001 = 9), byte 1 bits 0 and 2 (columns 8, 10: 0b101 = 5)
    assert bitmap.mask.tolist() == [[9, 5], [128, 0]]
    assert bitmap.values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and bitmap.row_offsets.tolist() == [0, 4, 5]


def test_kept_exact_zero_is_absent_and_decodes_to_zero() -> None:
    w = torch.tensor([[0.0, 1.0, 0.0, -2.0]])
    bitmap = encode(w)
    assert bitmap.nnz == 2 and torch.equal(decode(bitmap), w)


def test_bitmap_ratio_at_half_sparsity_in_bf16_is_at_most_0_57() -> None:
    w = torch.randn(576, 1536).to(torch.bfloat16)
    prune_(w, per_matrix_mask(w, 0.5))
    report = size_report({"w": encode(w)})
    total = report["total"]
    assert total["bytes_dense"] == 576 * 1536 * 2 and total["bytes_mask"] == 576 * 192
    assert total["bytes_values"] == 576 * 768 * 2 and total["bytes_offsets"] == 577 * 8
    assert total["bytes_bitmap"] == total["bytes_mask"] + total["bytes_values"] + total["bytes_offsets"]
    assert total["ratio"] <= 0.57 and report["matrices"]["w"]["ratio"] == total["ratio"]


def test_bitmap_file_round_trip_and_corruption_check(tmp_path: Path) -> None:
    bitmaps = {"a.weight": encode(random_sparse((9, 21), torch.bfloat16)),
               "b.weight": encode(random_sparse((4, 8), torch.float32))}
    extra = {"norm.weight": torch.randn(21)}
    save_bitmaps(tmp_path / "x.safetensors", bitmaps, extra)
    loaded, dense = load_bitmaps(tmp_path / "x.safetensors")
    assert set(dense) == {"norm.weight"} and torch.equal(dense["norm.weight"], extra["norm.weight"])
    for name, b in bitmaps.items():
        assert torch.equal(decode(loaded[name]), decode(b)) and loaded[name].dtype == b.dtype
    broken = BitmapTensor(bitmaps["a.weight"].mask, bitmaps["a.weight"].values[:-1],
                          bitmaps["a.weight"].row_offsets, (9, 21))
    with pytest.raises(ValueError, match="values are stored"):
        check(broken)


def test_bitmap_linear_equals_masked_dense_linear() -> None:
    linear = nn.Linear(29, 11)
    prune_(linear.weight, per_matrix_mask(linear.weight, 0.5))
    bitmap_linear = BitmapLinear.from_linear(linear)
    x = torch.randn(3, 5, 29, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = bitmap_linear(x), linear(x2)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=0, rtol=0)
    assert not any(p.requires_grad for p in bitmap_linear.parameters())


# --------------------------------------------------------------------------------------------- masks
def test_per_matrix_mask_keeps_exactly_the_largest() -> None:
    w = torch.randn(16, 24)
    mask = per_matrix_mask(w, 0.3)
    n_keep = w.numel() - round(0.3 * w.numel())
    assert int(mask.sum()) == n_keep
    assert w.abs()[mask].min() >= w.abs()[~mask].max()


def test_per_matrix_ties_are_pruned_in_index_order() -> None:
    for seed in range(10):
        w = torch.randint(-3, 4, (13, 17), generator=torch.Generator().manual_seed(seed)).float()  # many ties
        flat, n_prune = w.abs().flatten(), round(0.45 * w.numel())
        expected = torch.ones_like(flat, dtype=torch.bool)
        expected[torch.argsort(flat, stable=True)[:n_prune]] = False
        assert torch.equal(per_matrix_mask(w, 0.45).flatten(), expected)


def test_global_threshold_matches_sorting_everything() -> None:
    weights = [torch.randn(8, 16) * 0.1, torch.randn(12, 8), torch.randn(5, 7).to(torch.bfloat16)]
    t = global_threshold(weights, 0.6)
    everything = torch.cat([w.abs().float().flatten() for w in weights])
    n_prune = round(0.6 * everything.numel())
    assert t == everything.sort().values[n_prune - 1].item()
    kept = sum(int(threshold_mask(w, t).sum()) for w in weights)
    assert kept == everything.numel() - n_prune  # random weights: no ties at the threshold
    assert global_threshold(weights, 0.0) < 0


def test_two_four_mask_keeps_the_two_largest_of_every_four() -> None:
    w = torch.randn(6, 16)
    mask = two_four_mask(w)
    groups, kept = w.abs().view(6, 4, 4), mask.view(6, 4, 4)
    assert torch.all(kept.sum(-1) == 2)
    assert torch.all(groups.masked_fill(~kept, -1).amax(-1) >= groups.masked_fill(kept, -1).amax(-1))
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_mask(torch.randn(4, 10))
    with pytest.raises(ValueError, match="no global scope"):
        mask_function([w], 0.5, "global", "2:4")


# ------------------------------------------------------------------------------------- residual SVD
@pytest.mark.parametrize("shape, rank, method", [((40, 24), 4, "full"), ((24, 64), 8, "full"),
                                                 ((64, 64), 1, "full"), ((150, 100), 6, "lowrank")])
def test_residual_bound_on_random_matrices(shape: tuple[int, int], rank: int, method: str) -> None:
    w = torch.randn(shape)
    e = w.masked_fill(per_matrix_mask(w, 0.5), 0.0)  # E = (1 - M) ⊙ W0
    b, a = residual_factors(e, rank, method)
    n = min(shape)
    error, norm = (e - b @ a).square().sum(), e.square().sum()
    assert error <= (1 - rank / n) * norm
    if method == "full":  # exactly the tail of the spectrum (Eckart-Young)
        s = torch.linalg.svdvals(e)
        torch.testing.assert_close(error, s[rank:].square().sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-4, atol=1e-4)  # √Σ on each side: balanced


def test_lowrank_svd_leaves_the_global_rng_alone() -> None:
    e = torch.randn(60, 40)
    state = torch.get_rng_state()
    first = truncated_svd(e, 3, "lowrank")
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, truncated_svd(e, 3, "lowrank"), strict=True):  # same factors on a re-attach
        assert torch.equal(a, b)


def test_a_randomised_svd_that_misses_the_bound_falls_back_to_the_full_svd(monkeypatch) -> None:
    e = torch.randn(90, 70)

    def worst_directions(a: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, ...]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u.flip(1)[:, :q], s.flip(0)[:q], vh.T.flip(1)[:, :q]  # the smallest singular triplets

    monkeypatch.setattr(torch, "svd_lowrank", worst_directions)
    b, a = residual_factors(e, 5, "lowrank")
    b_full, a_full = residual_factors(e, 5, "full")
    torch.testing.assert_close(b @ a, b_full @ a_full, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_residual_bound_on_real_smollm2_matrices() -> None:
    from safetensors import safe_open

    from prunedlora.models.smollm2 import smollm2_offline_dir

    path = next(smollm2_offline_dir().glob("*.safetensors"))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
             "model.layers.7.mlp.down_proj.weight", "model.layers.29.mlp.up_proj.weight"]
    with safe_open(str(path), framework="pt") as f:
        weights = {n: f.get_tensor(n).float() for n in names}
    for name, w in weights.items():
        e = w.masked_fill(per_matrix_mask(w, 0.5), 0.0)
        for rank in (8, 64):
            b, a = residual_factors(e, rank)
            ratio = float((e - b @ a).square().sum() / e.square().sum())
            assert ratio <= 1 - rank / min(w.shape), (name, rank, ratio)


# ---------------------------------------------------------------------------------- SALR linear
def separate_forward(layer: SalrLinear, x: torch.Tensor) -> torch.Tensor:
    """``W_s x + B_res A_res x + s B_task A_task x``, one adapter at a time."""
    residual = layer.residual_B(layer.residual_A(x))
    task = layer.lora_B(layer.lora_A(x)) * layer.scaling
    return layer.base_layer(x) + residual + task


def test_concatenated_forward_and_gradients_equal_separate_adapters() -> None:
    base = nn.Linear(24, 20)
    mask = per_matrix_mask(base.weight, 0.5)
    e = base.weight.detach().masked_fill(mask, 0.0)
    prune_(base.weight, mask)
    layer = SalrLinear(base, residual_rank=5, rank=3, alpha=6.0)
    layer.set_residual(*residual_factors(e, 5))  # realistic magnitudes: float32 sums agree to ~1e-7
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    params = [layer.residual_A.weight, layer.residual_B.weight, layer.lora_A.weight, layer.lora_B.weight]
    x = torch.randn(4, 7, 24)
    out = layer(x)
    torch.testing.assert_close(out, separate_forward(layer, x), atol=1e-6, rtol=0)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref_grads = torch.autograd.grad(separate_forward(layer, x).square().sum(), params)
    for g, ref in zip(grads, ref_grads, strict=True):  # sums over 28 rows: MKL's AVX-512 sgemm orders them
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)  # differently from its AVX2 one (1.4e-6 seen)
    assert layer.rank_scale.tolist() == [1.0] * 5 + [2.0] * 3


def test_task_adapter_starts_as_plain_lora_at_the_same_seed() -> None:
    from prunedlora.adapters.lora import LoRALinear

    torch.manual_seed(1)
    lora = LoRALinear(nn.Linear(16, 12), 4, 8.0)
    torch.manual_seed(1)
    salr = SalrLinear(nn.Linear(16, 12), 3, 4, 8.0)
    assert torch.equal(salr.lora_A.weight, lora.lora_A.weight) and not salr.lora_B.weight.any()
    assert salr.scaling == lora.scaling


def test_task_dropout_leaves_the_residual_slice_alone() -> None:
    layer = SalrLinear(nn.Linear(16, 8), residual_rank=3, rank=2, alpha=2.0, dropout=0.9).train()
    with torch.no_grad():
        layer.residual_A.weight.normal_()
        layer.residual_B.weight.normal_()
    seen = []
    layer.bottleneck.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(5, 16)
    layer(x)
    torch.testing.assert_close(seen[0][:, :3], layer.residual_A(x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ whole method
def test_step_zero_equals_pruned_base_plus_truncated_residual(tokens: torch.Tensor) -> None:
    model, reference = tiny_llama(), tiny_llama()
    method = attach(model)
    wrappers = salr_modules(model)
    assert len(wrappers) == 14
    for name, wrapper in wrappers.items():
        w0 = reference.get_submodule(name).weight.detach()
        w_s = wrapper.base_layer.weight.detach()
        assert torch.all((w_s == 0) | (w_s == w0))  # W_s = M ⊙ W0
        e = w0 - w_s
        b, a = residual_factors(e, R_RES)
        torch.testing.assert_close(wrapper.delta_weight(), b @ a, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(w_s + b @ a)  # dense W_s + E_r
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)
    report = method.report(model)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3) and report["ranks"][name] == R_RES + RANK
    assert 0 < report["residual_error_ratio"] < 1 - R_RES / 32


def test_trainable_parameters_and_groups() -> None:
    model = tiny_llama()
    method = attach(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2] in {"lora_A", "lora_B", "residual_A", "residual_B"}
                             for n in trainable)
    task, residual = method.parameter_groups(model, weight_decay=0.1)
    assert task["weight_decay"] == 0.1 and residual["weight_decay"] == 0.0
    assert len(task["params"]) == len(residual["params"]) == 28

    frozen = tiny_llama()
    method = attach(frozen, residual_trainable=False)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".residual_" in n)
    assert len(method.parameter_groups(frozen, 0.1)) == 1


def test_checkpoint_holds_adapters_only_and_restores_them(tokens: torch.Tensor) -> None:
    model = tiny_llama()
    attach(model)
    randomize_b(model, pattern=TASK_B)
    state = adapter_state_dict(model)
    assert not any(k.endswith("base_layer.weight") for k in state)
    assert any(k.endswith("rank_scale") for k in state)
    resumed = tiny_llama()
    attach(resumed)  # a resume re-attaches (same pruning, same SVD), then loads the checkpoint
    load_adapter_state_dict(resumed, state)
    with torch.no_grad():
        torch.testing.assert_close(resumed(tokens).logits, model(tokens).logits, atol=0, rtol=0)


@pytest.mark.parametrize("scope", ["per_matrix", "global"])
def test_scopes_reach_the_target_sparsity(scope: str) -> None:
    model = tiny_llama()
    report = attach(model, final=0.4, scope=scope).report(model)
    assert report["sparsity"] == pytest.approx(0.4, abs=1e-3)
    per_matrix = list(report["sparsity_per_matrix"].values())
    if scope == "per_matrix":
        assert max(per_matrix) - min(per_matrix) < 1e-3
    else:
        assert max(per_matrix) - min(per_matrix) > 0.01  # one threshold, different matrices


def test_two_four_pattern_is_semi_structured() -> None:
    model = tiny_llama()
    report = attach(model, pattern="2:4").report(model)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for wrapper in salr_modules(model).values():
        w = wrapper.base_layer.weight
        assert torch.all((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2)


@pytest.mark.parametrize("base_format", ["bitmap", "fused", "auto"])
def test_sparse_base_formats_train_and_run_as_the_dense_base(base_format: str, tokens: torch.Tensor) -> None:
    """method.base_format: the same logits, loss and adapter gradients as the masked dense base (bitmap exactly;
    the fused kernel and tiled GEMMs sum in another order)."""
    dense = tiny_llama()  # seeds the RNG, so both task adapters start alike
    attach(dense)
    sparse = tiny_llama()
    attach(sparse, base_format=base_format)
    kinds = {"bitmap": (BitmapLinear,), "fused": (FusedBitmapLinear,), "auto": (FusedBitmapLinear, nn.Linear)}
    assert all(isinstance(w.base_layer, kinds[base_format]) for w in salr_modules(sparse).values())
    assert not any(".base_layer." in k for k in adapter_state_dict(sparse))  # the base stays out of checkpoints
    tol = {"atol": 0, "rtol": 0} if base_format == "bitmap" else {"atol": 1e-5, "rtol": 1e-5}
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens).logits, dense(tokens).logits, **tol)
        torch.testing.assert_close(sparse(tokens[:1, :1]).logits, dense(tokens[:1, :1]).logits, **tol)  # 1 token
    for model in (dense, sparse):
        model(tokens, labels=tokens).loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (dense, sparse)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 14
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)


def test_quantized_base_is_refused_with_a_clear_error() -> None:
    class Linear4bit(nn.Linear):  # stands in for bitsandbytes' packed layer
        pass

    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = Linear4bit(32, 32)
    with pytest.raises(ValueError, match="cannot be edited"):
        attach(model)


def test_residual_rank_larger_than_a_matrix_is_refused_before_pruning() -> None:
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ConfigError, match="method.residual_rank=40 exceeds min"):
        attach(model, residual_rank=40)  # k_proj/v_proj are 16x32
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.parametrize("overrides, final, fragment", [
    ({"pattern": "2:4"}, 0.3, "always prunes exactly 50%"),
    ({"pattern": "2:4", "scope": "global"}, 0.5, "method.scope=per_matrix"),
    ({"base_format": "semi_structured"}, 0.5, "needs method.pattern=2:4"),
    ({"residual_rank": -1}, 0.5, "method.residual_rank=-1"),
])
def test_validate_names_the_problem(overrides: dict, final: float, fragment: str) -> None:
    problems = salr_cfg(**overrides).validate(SparsityConfig(final=final))
    assert any(fragment in p for p in problems), problems
    assert salr_cfg().validate(SparsityConfig()) == []
    assert "prunes once" in salr_cfg().validate(SparsityConfig(schedule="cubic"))[0]
    assert salr_cfg().validate(SparsityConfig(schedule="one_shot")) == []
    assert [salr_cfg().schedule(SparsityConfig(schedule=s)) for s in ("auto", "one_shot", "none")] == [
        "one_shot", "one_shot", "none"]


def test_validate_is_wired_into_the_root_config() -> None:
    from prunedlora.config import RootConfig
    from prunedlora.validation import validate

    cfg = RootConfig(method=salr_cfg(pattern="2:4"), sparsity=SparsityConfig(final=0.3))
    with pytest.raises(ConfigError, match="2:4"):
        validate(cfg)


# -------------------------------------------------------------------------------------------- export
@pytest.fixture
def exported(tmp_path: Path, byte_tokenizer) -> tuple[nn.Module, Path, dict]:
    model = tiny_llama(tie=True)
    method = attach(model)
    randomize_b(model, pattern=TASK_B)
    figures = method.export(model, byte_tokenizer, tmp_path, "tiny")
    return model, tmp_path, figures


def test_export_loads_every_way_with_the_same_logits(exported, tokens: torch.Tensor) -> None:
    from peft import PeftModel

    model, run_dir, _ = exported
    assert salr_modules(model)  # export never merges or unwraps for good
    with torch.no_grad():
        ours = model(tokens).logits
        with plain_bases(model):
            pruned_base = model(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
        assert not getattr(base, "_hf_peft_config_loaded", False)  # model/ is the base alone: no adapter in it
        torch.testing.assert_close(base(tokens).logits, pruned_base, atol=1e-5, rtol=1e-5)
        served = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()  # what a server runs
        torch.testing.assert_close(served(tokens).logits, ours, atol=1e-5, rtol=1e-5)
        for where, base_format in ((run_dir, "dense"), (run_dir / "compressed", "bitmap")):
            rebuilt = load_salr_export(where, base_format=base_format)
            torch.testing.assert_close(rebuilt(tokens).logits, ours, atol=1e-5, rtol=1e-5)
        bare = load_salr_export(run_dir / "compressed", with_adapter=False)
        peft = PeftModel.from_pretrained(bare, str(run_dir / "compressed")).eval()
        torch.testing.assert_close(peft(tokens).logits, ours, atol=1e-5, rtol=1e-5)


def test_export_folders_hold_one_copy_each_in_their_clients_format(exported) -> None:
    model, run_dir, figures = exported
    model_dir, adapter_dir, compressed = run_dir / "model", run_dir / "adapter", run_dir / "compressed"
    # model/: a plain Hugging Face directory; vLLM reads every *.safetensors in it, so there is only the model's.
    assert [p.name for p in weight_files(model_dir)] == ["model.safetensors"]
    assert not (model_dir / "adapter_config.json").exists() and (model_dir / "tokenizer.json").is_file()
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    # adapter/: one LoRA of rank r_res + r, scaling 1 in every module (vLLM reads r and lora_alpha only).
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == R_RES + RANK and not config["rank_pattern"]
    assert not config["alpha_pattern"] and not config["use_rslora"] and config["bias"] == "none"
    assert not config["modules_to_save"] and config["base_model_name_or_path"] == str(model_dir.resolve())
    # compressed/: the bitmap form and its own adapter, all that load_salr_export reads.
    assert [p.name for p in weight_files(compressed)] == ["adapter_model.safetensors", BITMAP_FILE]
    assert (compressed / "config.json").is_file() and (compressed / "tokenizer.json").is_file()
    storage = json.loads((compressed / STORAGE_FILE).read_text())
    assert len(storage["matrices"]) == 14 and storage["total"]["bytes_bitmap"] == figures["bytes_bitmap"]
    assert figures["bitmap_ratio"] == pytest.approx(figures["bytes_bitmap"] / figures["bytes_dense"])
    files = figures["checkpoint_bytes"]
    assert files["bitmap_file_bytes"] == (compressed / BITMAP_FILE).stat().st_size
    assert files["ratio"] == pytest.approx(files["bitmap_file_bytes"] / files["dense_weight_bytes"])
    # model/ holds the dense model once, in the base's dtype: its file is the tensors plus a small header.
    params = sum(p.numel() for p in tiny_llama(tie=True).parameters())
    assert files["dense_weight_bytes"] == params * 4 <= (model_dir / "model.safetensors").stat().st_size
    assert (model_dir / "model.safetensors").stat().st_size < params * 4 + 16_384
    bitmaps, _ = load_bitmaps(compressed / BITMAP_FILE)
    for name, wrapper in salr_modules(model).items():  # the bitmap form is the trained base, bit for bit
        assert torch.equal(decode(bitmaps[f"{name}.weight"]), sparse_base_weight(wrapper.base_layer))
    exports = figures["exports"]
    assert {k: v["format"] for k, v in exports.items()} == {"model": "hf", "adapter": "adapter", "compressed": "bitmap"}
    assert exports["model"]["serve_with"] == "adapter" and exports["adapter"]["base"] == "model"
    assert exports["compressed"]["weight_bytes"] == files["bitmap_file_bytes"] + files["adapter_file_bytes"]


def test_model_dir_keeps_the_base_dtype(tmp_path: Path, byte_tokenizer) -> None:
    """A bfloat16 base is saved in bfloat16 (the adapters train in float32 and never reach model/)."""
    from safetensors import safe_open

    model = tiny_llama(tie=True).to(torch.bfloat16)
    attach(model).export(model, byte_tokenizer, tmp_path, "tiny", ("hf",))
    path = tmp_path / "model" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    params = sum(p.numel() for p in tiny_llama(tie=True).parameters())
    assert params * 2 < path.stat().st_size < params * 2 + 16_384


@pytest.mark.parametrize("formats", [("bitmap",), ("hf", "adapter")])
def test_export_writes_only_the_formats_asked_for(formats: tuple[str, ...], tmp_path: Path, byte_tokenizer,
                                                  tokens: torch.Tensor) -> None:
    model = tiny_llama(tie=True)
    method = attach(model)
    randomize_b(model, pattern=TASK_B)
    figures = method.export(model, byte_tokenizer, tmp_path, "tiny", formats)
    folders = {"hf": "model", "adapter": "adapter", "bitmap": "compressed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(folders[f] for f in formats)
    assert sorted(figures["exports"]) == sorted(folders[f] for f in formats)
    assert ("bitmap_ratio" in figures) == ("bitmap" in formats)
    if "bitmap" in formats:
        with torch.no_grad():
            torch.testing.assert_close(load_salr_export(tmp_path)(tokens).logits, model(tokens).logits, atol=1e-5,
                                       rtol=1e-5)


def test_load_salr_export_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="compressed/"):
        load_salr_export(tmp_path)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_semi_structured_linear_matches_dense() -> None:
    reason = semi_structured_available("cuda")
    if reason is not None:
        pytest.skip(reason)
    linear = nn.Linear(256, 128).cuda().half()
    prune_(linear.weight, two_four_mask(linear.weight))
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.half)
    torch.testing.assert_close(SemiStructuredLinear(linear)(x), linear(x), atol=1e-2, rtol=1e-2)


def test_semi_structured_off_cuda_says_why() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU test covers this path")
    assert "CUDA" in semi_structured_available("cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        SemiStructuredLinear(nn.Linear(8, 8))


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_run_writes_the_salr_run_directory_and_model_dir_evaluates_the_same(tmp_path: Path,
                                                                               data_root: Path) -> None:
    from cli_helpers import TINY, run_cli

    run_dir = tmp_path / "run"
    eval_args = ["eval.tasks=[wikitext2]", "eval.limit=2", "eval.seqlen=64"]
    proc = run_cli(["prunedlora-train", *TINY, "method=salr", "train.max_steps=5", *eval_args,
                    f"hydra.run.dir={run_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.jsonl", "checkpoints/step_0000005/state.pt", "adapter/adapter_config.json",
                 "model/config.json", "model/model.safetensors", f"compressed/{BITMAP_FILE}",
                 f"compressed/{STORAGE_FILE}", "compressed/adapter_model.safetensors", "summary.json"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "model" / "adapter_config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("sparsity", "sparsity_per_matrix", "bytes_dense", "bytes_bitmap", "bitmap_ratio", "ranks",
                "residual_error_ratio", "params_after_export", "exports", "checkpoint_bytes"):
        assert key in summary, key
    assert sorted(summary["exports"]) == ["adapter", "compressed", "model"]
    assert summary["method"] == "salr" and summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(summary["sparsity_per_matrix"]) == 14

    # prunedlora-eval loads model/ with adapter/ on top through PEFT (what a server runs): same perplexity
    eval_dir = tmp_path / "eval"
    proc = run_cli(["prunedlora-eval", f"run_dir={run_dir}", *eval_args, "logging.progress=false",
                    f"hydra.run.dir={eval_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads((eval_dir / "eval" / "results.json").read_text())["results"]["wikitext2"]["ppl"]
    assert reloaded == pytest.approx(summary["eval"]["wikitext2"]["ppl"], rel=1e-4)
