"""The training spine: config validation, callback cadence, resume equivalence, run-dir guard."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY_OVERRIDES, compose_root, crash_then_resume, metric_records

from prunedlora.config import ConfigError, RootConfig, TrainConfig
from prunedlora.methods.base import Callback
from prunedlora.train.engine import TorchEngine
from prunedlora.train.loop import LoopContext, MetricsWriter, train_loop
from prunedlora.train.optim import build_scheduler
from prunedlora.train.recipe import run


@pytest.fixture
def tiny_cfg(data_root: Path) -> RootConfig:
    return compose_root(TINY_OVERRIDES, data_root)


# ------------------------------------------------------------------------------------------ config
def test_every_group_option_composes() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    for group in ("model", "method", "sparsity", "task", "distributed"):
        for option in sorted((configs / group).glob("*.yaml")):
            extra = ["model.name_or_path=/tmp/x"] if option.stem == "hf" and group == "model" else []
            cfg = compose_root([f"{group}={option.stem}", *extra])
            assert isinstance(cfg, RootConfig)
    for option in sorted((configs / "experiment").glob("*.yaml")):
        assert isinstance(compose_root([f"experiment={option.stem}"]), RootConfig)


@pytest.mark.parametrize("override, key", [
    ("method.rnak=4", "method.rnak"),
    ("train.lr=fast", "train.lr"),
    ("method.rank=abc", "method.rank"),
    ("model=nonexistent", "model"),
])
def test_typos_and_wrong_types_fail_at_composition_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose_root([override])


def test_validation_reports_every_problem_at_once(tiny_cfg: RootConfig) -> None:
    from prunedlora.validation import validate

    bad = replace(tiny_cfg, train=replace(tiny_cfg.train, lr=-1.0, scheduler="cosine_restarts"),
                  eval=replace(tiny_cfg.eval, tasks=["gsm8k", "hellaswag"]))
    with pytest.raises(ConfigError) as err:
        validate(bad)
    message = str(err.value)
    for fragment in ("train.lr=-1.0", "train.scheduler=cosine_restarts", "eval.tasks=hellaswag"):
        assert fragment in message


@pytest.mark.parametrize("method, formats, resolved", [
    ("lora", None, ("hf", "adapter")),
    ("loraprune", None, ("hf",)),
    ("salr", None, ("hf", "adapter", "bitmap")),
    ("salr", "[hf,bitmap]", ("hf", "bitmap")),
    ("prunedlora", "[adapter]", ("adapter",)),
])
def test_export_formats_default_to_what_the_method_writes(method: str, formats: str | None,
                                                          resolved: tuple[str, ...]) -> None:
    from prunedlora.validation import validate

    cfg = compose_root([f"method={method}", *([f"export.formats={formats}"] if formats else [])])
    validate(cfg)
    assert cfg.export.resolve(cfg.method) == resolved


@pytest.mark.parametrize("method, formats, fragments", [
    ("lora", "[hf,bitmap]", ["export.formats contains bitmap", "method=lora does not write", "hf, adapter"]),
    ("loraprune", "[adapter]", ["export.formats contains adapter", "method=loraprune", "it writes hf"]),
    ("salr", "[]", ["export.formats=[] writes nothing"]),
    ("salr", "[gguf]", ["export.formats=gguf is not one of hf, adapter, bitmap"]),
    ("salr", "[hf,hf]", ["names a format twice"]),
])
def test_export_formats_a_method_cannot_write_are_refused_naming_the_key(method: str, formats: str,
                                                                        fragments: list[str]) -> None:
    from prunedlora.validation import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_root([f"method={method}", f"export.formats={formats}"]))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_warmup_then_cosine_schedule() -> None:
    cfg = TrainConfig(max_steps=10, warmup_ratio=0.2, lr=1.0, scheduler="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] < 0.1


# --------------------------------------------------------------------------------- loop mechanics
class CountingBatches:
    """A stand-in for ResumableBatches that counts micro-batches."""

    def __init__(self) -> None:
        self.calls = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        ids = torch.randint(0, 50, (2, 8))
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


class RecordingCallback(Callback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.events: list[tuple[str, int]] = []

    def on_train_start(self, model, optimizer, max_steps) -> None:
        self.events.append(("start", max_steps))

    def on_before_optimizer_step(self, step: int) -> dict:
        grads = [p.grad for p in self.model.parameters() if p.requires_grad]
        assert all(g is not None for g in grads), "gradients must be complete before the optimizer step"
        self.events.append(("before", step))
        return {"hook_step": step}

    def on_step_end(self, step: int) -> dict:
        self.events.append(("end", step))
        return {}


def test_callbacks_fire_once_per_optimizer_step_under_accumulation(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunedlora.adapters.lora import inject_lora, mark_only_lora_as_trainable

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    inject_lora(model, ["q_proj", "v_proj"], 2, 4.0)
    mark_only_lora_as_trainable(model)
    cfg = TrainConfig(max_steps=4, grad_accum=3, save_every=2, lr=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    batches, callback, saved = CountingBatches(), RecordingCallback(model), []
    engine = TorchEngine(model, opt, build_scheduler(opt, cfg), grad_accum=cfg.grad_accum,
                         max_grad_norm=cfg.max_grad_norm, device=torch.device("cpu"), bf16=False)
    train_loop(LoopContext(model, engine, batches, [callback], MetricsWriter(tmp_path / "m.jsonl"), progress=False),
               cfg, save=saved.append)
    assert batches.calls == 12
    assert callback.events == [("start", 4)] + [(e, s) for s in range(1, 5) for e in ("before", "end")]
    assert saved == [2, 4]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["hook_step"] for r in records] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- resume
def test_resume_gives_the_same_final_loss_as_an_uninterrupted_run(tiny_cfg: RootConfig, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """3 steps + crash + resume + 3 steps == 6 uninterrupted steps (fp32, within 1e-6)."""
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, max_steps=6, save_every=3, grad_accum=2),
                  method=replace(tiny_cfg.method, dropout=0.1))  # dropout: the RNG state must resume too
    full = run(cfg, tmp_path / "full")
    # Crash mid-way through step 4 (checkpoint at 3), then rerun the same config in the same directory.
    resumed = crash_then_resume(cfg, tmp_path / "resumed", 3 * cfg.train.grad_accum + 1, monkeypatch)

    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    losses = [[r["loss"] for r in metric_records(tmp_path / d)] for d in ("resumed", "full")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_run_dir_with_a_different_config_is_refused(tiny_cfg: RootConfig, tmp_path: Path) -> None:
    cfg = replace(tiny_cfg, train=replace(tiny_cfg.train, max_steps=1))
    run(cfg, tmp_path)
    adapter_before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    other = replace(cfg, method=replace(cfg.method, rank=4))
    with pytest.raises(ConfigError, match="method.rank"):
        run(other, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
    # The same config again: the run is complete, nothing is retrained or rewritten.
    assert run(cfg, tmp_path)["steps"] == 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunedlora.adapters.lora import inject_lora, mark_only_lora_as_trainable

    def grads(checkpointing: bool) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        inject_lora(model, ["q_proj", "v_proj"], 4, 8.0)
        mark_only_lora_as_trainable(model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]

    loss_plain, grads_plain = grads(False)
    loss_ckpt, grads_ckpt = grads(True)
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-6)
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_training_peak_memory_leaves_out_what_came_before():
    """The recipe resets the peak at the start of training, so a loading spike does not count as training memory."""
    from prunedlora.train.memory import peak_memory_mb, reset_peak_memory, resident_memory_mb

    cpu = torch.device("cpu")
    if resident_memory_mb(cpu) is None:
        pytest.skip("needs /proc/self/status (Linux)")
    spike = torch.ones(2**27)  # 512 MiB, touched: a loading-time spike
    del spike
    before = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    after = peak_memory_mb(cpu)
    assert after < before - 400 and after == pytest.approx(resident_memory_mb(cpu), abs=64)


def test_the_deepspeed_resume_path_checks_the_adapter_keys_too() -> None:
    """``trainable_too=False`` (DeepSpeed restores the trainables itself) loads only masks, and refuses a checkpoint
    whose keys do not match the model, as the single-process path does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunedlora.adapters.lora import inject_lora, mark_only_lora_as_trainable
    from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
        inject_lora(m, ["q_proj"], 2, 4.0)
        mark_only_lora_as_trainable(m)
        return m

    saved = adapter_state_dict(model())
    mask_key = next(k for k in saved if k.endswith("rank_mask"))
    b_key = next(k for k in saved if k.endswith("lora_B.weight"))
    saved[mask_key] = torch.zeros_like(saved[mask_key])
    saved[b_key] = torch.ones_like(saved[b_key])
    target = model()
    load_adapter_state_dict(target, saved, trainable_too=False)
    state = target.state_dict()
    assert torch.equal(state[mask_key], saved[mask_key]) and not torch.equal(state[b_key], saved[b_key])
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_adapter_state_dict(model(), {**saved, "model.layers.9.self_attn.q_proj.rank_mask": saved[mask_key]},
                                trainable_too=False)
    with pytest.raises(RuntimeError, match="trainable parameters missing"):
        load_adapter_state_dict(model(), {k: v for k, v in saved.items() if k != b_key}, trainable_too=False)
