"""Every method on a bitsandbytes nf4 base (CPU): it trains and exports, or says clearly why not."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
from recipe_helpers import TINY_OVERRIDES, compose_root

from prunedlora.config import ConfigError, RootConfig
from prunedlora.methods import METHODS
from prunedlora.train.recipe import run

# Methods that edit base weights in place cannot prune packed 4-bit weights (bitsandbytes packs two per byte); they
# must refuse with an error that names the quantization, not crash. (SALR prunes the float base, then quantizes it.)
REFUSES_QUANTIZED: set[str] = set()


def _cfg(method: str, data_root: Path) -> RootConfig:
    cfg = compose_root([*TINY_OVERRIDES, f"method={method}", "model.quantization=nf4", "train.optimizer=adamw8bit"],
                       data_root)
    extra = {"adalora": 40, "prunedlora": 20, "loraprune": 20}.get(method, 3)
    return replace(cfg, train=replace(cfg.train, max_steps=extra, save_every=1000))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_an_nf4_base(method: str, tmp_path: Path, data_root: Path) -> None:
    cfg = _cfg(method, data_root)
    if method in REFUSES_QUANTIZED:
        with pytest.raises(ConfigError, match="quantiz"):
            run(cfg, tmp_path)
        return
    summary = run(cfg, tmp_path)
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]  # not NaN
    assert (tmp_path / "model" / "config.json").is_file()
    if method == "loraprune":
        return
    if method == "salr":  # pruned in float, then quantized: every pruned zero survives; NF4 rounds a few small
        assert 0.5 <= summary["sparsity"] < 0.53  # kept weights to its zero code as well
        return
    # The merged float export equals the nf4 base + the exported adapter (the QLoRA deployment pair).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunedlora.models.load import load_model

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    for dequantize, atol in ((True, 1e-5), (False, 2e-2)):  # bnb's CPU 4-bit kernel differs by ~1e-3
        base, _ = load_model(cfg.model)
        if dequantize:
            base.dequantize()
        with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, with_adapter(input_ids=ids).logits, atol=atol, rtol=0)


# ------------------------------------------------------------------------ bitsandbytes' two CPU layouts
def _sparse_linear(d_in: int = 128, d_out: int = 64):
    """A float linear with a third of its weights exactly zero (as a pruned base has)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=gen).masked_fill(
            torch.rand(d_out, d_in, generator=gen) < 1 / 3, 0.0))
    return linear


