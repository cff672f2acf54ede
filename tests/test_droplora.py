"""DropLoRA (docs/methods.md §4): eval is plain LoRA, training masks the bottleneck, both mask modes, export, resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import randomize_b
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.droplora import ElementDropout, RankDropout, bottleneck_dropout
from prunedlora.adapters.lora import LoRALinear, lora_modules, merge_lora
from prunedlora.config import SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.droplora.config import DropLoraConfig
from prunedlora.methods.droplora.method import DropLoraMethod, RankMaskSampler
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict
from prunedlora.train.engine import TorchEngine
from prunedlora.train.loop import optimizer_step

VOCAB = 97
MODES = ["element", "rank"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def droplora_cfg(mask_mode: str, p: float = 0.5) -> DropLoraConfig:
    # Input dropout off, so every difference between forwards comes from the bottleneck mask.
    return DropLoraConfig(rank=8, alpha=16.0, p=p, mask_mode=mask_mode, dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


def attach(model: nn.Module, mask_mode: str, seed: int = 0, p: float = 0.5) -> DropLoraMethod:
    torch.manual_seed(seed)  # as the recipe does before attach: it seeds the rank-mask generator too
    method = build_method(droplora_cfg(mask_mode, p), SparsityConfig())
    method.attach(model)
    randomize_b(model)
    return method


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def start(method: DropLoraMethod, model: nn.Module) -> list:
    callbacks = method.callbacks()
    for cb in callbacks:
        cb.on_train_start(model, None, 10)
    return callbacks


# ------------------------------------------------------------------------------------------ eval mode
@pytest.mark.parametrize("mask_mode", MODES)
def test_eval_is_deterministic_and_equals_the_merged_model(mask_mode: str, tokens: torch.Tensor) -> None:
    model = tiny_llama()
    method = attach(model, mask_mode)
    start(method, model)
    model.eval()
    with torch.no_grad():
        first, second = model(tokens).logits, model(tokens).logits
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        merged = merge_lora(copy.deepcopy(model))(tokens).logits
    torch.testing.assert_close(first, merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask_mode", MODES)
def test_training_outputs_depend_on_the_seed(mask_mode: str, tokens: torch.Tensor) -> None:
    def train_logits(seed: int) -> torch.Tensor:
        model = tiny_llama()
        method = attach(model, mask_mode, seed=seed)
        model.train()
        start(method, model)
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(tokens).logits

    a, b, again = train_logits(1), train_logits(2), train_logits(1)
    torch.testing.assert_close(a, again, atol=0, rtol=0)
    assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------- expectation
@pytest.mark.parametrize("mask_mode", MODES)
def test_inverted_scaling_preserves_the_expectation(mask_mode: str) -> None:
    """Mean of many training forwards ≈ the eval forward, within 5 standard errors per output entry."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    layer.bottleneck = bottleneck_dropout(mask_mode, 4, p=0.5)
    x = torch.randn(3, 16)
    n = 4000
    with torch.no_grad():
        expected = layer.eval()(x)  # (3, 12)
        layer.train()
        if mask_mode == "element":  # each copy of x gets its own per-token mask: one batched forward
            samples = layer(x.expand(n, 3, 16))  # (n, 3, 12)
        else:
            gen = torch.Generator().manual_seed(0)
            samples = torch.stack([_resampled(layer, gen)(x) for _ in range(n)])
    standard_error = samples.std(dim=0) / n**0.5
    assert (samples.std(dim=0) > 0).all(), "training forwards must be random"
    assert ((samples.mean(dim=0) - expected).abs() <= 5 * standard_error + 1e-6).all()


def _resampled(layer: LoRALinear, gen: torch.Generator) -> LoRALinear:
    layer.bottleneck.resample_(gen)
    return layer


# ------------------------------------------------------------------------------------------ mask modes
class MaskRecorder:
    """Forward hooks on every bottleneck: the applied mask ``out / in`` (shape (B, T, r)) per forward."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: list[list[torch.Tensor]] = []  # per forward call of the model, per module
        self._current: list[torch.Tensor] = []
        self.handles = [m.bottleneck.register_forward_hook(self._hook) for m in lora_modules(model).values()]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self._current.append((output / inputs[0]).detach())

    def end_forward(self) -> None:
        self.masks.append(self._current)
        self._current = []


class GradRecorder:
    """Records, before each optimizer step, which components are masked and their gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(lora_modules(model).values())
        self.records: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

    def on_before_optimizer_step(self, step: int) -> dict:
        self.records.append([(m.bottleneck.keep.clone(), m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone())
                             for m in self.modules])
        return {}

    def on_step_end(self, step: int) -> dict:
        return {}


