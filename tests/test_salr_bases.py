"""SALR's base criteria beyond the paper (docs/methods.md Decisions item 0): Wanda, SparseGPT, their calibration pass,
the quantized sparse base, and ``train.max_steps=0``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.salr import residual_factors, salr_modules
from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.base import AttachContext
from prunedlora.methods.salr.config import SalrConfig
from prunedlora.methods.salr.export import export_salr
from prunedlora.methods.salr.formats import sparse_base_weight
from prunedlora.methods.salr.method import SalrMethod
from prunedlora.pruning.activation_aware import (
    _inverse_cholesky,
    _lowest_out,
    sparsegpt_factor,
    sparsegpt_prune,
    wanda_mask,
)
from prunedlora.pruning.base_criteria import pruned_weights
from prunedlora.pruning.calibration import calibration_rows, collect_input_stats
from prunedlora.pruning.magnitude import per_matrix_mask, two_four_mask

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def examples(n: int = 12, length: int = 20, seed: int = 5) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (length,), generator=gen).tolist()} for _ in range(n)]


def attach(model: nn.Module, criterion: str, pattern: str = "unstructured", quantization: str = "none",
           final: float = 0.5) -> SalrMethod:
    cfg = SalrConfig(residual_rank=4, rank=4, alpha=8.0, base_criterion=criterion, pattern=pattern,
                     calibration_sequences=8)
    method = build_method(cfg, SparsityConfig(final=final))
    method.prepare(AttachContext(examples(), seq_len=16, quantization=quantization))
    method.attach(model)
    return method


def calibration_problem(d_out: int = 24, d_in: int = 32, tokens: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and inputs with correlated features of very different scales (as LLM activations have)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen)
    mixing = torch.randn(d_in, d_in, generator=gen) / d_in ** 0.5 + torch.eye(d_in)
    scales = torch.exp(torch.randn(d_in, generator=gen))  # log-normal feature scales
    x = (torch.randn(tokens, d_in, generator=gen) @ mixing) * scales  # (tokens, d_in)
    return weight, x


# ------------------------------------------------------------------------------------------ criteria
@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5)])
def test_activation_aware_criteria_reach_the_pattern_and_beat_magnitude_in_reconstruction(
        pattern: str, sparsity: float) -> None:
    weight, x = calibration_problem()
    sq_norm, gram = x.square().sum(0), x.T @ x
    magnitude = weight.masked_fill(~(two_four_mask(weight) if pattern == "2:4" else per_matrix_mask(weight, sparsity)),
                                   0.0)
    wanda = weight.masked_fill(~wanda_mask(weight, sq_norm, sparsity, pattern), 0.0)
    sparsegpt = sparsegpt_prune(weight, gram, sparsity, pattern, block=8)  # 4 blocks: lazy updates are exercised
    for pruned in (magnitude, wanda, sparsegpt):
        if pattern == "2:4":
            assert torch.all((pruned.view(24, 8, 4) == 0).sum(-1) == 2)  # exactly 2 of every 4
        else:
            assert int((pruned == 0).sum()) == round(sparsity * weight.numel())
    error = {name: float(((weight - w) @ x.T).norm()) for name, w in
             (("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt))}
    assert error["sparsegpt"] <= error["wanda"] <= error["magnitude"], error
    kept = sparsegpt != 0
    assert not torch.equal(sparsegpt[kept], weight[kept])  # the OBS updates moved the surviving weights


def test_wanda_compares_within_rows() -> None:
    weight, x = calibration_problem()
    mask = wanda_mask(weight, x.square().sum(0), 0.5, "unstructured")
    assert torch.all(mask.sum(1) == 16)  # every output row keeps half
    score = weight.abs() * x.norm(dim=0)
    pruned_max = score.masked_fill(mask, float("-inf")).amax(1)
    assert torch.all(pruned_max <= score.masked_fill(~mask, float("inf")).amin(1))


def test_sparsegpt_without_correlation_or_damping_is_wanda_squared() -> None:
    """With a diagonal H (uncorrelated features) nothing can be compensated: OBS removes by w² H_jj, Wanda's
    ranking, and leaves the kept weights alone."""
    weight, _ = calibration_problem()
    sq_norm = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(1)))
    pruned = sparsegpt_prune(weight, torch.diag(sq_norm), 0.5, "2:4", damp=0.0)
    expected = weight.masked_fill(~wanda_mask(weight, sq_norm, 0.5, "2:4"), 0.0)
    torch.testing.assert_close(pruned, expected)


def test_sparsegpt_lazy_blocks_and_a_shared_factor_change_nothing() -> None:
    """2:4 picks its mask every 4 columns whatever the block, so the lazy block updates must give the result of
    one block over all columns; and a factor computed once for several linears of one input is the same."""
    weight, x = calibration_problem()
    gram = x.T @ x
    one_block = sparsegpt_prune(weight, gram, 0.5, "2:4", block=32)
    torch.testing.assert_close(sparsegpt_prune(weight, gram, 0.5, "2:4", block=8), one_block, rtol=1e-5, atol=1e-5)
    factor = sparsegpt_factor(gram)
    assert torch.equal(sparsegpt_prune(weight, None, 0.5, "2:4", block=32, factor=factor), one_block)
    u = _inverse_cholesky(gram, 0.01)  # upper, U^T U = (H + damping)^-1
    damped = gram.double() + 0.01 * float(gram.diagonal().mean()) * torch.eye(32, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped))


def test_lowest_out_prunes_exactly_n_and_breaks_ties_by_position() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 1.0], [1.0, 0.0, 1.0, 5.0]])
    for n in range(9):
        expected = torch.ones(8, dtype=torch.bool)
        expected[torch.argsort(scores.flatten(), stable=True)[:n]] = False
        assert torch.equal(_lowest_out(scores, n), expected.view(2, 4)), n


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_rows_concatenate_the_examples_without_padding() -> None:
    rows = calibration_rows([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8]}], 2, 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert calibration_rows([{"input_ids": [1, 2, 3, 4, 5]}], 3, 2).shape == (2, 2)  # what the data holds


def test_collected_statistics_are_the_inputs_of_each_linear_and_shared_inputs_are_aliased() -> None:
    model = tiny_llama()
    layer = model.model.layers[1]
    targets = {f"model.layers.1.{path}": layer.get_submodule(path) for path in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: seen[n].append(args[0].detach()))
               for name, m in targets.items()]
    rows = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(model, targets, rows, gram=True, batch_size=2)
    for handle in handles:
        handle.remove()
    for name in targets:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]])  # (80, d_in)
        assert stats[name].tokens == 80
        torch.testing.assert_close(stats[name].sq_norm, x.square().sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[name].gram, x.T @ x, rtol=1e-5, atol=1e-4)
    assert stats["model.layers.1.self_attn.k_proj"] is stats["model.layers.1.self_attn.q_proj"]  # one input
    assert stats["model.layers.1.self_attn.o_proj"] is not stats["model.layers.1.self_attn.q_proj"]


# ------------------------------------------------------------------------------------------ the method
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_salr_prunes_with_the_criterion_and_starts_from_the_svd_of_its_residual(criterion: str, pattern: str) -> None:
    model, reference = tiny_llama(), tiny_llama()
    method = attach(model, criterion, pattern)
    rows = calibration_rows(examples(), 8, 16)
    targets = {name: reference.get_submodule(name) for name in salr_modules(model)}
    stats = collect_input_stats(reference, targets, rows, gram=criterion == "sparsegpt")
    expected = dict(pruned_weights(targets, criterion, 0.5, "per_matrix", pattern, stats))
    for name, wrapper in salr_modules(model).items():
        w_s = wrapper.base_layer.weight.detach()
        torch.testing.assert_close(w_s, expected[name], atol=1e-6, rtol=0)
        assert int((w_s == 0).sum()) == w_s.numel() // 2
        b, a = residual_factors(reference.get_submodule(name).weight.detach() - w_s, 4)
        torch.testing.assert_close(wrapper.delta_weight(), b @ a, atol=1e-5, rtol=1e-5)
    assert method.report(model)["sparsity"] == pytest.approx(0.5)


def test_activation_aware_criteria_without_calibration_data_are_refused() -> None:
    method = build_method(SalrConfig(base_criterion="wanda"), SparsityConfig(final=0.5))
    with pytest.raises(ConfigError, match="method.base_criterion=wanda"):
        method.attach(tiny_llama())
    problems = SalrConfig(base_criterion="sparsegpt", scope="global").validate(SparsityConfig(final=0.5))
    assert any("method.scope=global needs method.base_criterion=magnitude" in p for p in problems)
    assert any("is not one of" in p for p in SalrConfig(base_criterion="obs").validate(SparsityConfig()))


@pytest.mark.parametrize(("quantization", "hidden", "layout"), [
    ("nf4", 32, "cpu"),  # in_features 32 < the block of 64: bitsandbytes' CPU repack cannot hold it, never repacks
    ("nf4", 64, "standard"),  # forced on any CPU
    ("nf4", 64, "repacked"),  # by the eval forward where the CPU has the kernel, else by bitsandbytes' repack itself
    ("int8", 32, "cpu"),
])
def test_quantized_sparse_base_keeps_pruned_entries_exactly_zero(quantization: str, hidden: int, layout: str,
                                                                 tmp_path: Path, byte_tokenizer) -> None:
    """Train, evaluate, train again, evaluate (an eval forward may repack 4-bit weights, a training one must
    then work), then read the base: pruned entries exactly zero in each bitsandbytes layout, export included."""
    pytest.importorskip("bitsandbytes")
    from bnb_layouts import four_bit_layers, no_cpu_repack, repack, repack_kernel_here

    from prunedlora.models.quantize import cpu_repack_fits, is_repacked

    float_model, model = tiny_llama(hidden), tiny_llama(hidden)
    attach(float_model, "wanda")
    with no_cpu_repack() if layout == "standard" else contextlib.nullcontext():
        attach(model, "wanda", quantization=quantization)
        x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
        for _ in range(2):
            model.train()
            model.zero_grad()
            model(input_ids=x, labels=x).loss.backward()  # trains through the quantized base
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
    layers = four_bit_layers(model)
    if layout == "repacked":
        assert sorted(repack(model)) == sorted(layers)
    else:  # "cpu": the shapes it can hold (down_proj) repack where the CPU has the kernel, the others never
        fitting = {n for n, m in layers.items() if cpu_repack_fits(m)} if layout == "cpu" else set()
        assert {n for n, m in layers.items() if is_repacked(m)} == (fitting if repack_kernel_here() else set())
    for name, wrapper in salr_modules(model).items():
        assert type(wrapper.base_layer).__name__ == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
        reference = salr_modules(float_model)[name]
        pruned = reference.base_layer.weight == 0
        quantized = sparse_base_weight(wrapper.base_layer)
        assert torch.all(quantized[pruned] == 0)  # exact zeros, after training and eval forwards
        assert torch.count_nonzero(quantized[~pruned]) > 0.95 * int((~pruned).sum())
        # the residual adapter comes from the float residual, not from the quantized weights
        torch.testing.assert_close(wrapper.delta_weight(), reference.delta_weight(), atol=0, rtol=0)
        assert wrapper.residual_A.weight.grad is not None
    figures = export_salr(model, byte_tokenizer, tmp_path)  # a float model of the dequantized sparse base
    assert figures["bitmap_ratio"] < 1


# ------------------------------------------------------------------------------------------ max_steps=0
@pytest.mark.slow
@pytest.mark.parametrize("method", ["salr", "lora", "adalora", "loraprune"])
def test_zero_steps_evaluates_the_starting_model(method: str, tmp_path: Path, data_root: Path) -> None:
    from cli_helpers import TINY, run_cli

    run_dir = tmp_path / "run"
    extra = ["method.base_criterion=sparsegpt"] if method == "salr" else []
    proc = run_cli(["prunedlora-train", *TINY, f"method={method}", *extra, "train.max_steps=0",
                    "eval.tasks=[wikitext2]", "eval.limit=2", "eval.seqlen=64", f"hydra.run.dir={run_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["final_loss"] is None
    assert summary["eval"]["wikitext2"]["ppl"] > 1
    assert (run_dir / "model" / "config.json").exists()
    if method == "salr":
        assert summary["sparsity"] == pytest.approx(0.5)


def test_a_quantized_base_must_use_the_dense_base_format() -> None:
    method = build_method(SalrConfig(base_format="bitmap", base_criterion="magnitude"), SparsityConfig(final=0.5))
    with pytest.raises(ConfigError, match="method.base_format=bitmap with model.quantization=nf4"):
        method.prepare(AttachContext(quantization="nf4"))