def _holder(layer):
    """``layer`` as the ``proj`` of a minimal model (``dequantize_linears`` reads the embeddings' dtype)."""
    from torch import nn

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.proj = nn.Embedding(2, 4), layer

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

    return Holder()


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_every_reader_of_a_4bit_weight_reads_both_layouts(kind: str) -> None:
    """On any CPU: bitsandbytes' repack (called directly) changes what the weight's readers see only by the bf16
    rounding of its block scales; zeros stay exactly zero. Read through dequantized_weight, state_dict() (PEFT's
    and transformers' saves; bitsandbytes' own restore misorders the scales) and dequantize_linears (exports)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    import torch
    from bnb_layouts import no_cpu_repack, repack
    from torch import nn

    from prunedlora.models.load import count_parameters
    from prunedlora.models.quantize import is_repacked, quantize_linear
    from prunedlora.models.surgery import dequantize_linears, dequantized_weight

    linear = _sparse_linear()
    zeros = linear.weight == 0
    with no_cpu_repack():
        standard = _holder(quantize_linear(linear, kind))
        packed = [_holder(quantize_linear(linear, kind)) for _ in range(3)]
    expected = dequantized_weight(standard.proj)
    assert torch.all(expected[zeros] == 0)
    read = {}
    for model in packed:
        assert repack(model) == ["proj"] and is_repacked(model.proj)
        assert count_parameters(model) == count_parameters(standard)
    read["dequantized_weight"] = dequantized_weight(packed[0].proj)
    state = packed[1].state_dict()
    read["state_dict"] = bnbf.dequantize_4bit(state["proj.weight"], packed[1].proj.weight.quant_state).float()
    assert dequantize_linears(packed[2]) == 1 and type(packed[2].proj) is nn.Linear
    read["dequantize_linears"] = packed[2].proj.weight
    for how, weight in read.items():
        assert torch.all(weight[zeros] == 0), how
        torch.testing.assert_close(weight, expected, rtol=2**-8, atol=0, msg=how)  # bf16 block scales
    assert not is_repacked(packed[0].proj) and not is_repacked(packed[1].proj)  # back in the standard layout


def test_a_forward_with_gradients_after_a_repack_trains_in_the_standard_layout() -> None:
    """An evaluation repacks; training (or any forward needing gradients) afterwards would fail in bitsandbytes'
    repacked kernel: the layer goes back to the standard layout first and computes in float32 (any CPU)."""
    pytest.importorskip("bitsandbytes")
    import torch
    from bnb_layouts import no_cpu_repack, repack

    from prunedlora.models.quantize import is_repacked, quantize_linear
    from prunedlora.models.surgery import dequantized_weight

    with no_cpu_repack():
        layer = quantize_linear(_sparse_linear(), "nf4")
    repack(_holder(layer))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = layer.train()(x)
    assert not is_repacked(layer)
    weight = dequantized_weight(layer)
    torch.testing.assert_close(out, x @ weight.T + layer.bias, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(4, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["standard", "repacked"])
def test_an_eval_forward_in_each_layout_matches_the_dequantized_weight(layout: str) -> None:
    """standard (forced on any CPU): bitsandbytes multiplies the dequantized weight in float32; repacked (where
    the CPU has the kernel): its first eval forward without gradients repacks, and computes in bf16."""
    pytest.importorskip("bitsandbytes")
    import torch
    from bnb_layouts import no_cpu_repack, skip_without_repack_kernel

    from prunedlora.models.quantize import is_repacked, quantize_linear
    from prunedlora.models.surgery import dequantized_weight

    if layout == "repacked":
        skip_without_repack_kernel()
    context = no_cpu_repack() if layout == "standard" else contextlib.nullcontext()
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    with context:
        layer = quantize_linear(_sparse_linear(), "nf4").eval()
        with torch.no_grad():
            out = layer(x)
    assert is_repacked(layer) == (layout == "repacked")
    reference = x @ dequantized_weight(layer).T + layer.bias  # after the repack: its bf16-rounded block scales
    if layout == "standard":
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    else:  # the fused kernel takes and returns bf16 (8 significant bits): within a few bf16 roundings
        assert float((out - reference).norm() / reference.norm()) < 2**-7


def test_shapes_the_repack_cannot_hold_keep_the_standard_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes' repack needs out_features % 32 == 0 and in_features % 64 == 0 and does not check: on any CPU
    it fails on other shapes (the error an eval forward raised on AVX512-BF16 CPUs). quantize_linear (SALR) and
    the quantized load turn the repack off there, as if this CPU had the kernel, so a forward runs everywhere."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    from bnb_layouts import four_bit_layers, no_cpu_repack

    from prunedlora.config import ModelConfig, TinyModelConfig
    from prunedlora.models.load import load_model
    from prunedlora.models.quantize import is_repacked, quantize_linear
    from prunedlora.models.surgery import dequantized_weight

    odd = [(32, 64), (96, 64), (64, 48)]  # (in, out): in < block, in not a multiple of 64, out not of 32
    for d_in, d_out in odd:
        with no_cpu_repack():
            layer = quantize_linear(_sparse_linear(d_in, d_out), "nf4")
        with pytest.raises((RuntimeError, AssertionError)):
            bnb.functional._convert_weight_packed_for_cpu(layer.weight.data.clone(), layer.weight.quant_state)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # every layer built now would repack
    assert quantize_linear(_sparse_linear(128, 64), "nf4").support_avx512bf16_for_cpu  # a fitting shape still may
    for d_in, d_out in odd:
        layer = quantize_linear(_sparse_linear(d_in, d_out), "nf4").eval()
        assert not layer.support_avx512bf16_for_cpu
        x = torch.randn(3, d_in)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ dequantized_weight(layer).T + layer.bias, atol=1e-5, rtol=1e-5)
        assert not is_repacked(layer)
    model, _ = load_model(ModelConfig(name="tiny", name_or_path="tiny", quantization="nf4",
                                      tiny=TinyModelConfig(hidden_size=48, intermediate_size=96)))
    assert four_bit_layers(model) and not any(m.support_avx512bf16_for_cpu for m in four_bit_layers(model).values())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randint(3, 200, (1, 8))).logits).all()


@pytest.mark.parametrize("layout", ["standard", "repacked"])
@pytest.mark.parametrize("entry", ["salr_run", "evaluate"])
def test_evaluation_of_an_nf4_base_in_each_layout(entry: str, layout: str, tmp_path: Path, data_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where evaluation meets a 4-bit base (whose eval-mode forwards repack where the CPU has the kernel): a salr
    run (train, export, evaluate; the other methods export, and evaluate, a dequantized model) and the evaluation
    of an nf4 model as ``prunedlora-eval`` does it. ``standard`` is forced on any CPU and must never repack."""
    pytest.importorskip("bitsandbytes")
    import math

    import bitsandbytes.nn.modules as bnb_modules
    from bnb_layouts import no_cpu_repack, skip_without_repack_kernel

    from prunedlora.eval.runner import evaluate
    from prunedlora.models.load import load_model

    if layout == "repacked":
        skip_without_repack_kernel()
    repacked, repack = [], bnb_modules._convert_weight_packed_for_cpu
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu",
                        lambda *args, **kwargs: repacked.append(1) or repack(*args, **kwargs))
    cfg = compose_root([*TINY_OVERRIDES, "method=salr", "model.quantization=nf4", "train.max_steps=2",
                        "train.save_every=1000", "eval.enabled=true", "eval.tasks=[wikitext2]", "eval.limit=2",
                        "eval.seqlen=64"], data_root)
    with no_cpu_repack() if layout == "standard" else contextlib.nullcontext():
        if entry == "salr_run":
            ppl = run(cfg, tmp_path)["eval"]["wikitext2"]["ppl"]
        else:
            model, tokenizer = load_model(cfg.model)
            results = evaluate(model.eval(), tokenizer, ["wikitext2"], cfg.eval, cfg.data, tmp_path, model_id="tiny",
                               progress=False)
            ppl = results["wikitext2"]["ppl"]
    assert math.isfinite(ppl) and ppl > 1
    assert (len(repacked) > 0) == (layout == "repacked")