def test_rank_mode_shares_one_mask_per_step_and_zero_masked_components_get_no_gradient(
        tokens: torch.Tensor) -> None:
    model = tiny_llama()
    method = attach(model, "rank")
    model.train()
    grads = GradRecorder(model)
    callbacks = [grads, *start(method, model)]  # the sampler's on_step_end runs after the recorder's hook
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    recorder, steps, accum = MaskRecorder(model), 3, 3
    engine = TorchEngine(model, optimizer, scheduler, grad_accum=accum, max_grad_norm=1.0,
                         device=torch.device("cpu"), bf16=False)
    for step in range(1, steps + 1):
        for micro in range(accum):
            ids = tokens.roll(micro, dims=1)
            engine.micro_step({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)},
                              boundary=micro == accum - 1)
            recorder.end_forward()
        optimizer_step(engine, callbacks, step)

    per_step = [recorder.masks[s * accum:(s + 1) * accum] for s in range(steps)]
    for forwards in per_step:
        first = forwards[0]
        for mask in first:  # one r-vector per module: the same for every token of the micro-batch
            torch.testing.assert_close(mask, mask[:1, :1].expand_as(mask))
        for other in forwards[1:]:  # and for every micro-batch of the step
            for a, b in zip(first, other):
                torch.testing.assert_close(a[0, 0], b[0, 0])
    vectors = [torch.cat([m[0, 0] for m in forwards[0]]) for forwards in per_step]
    assert not torch.equal(vectors[0], vectors[1]) and not torch.equal(vectors[1], vectors[2])
    assert set(torch.unique(vectors[0]).tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)

    for record in grads.records:
        for keep, grad_a, grad_b in record:
            dropped, kept = keep == 0, keep > 0
            assert dropped.any() or kept.all()
            assert (grad_a[dropped] == 0).all() and (grad_b[:, dropped] == 0).all()
            assert grad_a[kept].abs().sum() > 0 and grad_b[:, kept].abs().sum() > 0


def test_element_mode_mask_differs_across_tokens(tokens: torch.Tensor) -> None:
    model = tiny_llama()
    attach(model, "element")
    model.train()
    recorder = MaskRecorder(model)
    with torch.no_grad():
        model(tokens)
    recorder.end_forward()
    mask = recorder.masks[0][0]  # (B, T, r) of the first module
    assert set(torch.unique(mask.round(decimals=4)).tolist()) == {0.0, 2.0}
    rows = mask.reshape(-1, mask.shape[-1])  # one r-vector per token
    assert len({tuple(row.tolist()) for row in rows}) > rows.shape[0] // 2


def test_element_mode_gradient_checkpointing_recomputes_the_same_mask(tokens: torch.Tensor) -> None:
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model = tiny_llama()
        attach(model, "element")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        model(tokens, labels=tokens).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for plain, recomputed in zip(grads(False), grads(True)):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- resume
def test_rank_mask_sampler_resumes_exactly() -> None:
    """Sampler state + checkpointed adapter (keep buffers) -> the same masks as an uninterrupted run."""
    def masks(model: nn.Module) -> torch.Tensor:
        return torch.cat([m.bottleneck.keep for m in lora_modules(model).values()])

    model = tiny_llama()
    method = attach(model, "rank", seed=11)
    (sampler,) = start(method, model)
    for step in range(1, 4):
        sampler.on_step_end(step)
    saved_cb, saved_adapter = copy.deepcopy(sampler.state_dict()), adapter_state_dict(model)
    expected = [masks(model).clone()]
    for step in range(4, 7):
        sampler.on_step_end(step)
        expected.append(masks(model).clone())

    resumed = tiny_llama()
    resumed_method = attach(resumed, "rank", seed=99)  # a different seed: everything must come from the state
    (resumed_sampler,) = resumed_method.callbacks()
    load_adapter_state_dict(resumed, saved_adapter)
    resumed_sampler.load_state_dict(saved_cb)
    resumed_sampler.on_train_start(resumed, None, 10)  # must keep the restored mask of the next step
    got = [masks(resumed).clone()]
    for step in range(4, 7):
        resumed_sampler.on_step_end(step)
        got.append(masks(resumed).clone())
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert isinstance(resumed_sampler, RankMaskSampler)


# ------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("mask_mode", MODES)
def test_export_is_plain_lora_loadable_in_peft(mask_mode: str, tmp_path: Path, tokens: torch.Tensor,
                                               byte_tokenizer) -> None:
    from peft import PeftModel

    base = tiny_llama()
    model = copy.deepcopy(base)
    method = attach(model, mask_mode)
    start(method, model)
    model.eval()
    with torch.no_grad():
        ours = model(tokens).logits
    assert method.report(model)["ranks"] == {n: 8 for n in lora_modules(model)}
    method.export(model, byte_tokenizer, tmp_path, "tiny")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(tokens).logits, ours, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- config
def test_config_validation_and_mask_modules() -> None:
    problems = DropLoraConfig(p=1.0, mask_mode="token").validate(SparsityConfig())
    assert len(problems) == 2 and "method.p=1.0" in problems[0] and "method.mask_mode=token" in problems[1]
    assert DropLoraConfig().validate(SparsityConfig()) == []
    assert isinstance(bottleneck_dropout("element", 4, 0.5), ElementDropout)
    assert isinstance(bottleneck_dropout("rank", 4, 0.5), RankDropout)
    with pytest.raises(ValueError, match="mask_mode"):
        bottleneck_dropout("token", 4, 0.5)
    layer = bottleneck_dropout("element", 4, 0.0).train()
    z = torch.randn(2, 3, 4)
    assert layer(z) is z  # p = 0: plain LoRA


# ---------------------------------------------------------------------------------------------- e2e
@pytest.mark.slow
@pytest.mark.parametrize("mask_mode", MODES)
def test_cli_run_end_to_end(mask_mode: str, tmp_path: Path, data_root: Path) -> None:
    """``prunedlora-train method=droplora`` on the tiny model: run dir, summary, PEFT-format adapter."""
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("prunedlora-train")), "model=tiny", "method=droplora",
           f"method.mask_mode={mask_mode}", "task=gsm8k", "train.max_steps=5", "train.batch_size=2",
           "train.seq_len=512", "task.max_samples=64", "eval.enabled=false", "logging.progress=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PRUNEDLORA_DATA_ROOT": str(data_root)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "droplora" and summary["steps"] == 5
    assert set(summary["ranks"].values()) == {8} and len(summary["ranks"]) == 10  # q, k, v, up, down x 2 layers
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (run_dir / name).is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
