"""AdaLoRA baseline (docs/methods.md §2) through PEFT: allocation runs, regulariser applies, export and resume
are exact."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prunedlora.config import ConfigError, SparsityConfig
from prunedlora.methods import build_method
from prunedlora.methods.adalora.config import AdaLoraConfig
from prunedlora.methods.adalora.method import (
    AdaLoraAllocator,
    AdaLoraMethod,
    active_ranks,
    orthogonal_factors,
    orthogonal_penalty,
    schedule_steps,
    singular_values,
)
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict
from prunedlora.train.engine import TorchEngine
from prunedlora.train.loop import LoopContext, MetricsWriter, optimizer_step, train_loop

VOCAB = 97
INIT_RANK, TARGET_RANK = 8, 4
STEPS = 20  # tinit 2, final phase after step 16, allocation every 3 steps in between


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def adalora_cfg(**overrides) -> AdaLoraConfig:
    values = dict(init_rank=INIT_RANK, target_rank=TARGET_RANK, alpha=16.0, delta_t=3, orth_reg_weight=0.1,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return AdaLoraConfig(**{**values, **overrides})


def attach(model: nn.Module, **overrides) -> AdaLoraMethod:
    torch.manual_seed(0)
    method = build_method(adalora_cfg(**overrides), SparsityConfig())
    method.attach(model)
    return method


def batch(step: int, micro: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch per (step, micro-batch): resumed and uninterrupted runs see the same data."""
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1000 * step + micro))
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


class StepBatches:
    """The loop's batch source over ``batch``; grad_accum micro-batches per step."""

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum, self.calls = grad_accum, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        step, micro = divmod(self.calls, self.grad_accum)
        self.calls += 1
        return batch(step + 1, micro)