# ------------------------------------------------------------------------ distillation on an nf4 base
# LoRAPrune's progressive schedule, a pruning event at each of the 3 steps; its default is the one-shot cut
LORAPRUNE_PROGRESSIVE = ["sparsity=cubic", "sparsity.every=1", "method.criterion=channel_taylor", "method.refit=false",
                         "method.gqa_balanced=false"]


@pytest.mark.parametrize("case", ["lora", "loraprune-progressive", "loraprune", "salr"])
def test_distillation_on_an_nf4_base_has_the_quantized_base_as_its_teacher(case: str, tmp_path: Path,
                                                                           data_root: Path) -> None:
    """LoRA's and progressive LoRAPrune's teacher is the nf4 base itself (step 1's KL is exactly 0: B = 0, nothing
    pruned yet); one-shot LoRAPrune's a copy of the unpruned base, held in nf4 as the base is (the cut was made
    before training); SALR's the dense weights quantized to nf4 as the base would be (a quarter of their bf16 size,
    plus the scales); and all train."""
    import math

    from recipe_helpers import metric_records

    method = case.split("-")[0]
    extra = LORAPRUNE_PROGRESSIVE if case == "loraprune-progressive" else []
    cfg = compose_root([*TINY_OVERRIDES, f"method={method}", "model.quantization=nf4", "recovery=mix",
                        "train.max_steps=3", "train.packing=true", "train.save_every=1000", *extra], data_root)
    summary = run(cfg, tmp_path)
    records = metric_records(tmp_path)
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "loss_ce", "loss_kl"))
    held = summary["recovery"]["teacher_held_mb"] * 2**20
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # tiny's q, o, k, v, gate, up, down in 2 layers
    if case in ("lora", "loraprune-progressive"):
        assert records[0]["loss_kl"] == 0.0 and records[-1]["loss_kl"] > 0 and held == 0
    elif case == "loraprune":
        assert summary["recovery"]["teacher"] == "copy" and records[0]["loss_kl"] > 0
        assert 0 < held < 2 * summary["params_total"]  # below a bf16 copy: its linears are held in 4 bits
    else:
        assert records[0]["loss_kl"] > 0 and held == weights / 2 + 4 * weights / 64  # 4 bits + a float32 per 64


def test_salr_teacher_on_an_nf4_base_is_the_nf4_unpruned_model() -> None:
    """The dense copies quantized by SALR give the logits of the same base loaded in nf4 by transformers."""
    import torch

    from prunedlora.config import ModelConfig, SparsityConfig
    from prunedlora.methods.base import AttachContext, TeacherStorage
    from prunedlora.methods.salr.config import SalrConfig
    from prunedlora.methods.salr.method import SalrMethod
    from prunedlora.models.load import load_model
    from prunedlora.models.quantize import cpu_repack_disabled
    from prunedlora.train.objective import SwitchedTeacher

    model_cfg = ModelConfig(name="tiny", name_or_path="tiny")
    model, _ = load_model(model_cfg)
    method = SalrMethod(SalrConfig(base_criterion="magnitude"), SparsityConfig(final=0.5))
    method.prepare(AttachContext(quantization="nf4", teacher=TeacherStorage()))
    method.attach(model)
    reference, _ = load_model(replace(model_cfg, quantization="nf4"))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_repack_disabled(reference):  # the kernel the teacher uses (and training)
        teacher = SwitchedTeacher(model, method).logits(model, {"input_ids": ids})
        torch.testing.assert_close(teacher, reference.eval()(ids).logits, atol=1e-6, rtol=0)
        assert not torch.allclose(model.eval()(ids).logits, teacher, atol=1e-2)  # the student is the pruned one