def make_engine(model: nn.Module, grad_accum: int = 1) -> TorchEngine:
    """Our loop's plain-PyTorch engine: AdamW, constant LR, clipping at 1."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TorchEngine(model, optimizer, scheduler, grad_accum=grad_accum, max_grad_norm=1.0,
                       device=torch.device("cpu"), bf16=False)


def run_steps(engine: TorchEngine, callbacks, first: int, last: int) -> None:
    """Steps ``first..last`` in our loop's order (``optimizer_step`` runs the callbacks), one micro-batch each."""
    for step in range(first, last + 1):
        engine.micro_step(batch(step), boundary=True)
        optimizer_step(engine, callbacks, step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[nn.Module, AdaLoraMethod, list[dict]]:
    """A tiny model trained for STEPS steps by our ``train_loop`` (grad_accum 2), with its metrics."""
    from prunedlora.config import TrainConfig

    model = tiny_llama()
    method = attach(model)
    model.train()
    cfg = TrainConfig(max_steps=STEPS, grad_accum=2, save_every=STEPS, log_every=1, max_grad_norm=1.0)
    path = tmp_path_factory.mktemp("adalora") / "metrics.jsonl"
    ctx = LoopContext(model, make_engine(model, grad_accum=2), StepBatches(2), method.callbacks(), MetricsWriter(path),
                      progress=False)
    train_loop(ctx, cfg, save=lambda step: None)
    model.eval()
    return model, method, [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ attach
def test_attach_is_in_place_trains_only_the_svd_triplets_and_starts_at_the_base() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    method = attach(model)
    assert method.peft_model.base_model.model is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * 8 and all(n.rsplit(".", 2)[-2] in ("lora_A", "lora_B", "lora_E") for n in trainable)
    assert list(active_ranks(model).values()) == [0] * 8  # PEFT initialises λ = 0
    tokens = batch(0)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, base(tokens).logits)


def test_schedule_fractions_leave_a_budgeting_phase() -> None:
    assert schedule_steps(40, 0.1, 0.2) == (4, 8)
    for steps in range(1, 60):
        tinit, tfinal = schedule_steps(steps, 0.45, 0.5)
        assert tinit < steps - tfinal


# ------------------------------------------------------------------------------------- regulariser
def test_orthogonal_regulariser_changes_gradients_exactly_as_peft_wrapper_forward() -> None:
    """Plain loss + our pre-step hook == PEFT's wrapper forward (which adds γ R to the loss), under accumulation."""
    model = tiny_llama()
    method = attach(model)
    with torch.no_grad():  # non-zero λ, so the task loss reaches P and Q too
        for lam in singular_values(model).values():
            lam.copy_(torch.randn(lam.shape, generator=torch.Generator().manual_seed(1)))
    (allocator,) = method.callbacks()
    allocator.on_train_start(model, None, STEPS)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(forward, with_hook: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for micro in range(2):
            (forward(**batch(1, micro)).loss / 2).backward()
        figures = allocator.on_before_optimizer_step(1) if with_hook else {}
        assert ("orth_reg" in figures) == with_hook
        return [p.grad.clone() for p in params]

    plain = grads(model, with_hook=False)
    ours = grads(model, with_hook=True)
    peft = grads(method.peft_model, with_hook=False)  # PeftModel -> AdaLoraModel.forward adds γ R
    for a, b in zip(ours, peft):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    changed = [not torch.allclose(a, b) for a, b in zip(plain, ours)]
    factors = {id(p) for _, p in orthogonal_factors(model)}
    assert all(c == (id(p) in factors) for c, p in zip(changed, params))  # P and Q change, λ does not
    assert orthogonal_penalty(orthogonal_factors(model)).item() > 0


# -------------------------------------------------------------------------------------- allocation
def test_allocation_runs_and_masks_ranks_to_the_budget(trained) -> None:
    """PEFT #432/#1801: rank allocation must actually run in our loop and mask λ down to the budget."""
    model, method, records = trained
    config = method.peft_model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (STEPS, 2, 4)
    assert config.rank_pattern is not None
    ranks = active_ranks(model)
    assert sum(ranks.values()) == TARGET_RANK * 8 and len(set(ranks.values())) > 1  # global budget: uneven
    report = method.report(model)
    assert report["ranks"] == ranks and report["sparsity"] == pytest.approx(1 - TARGET_RANK / INIT_RANK)
    assert report["adalora_allocations"] == STEPS
    by_step = {r["step"]: r for r in records}
    assert [by_step[s]["active_rank"] for s in (1, 2)] == [INIT_RANK * 8] * 2  # warm-up: nothing masked
    assert by_step[3]["active_rank"] == by_step[3]["rank_budget"] < INIT_RANK * 8  # first event at step 3
    assert all(r["active_rank"] == TARGET_RANK * 8 for r in records if r["step"] >= STEPS - 4)
    assert all("orth_reg" in r for r in records)


def test_report_refuses_a_run_where_allocation_never_ran() -> None:
    model = tiny_llama()
    method = attach(model)
    method.callbacks()  # wired, but no loop ever calls on_step_end
    with pytest.raises(RuntimeError, match="update_and_allocate never ran"):
        method.report(model)


def test_deepspeed_and_cleared_gradients_are_refused_with_a_clear_message() -> None:
    model = tiny_llama()
    method = attach(model)
    (allocator,) = method.callbacks()
    zero_optimizer = type("DeepSpeedZeroOptimizer", (), {"__module__": "deepspeed.runtime.zero.stage_1_and_2"})()
    with pytest.raises(ConfigError, match="distributed=deepspeed"):
        allocator.on_train_start(model, zero_optimizer, STEPS)
    allocator.on_train_start(model, None, STEPS)
    with pytest.raises(RuntimeError, match="already cleared"):  # no backward ran: no gradients to score
        allocator.on_step_end(1)


# ------------------------------------------------------------------------------------------ export
def test_export_adapter_loads_in_peft_and_merged_model_matches(trained, tmp_path: Path, byte_tokenizer) -> None:
    from peft import PeftModel

    model, method, _ = trained
    model, method = copy.deepcopy((model, method))  # the fixture is shared and export merges; one memo
    assert method.peft_model.base_model.model is model
    tokens = batch(0)["input_ids"]
    with torch.no_grad():
        ours = model(tokens).logits
    ranks = active_ranks(model)
    method.export(model, byte_tokenizer, tmp_path, "tiny")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == INIT_RANK and config["inference_mode"]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    loaded_ranks = {n.removeprefix("base_model.model."): int(m.r["default"])
                    for n, m in loaded.named_modules() if hasattr(m, "lora_E")}
    assert loaded_ranks == ranks  # sliced to the kept triplets
    from_disk = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(tokens).logits, ours, atol=1e-5, rtol=0)  # merged in place == unmerged
        torch.testing.assert_close(from_disk(tokens).logits, ours, atol=1e-5, rtol=0)
    assert not any("lora" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------------------ resume
def test_checkpoint_round_trip_resumes_exactly() -> None:
    """Stop mid-budget (EMAs and a rank pattern exist), restore into a fresh model: identical continuation."""
    stop, steps = 10, 20

    def fresh() -> tuple[nn.Module, AdaLoraAllocator, TorchEngine]:
        model = tiny_llama()
        method = attach(model)
        model.train()
        (allocator,) = method.callbacks()
        return model, allocator, make_engine(model)

    model, allocator, engine = fresh()
    allocator.on_train_start(model, engine.optimizer, steps)
    run_steps(engine, [allocator], 1, stop)
    saved = copy.deepcopy({"adapter": adapter_state_dict(model), "engine": engine.save(Path()),
                           "callback": allocator.state_dict()})
    assert saved["callback"]["rank_pattern"] is not None and saved["callback"]["exp_avg_ipt"]
    run_steps(engine, [allocator], stop + 1, steps)

    resumed, resumed_allocator, resumed_engine = fresh()
    load_adapter_state_dict(resumed, saved["adapter"])
    resumed_engine.load(Path(), saved["engine"])
    resumed_allocator.load_state_dict(saved["callback"])
    resumed_allocator.on_train_start(resumed, resumed_engine.optimizer, steps)
    run_steps(resumed_engine, [resumed_allocator], stop + 1, steps)

    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, expected[name], atol=0, rtol=0)
    assert resumed_allocator.peft_config.rank_pattern == allocator.peft_config.rank_pattern
    assert resumed_allocator.allocations == allocator.allocations == steps


# ------------------------------------------------------------------------------------------ config
def test_config_validation() -> None:
    assert AdaLoraConfig().validate(SparsityConfig()) == []
    assert AdaLoraConfig().final_rank(0.5) == 16 and AdaLoraConfig(target_rank=4).final_rank(0.5) == 4
    problems = " ".join(AdaLoraConfig(rank=8, init_rank=8, target_rank=8, use_rslora=True, tinit_frac=0.5,
                                      tfinal_frac=0.5).validate(SparsityConfig(schedule="linear")))
    for key in ("method.rank=8", "target rank 8", "method.tinit_frac", "use_rslora", "sparsity.schedule=linear"):
        assert key in problems
    assert "target rank 12" in " ".join(AdaLoraConfig(init_rank=12).validate(SparsityConfig(final=0.0)))


# ---------------------------------------------------------------------------------------------- e2e
@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path: Path, data_root: Path) -> None:
    """``prunedlora-train method=adalora`` on the tiny model: ranks masked to the budget, adapter + model written."""
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).with_name("prunedlora-train")), "model=tiny", "method=adalora", "task=gsm8k",
           "train.max_steps=20", "train.batch_size=2", "train.seq_len=512", "task.max_samples=128",
           "eval.enabled=false", "logging.progress=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PRUNEDLORA_DATA_ROOT": str(data_root)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "adalora" and summary["adalora_allocations"] == 20
    assert sum(summary["ranks"].values()) == 16 * len(summary["ranks"])  # target 32 * (1 - 0.5) on average
    assert summary["sparsity"] == pytest.approx(0.5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["active_rank"] == records[-1]["rank_budget"] == 16 * len(summary["ranks"])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] and config["total_step"] == 20
    assert (run_dir / "model" / "model.safetensors").is_file()
