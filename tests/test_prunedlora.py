"""PrunedLoRA (docs/methods.md §3): the paper's OBS math (obs_grad), pruning during real training, allocation, export,
resume, CLI. The default criterion's math (output OBS) is in test_output_obs.py."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.lora import lora_modules
from prunedlora.config import ConfigError, SparsityConfig, TrainConfig
from prunedlora.methods import build_method
from prunedlora.methods.base import Callback
from prunedlora.methods.prunedlora.callback import PrunedLoraCallback
from prunedlora.methods.prunedlora.config import PrunedLoraConfig
from prunedlora.pruning.criteria import RANK_CRITERIA
from prunedlora.pruning.rank_criteria import (
    gram_inverses,
    obs_prune,
    obs_prune_one,
    obs_saliency,
    relative_saliency,
    select_global,
)
from prunedlora.train.checkpoint import adapter_state_dict, load_adapter_state_dict
from prunedlora.train.engine import TorchEngine
from prunedlora.train.loop import LoopContext, MetricsWriter, train_loop
from prunedlora.train.optim import build_scheduler

EPS = 1e-6
NUS = [0.0, 0.5, 1.0]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~10x faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================ OBS math (float64, §3.2)
def random_problem(seed: int = 0, d_out: int = 7, d_in: int = 9, r: int = 5) -> tuple[torch.Tensor, ...]:
    """B (d_out, r), A (r, d_in) and their gradients, float64."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64)
                 for shape in [(d_out, r), (r, d_in), (d_out, r), (r, d_in)])


def inverses(G_B: torch.Tensor, G_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (H + εI)⁻¹ by LU, independent of the Cholesky path under test."""
    eye = torch.eye(G_B.shape[1], dtype=torch.float64)
    return torch.linalg.inv(G_B.T @ G_B + EPS * eye), torch.linalg.inv(G_A @ G_A.T + EPS * eye)


def kkt_minimiser(w: torch.Tensor, g: torch.Tensor, H: torch.Tensor, j: int) -> torch.Tensor:
    """argmin gᵀδ + ½δᵀHδ s.t. δ_j = −w_j, by solving the KKT system [[H, e_j], [e_jᵀ, 0]]."""
    r = w.numel()
    kkt = torch.zeros(r + 1, r + 1, dtype=torch.float64)
    kkt[:r, :r], kkt[:r, r], kkt[r, :r] = H, 0.0, 0.0
    kkt[j, r] = kkt[r, j] = 1.0
    rhs = torch.cat([-g, -w[j : j + 1]])
    return torch.linalg.solve(kkt, rhs)[:r]


def quadratic(delta: torch.Tensor, g: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Σ over row vectors of gᵀδ + ½δᵀHδ; delta, g are (n, r)."""
    return (g * delta).sum() + 0.5 * ((delta @ H) * delta).sum()


def toy_loss_change(B, A, G_B, G_A, B_new, A_new) -> float:
    """The exact quadratic loss of §3.2 (H_B = G_BᵀG_B + εI, H_A = G_A G_Aᵀ + εI) around (B, A)."""
    eye = torch.eye(B.shape[1], dtype=torch.float64)
    H_B, H_A = G_B.T @ G_B + EPS * eye, G_A @ G_A.T + EPS * eye
    return float(quadratic(B_new - B, G_B, H_B) + quadratic((A_new - A).T, G_A.T, H_A))


@pytest.mark.parametrize("factors", ["b", "a", "both"])
@pytest.mark.parametrize("nu", NUS)
def test_recovery_zeroes_entry_j_exactly(nu: float, factors: str) -> None:
    B, A, G_B, G_A = random_problem()
    keep = lambda t, j, dim: t.index_select(dim, torch.tensor([i for i in range(t.shape[dim]) if i != j]))  # noqa: E731
    for j in range(B.shape[1]):
        B_new, A_new = obs_prune_one(B, A, G_B, G_A, j, nu, EPS, factors)
        assert torch.all(B_new[:, j] == 0) and torch.all(A_new[j] == 0)
        # the survivors of the recovered factor(s) absorbed a change; the other factor is only zeroed at j
        assert torch.allclose(keep(B_new, j, 1), keep(B, j, 1)) == (factors == "a")
        assert torch.allclose(keep(A_new, j, 0), keep(A, j, 0)) == (factors == "b")


def test_recovery_at_nu_zero_is_the_classic_obs_compensation() -> None:
    """The paper's two-sided update (factors="both"), each side as §3.2 writes it."""
    B, A, G_B, G_A = random_problem(1)
    Hb, Ha = inverses(G_B, G_A)
    for j in range(B.shape[1]):
        B_new, A_new = obs_prune_one(B, A, G_B, G_A, j, 0.0, EPS, "both")
        # per row i of B: −B_ij Hb⁻e_j / (Hb⁻)_jj; per column c of A: −A_jc Ha⁻e_j / (Ha⁻)_jj
        torch.testing.assert_close(B_new - B, -torch.outer(B[:, j], Hb[:, j]) / Hb[j, j], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(A_new - A, -torch.outer(Ha[:, j], A[j]) / Ha[j, j], rtol=1e-9, atol=1e-9)


def test_recovery_at_nu_one_is_the_constrained_minimiser_of_the_quadratic_model() -> None:
    B, A, G_B, G_A = random_problem(2)
    eye = torch.eye(B.shape[1], dtype=torch.float64)
    H_B, H_A = G_B.T @ G_B + EPS * eye, G_A @ G_A.T + EPS * eye
    for j in range(B.shape[1]):
        B_new, A_new = obs_prune_one(B, A, G_B, G_A, j, 1.0, EPS, "both")
        for i in range(B.shape[0]):
            torch.testing.assert_close(B_new[i] - B[i], kkt_minimiser(B[i], G_B[i], H_B, j), rtol=1e-6, atol=1e-8)
        for c in range(A.shape[1]):
            torch.testing.assert_close(A_new[:, c] - A[:, c], kkt_minimiser(A[:, c], G_A[:, c], H_A, j),
                                       rtol=1e-6, atol=1e-8)


def test_saliency_is_the_loss_change_at_the_minimiser_up_to_the_j_independent_term() -> None:
    B, A, G_B, G_A = random_problem(3)
    Hb, Ha = inverses(G_B, G_A)
    # −½ gᵀH⁻g summed over rows of B and columns of A: the same for every j
    constant = -0.5 * (((G_B @ Hb) * G_B).sum() + ((Ha @ G_A) * G_A).sum())
    saliency = obs_saliency(B, A, G_B, G_A, damping=EPS)
    for j in range(B.shape[1]):
        B_new, A_new = obs_prune_one(B, A, G_B, G_A, j, 1.0, EPS, "both")
        change = toy_loss_change(B, A, G_B, G_A, B_new, A_new)
        assert change == pytest.approx(float(constant + saliency[j]), rel=1e-7, abs=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_obs_pruning_raises_an_exact_quadratic_loss_less_than_magnitude_pruning(seed: int) -> None:
    """On the toy loss whose Hessian is exactly the damped gradient Gram, OBS (ν = 1) beats magnitude."""
    B, A, G_B, G_A = random_problem(10 + seed, d_out=12, d_in=10, r=6)
    j_obs = int(obs_saliency(B, A, G_B, G_A, damping=EPS).argmin())
    B_obs, A_obs = obs_prune_one(B, A, G_B, G_A, j_obs, 1.0, EPS, "both")
    j_mag = int(RANK_CRITERIA.function("magnitude")(B, A, G_B, G_A).argmin())
    B_mag, A_mag = B.clone(), A.clone()
    B_mag[:, j_mag], A_mag[j_mag] = 0.0, 0.0  # magnitude pruning: just zero, no recovery
    obs_change = toy_loss_change(B, A, G_B, G_A, B_obs, A_obs)
    assert obs_change < toy_loss_change(B, A, G_B, G_A, B_mag, A_mag)
    # and OBS picks the best component: no other j does better with its own optimal recovery
    for j in range(B.shape[1]):
        assert obs_change <= toy_loss_change(B, A, G_B, G_A, *obs_prune_one(B, A, G_B, G_A, j, 1.0, EPS, "both")) + 1e-9


@pytest.mark.parametrize("nu", NUS)
def test_sequential_pruning_equals_recomputing_on_the_shrunken_set(nu: float) -> None:
    """K2 = 2: downdated H⁻ and (1 − ν)G for the second component == pruning again from scratch."""
    B, A, G_B, G_A = random_problem(4)
    B_seq, A_seq = obs_prune(B, A, G_B, G_A, [3, 1], nu, EPS, "both")
    B1, A1 = obs_prune_one(B, A, G_B, G_A, 3, nu, EPS, "both")
    keep = [0, 1, 2, 4]  # the shrunken set; component 1 is at position 1
    Hb, Ha = inverses(G_B[:, keep], G_A[keep])  # Hessian of the original gradients on the shrunken set
    b, a, gb, ga = B1[:, keep], A1[keep], (1 - nu) * G_B[:, keep], (1 - nu) * G_A[keep]
    lam_b = (b[:, 1] - nu * (gb @ Hb)[:, 1]) / Hb[1, 1]
    lam_a = (a[1] - nu * (Ha @ ga)[1]) / Ha[1, 1]
    b_ref = b - nu * gb @ Hb - torch.outer(lam_b, Hb[:, 1])
    a_ref = a - nu * Ha @ ga - torch.outer(Ha[:, 1], lam_a)
    torch.testing.assert_close(B_seq[:, keep], b_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(A_seq[keep], a_ref, rtol=1e-7, atol=1e-9)
    assert torch.all(B_seq[:, [1, 3]] == 0) and torch.all(A_seq[[1, 3]] == 0)


def test_gram_inverse_keeps_the_damping_in_float64_where_pinv_would_drop_it() -> None:
    G = torch.zeros(8, 3)
    G[:, 0] = 1e3  # a huge diagonal entry and two null directions
    Hb, _ = gram_inverses(G, G.T, 1e-6)
    assert Hb.dtype == torch.float64
    assert Hb[1, 1] == pytest.approx(1e6) and Hb[2, 2] == pytest.approx(1e6)  # 1/ε, not 0 as pinv gives


def test_global_selection_takes_the_lowest_relative_saliency_and_respects_floors() -> None:
    sal = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([10.0, 0.1, 30.0, 0.2]),
           "c": torch.tensor([5.0, 0.0, 7.0])}
    chosen = select_global(sal, {"a": 3, "b": 3, "c": 1}, budget=3)
    # relative: a all 1; b = [0.99, 0.0099, 2.96, 0.0198]; c = [1.25, 0, 1.75]; c may lose only one
    assert chosen == {"c": [1], "b": [1, 3]}
    assert sum(map(len, select_global(sal, {"a": 0, "b": 1, "c": 0}, budget=5).values())) == 1
    assert torch.allclose(relative_saliency(torch.tensor([1.0, 3.0])), torch.tensor([0.5, 1.5]))


# ============================================================================ training with pruning
VOCAB = 61
R0 = 8


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)  # k_proj/v_proj are 32 -> 16: r0 = 8 fits


class Batches:
    """Deterministic, resumable stand-in for ResumableBatches: batch i depends only on i."""

    def __init__(self) -> None:
        self.i = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + self.i)
        self.i += 1
        ids = torch.randint(3, VOCAB, (2, 16), generator=gen)
        ids[:, 1::2] = (ids[:, ::2] * 7) % VOCAB  # some structure to learn
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def method_cfg(**kw) -> PrunedLoraConfig:
    defaults = {"init_rank": R0, "alpha": 2.0 * R0, "dropout": 0.0}
    return PrunedLoraConfig(**{**defaults, **kw})


def schedule(final: float = 0.75, every: int = 4, per_event: int = 2, **kw) -> SparsityConfig:
    return SparsityConfig(schedule="constant", final=final, every=every, per_event=per_event, **kw)


def masked(module) -> torch.Tensor:
    return (module.rank_mask == 0).nonzero().flatten()


class ZeroChecker(Callback):
    """Asserts that every pruned component is exactly zero: weight slices, gradients, Adam moments.

    Put one before the PrunedLoRA callback (its ``on_step_end`` then sees the state right after
    ``optimizer.step()``, before any re-masking) and one after it (its ``on_before_optimizer_step`` sees
    what the optimizer is about to use).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = lora_modules(model)
        self.optimizer = None
        self.ranks: list[dict[str, int]] = []
        self.checks = 0

    def on_train_start(self, model, optimizer, max_steps) -> None:
        self.optimizer = optimizer

    def check(self, grads: bool) -> None:
        for module in self.modules.values():
            gone = masked(module)
            if gone.numel() == 0:
                continue
            a, b = module.lora_A.weight, module.lora_B.weight
            slices = [a[gone], b[:, gone]]
            if grads:
                slices += [a.grad[gone], b.grad[:, gone]]
            for p, sl in ((a, lambda t: t[gone]), (b, lambda t: t[:, gone])):
                state = self.optimizer.state.get(p, {})
                slices += [sl(state[k]) for k in ("exp_avg", "exp_avg_sq") if k in state]
            assert all(torch.all(s == 0) for s in slices)
            self.checks += 1

    def on_before_optimizer_step(self, step: int) -> dict:
        self.check(grads=True)
        return {}

    def on_step_end(self, step: int) -> dict:
        self.check(grads=False)
        self.ranks.append({n: m.active_rank for n, m in self.modules.items()})
        return {}


def train(model: nn.Module, callbacks: list[Callback], steps: int, tmp_path: Path, batches: Batches | None = None,
          optimizer=None, scheduler=None, start_step: int = 0) -> tuple[Batches, torch.optim.Optimizer, object]:
    # A constant LR keeps the schedule independent of max_steps, so split runs can resume into longer ones.
    cfg = TrainConfig(max_steps=steps, lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, scheduler="constant",
                      max_grad_norm=1.0, save_every=10_000)
    if optimizer is None:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg)
    batches = batches or Batches()
    engine = TorchEngine(model, optimizer, scheduler, grad_accum=1, max_grad_norm=cfg.max_grad_norm,
                         device=torch.device("cpu"), bf16=False)
    ctx = LoopContext(model, engine, batches, callbacks, MetricsWriter(tmp_path / "metrics.jsonl"), progress=False)
    train_loop(ctx, cfg, save=lambda s: None, start_step=start_step)
    return batches, optimizer, scheduler


def pruned_run(tmp_path: Path, steps: int, cfg: PrunedLoraConfig, sparsity: SparsityConfig):
    model = tiny_llama()
    method = build_method(cfg, sparsity)
    method.attach(model)
    pre, post = ZeroChecker(model), ZeroChecker(model)
    train(model, [pre, *method.callbacks(), post], steps, tmp_path)
    return model, method, pre, post


@pytest.mark.parametrize("variant", [{"criterion": "obs"}, {"criterion": "obs_grad", "recovery_factor": "both"}])
def test_pruned_components_stay_exactly_zero_and_ranks_shrink_monotonically_to_the_target(tmp_path: Path,
                                                                                          variant: dict) -> None:
    """Never reactivated: the default and the paper's variant (two-sided recovery) alike."""
    model, method, pre, post = pruned_run(tmp_path, 52, method_cfg(**variant), schedule(final=0.75, every=4,
                                                                                        per_event=2))
    target = 2  # 8 * (1 - 0.75); events at steps 4, 8, 12 remove 2 each
    per_step = [sorted(set(r.values())) for r in pre.ranks]
    assert per_step[2] == [R0] and per_step[3] == [6] and per_step[7] == [4] and per_step[11] == [target]
    assert all(r == {target} for r in map(set, (d.values() for d in pre.ranks[11:])))
    for name in pre.ranks[0]:
        series = [r[name] for r in pre.ranks]
        assert all(b <= a for a, b in zip(series, series[1:]))
    assert pre.checks > 40 * 8 and post.checks > 40 * 8  # every module, every step after the first event
    # metrics.jsonl carries the method's figures, and the per-module ranks at the events
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["pruned_this_step"] for r in records[:13]] == [0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0]
    assert records[3]["active_rank"] == dict.fromkeys(lora_modules(model), 6) and "active_rank" not in records[4]
    assert records[-1]["active_rank_mean"] == target and records[-1]["sparsity_actual"] == pytest.approx(0.75)
    assert records[-1]["sparsity_target"] == pytest.approx(0.75) and records[0]["sparsity_target"] == 0.0
    report = method.report(model)
    assert report["ranks"] == dict.fromkeys(lora_modules(model), target)
    assert report["sparsity"] == pytest.approx(0.75) and (report["init_rank"], report["target_rank"]) == (R0, 2)
    # the fixed scaling alpha / r0 never changed
    assert all(m.scaling == pytest.approx(2.0) for m in lora_modules(model).values())


def test_global_allocation_meets_the_total_budget_with_floors_and_uneven_ranks(tmp_path: Path) -> None:
    cfg = method_cfg(allocation="global", min_rank=1)
    model, method, pre, _ = pruned_run(tmp_path, 24, cfg, schedule(final=0.75, every=4, per_event=2))
    ranks = method.report(model)["ranks"]
    assert sum(ranks.values()) == 2 * len(ranks)  # n * target in total
    assert min(ranks.values()) >= 1 and len(set(ranks.values())) > 1
    totals = [sum(r.values()) for r in pre.ranks]
    assert totals[3] == 8 * (R0 - 2) and totals[7] == 8 * (R0 - 4)  # K2 * n_modules per event overall


@pytest.mark.parametrize("criterion", RANK_CRITERIA.names())
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_every_criterion_prunes_to_the_target(tmp_path: Path, criterion: str, allocation: str) -> None:
    cfg = method_cfg(criterion=criterion, allocation=allocation)
    model, method, _, _ = pruned_run(tmp_path, 9, cfg, schedule(final=0.5, every=3, per_event=2))
    ranks = method.report(model)["ranks"]
    assert sum(ranks.values()) == 4 * len(ranks)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_pruning_at_step_one_works_before_the_optimizer_has_state(tmp_path: Path) -> None:
    model, method, pre, post = pruned_run(tmp_path, 5, method_cfg(), schedule(final=0.75, every=1, per_event=2))
    assert [sorted(set(r.values())) for r in pre.ranks] == [[6], [4], [2], [2], [2]]
    assert post.checks == 5 * 2 * 8  # both hooks of every step, every module: pruned slices exactly zero


def test_activation_statistics_only_when_chosen() -> None:
    for criterion, hooked in [("obs_grad", False), ("magnitude", False), ("obs", True), ("activation", True)]:
        model = tiny_llama()
        build_method(method_cfg(criterion=criterion), schedule()).attach(model)
        assert all(bool(m.bottleneck._forward_hooks) == hooked for m in lora_modules(model).values())


def test_method_rank_sets_the_schedule_end_and_sparsity_final_is_left_as_given(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``method.rank`` wins: the target rank is derived once and logged; the user's ``sparsity`` is not rewritten."""
    sparsity = schedule(final=0.9, every=1, per_event=2)
    with caplog.at_level(logging.INFO, logger="prunedlora.methods.prunedlora"):
        model, method, pre, _ = pruned_run(tmp_path, 4, method_cfg(rank=4), sparsity)
    assert method.target == 4 and method.sparsity is sparsity and sparsity.final == 0.9
    assert method.callbacks()[0].final == pytest.approx(0.5)  # 1 - 4 / 8 of r0
    assert [sorted(set(r.values())) for r in pre.ranks] == [[6], [4], [4], [4]]  # stops at rank 4, not 0.9 of r0
    assert "target 4 (method.rank=4, not sparsity.final=0.9: the schedule prunes 0.5 of r0)" in caplog.text


def test_rank_above_module_width_is_a_config_error_naming_module_and_fix() -> None:
    method = build_method(method_cfg(init_rank=20), schedule(final=0.5))
    with pytest.raises(ConfigError, match=r"k_proj.*min\(d_in, d_out\)=16.*at most 16"):
        method.attach(tiny_llama())


def test_config_validation_names_keys() -> None:
    problems = PrunedLoraConfig(init_rank=8, rank=12, criterion="hessian", newton_scale=2.0, rel_damping=0.0,
                                recovery_factor="B+A").validate(SparsityConfig())
    text = " ".join(problems)
    for fragment in ("target rank 12", "method.criterion=hessian", "method.newton_scale=2.0", "method.rel_damping=0.0",
                     "method.recovery_factor=B+A"):
        assert fragment in text
    assert PrunedLoraConfig().validate(SparsityConfig()) == []


# ============================================================================ export and resume
def test_export_reloads_in_peft_with_rank_pattern_and_identical_logits(tmp_path: Path, byte_tokenizer) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_llama()
    model = copy.deepcopy(base)
    method = build_method(method_cfg(allocation="global"), schedule(final=0.75, every=4, per_event=2))
    method.attach(model)
    train(model, method.callbacks(), 13, tmp_path)
    ranks = method.report(model)["ranks"]
    assert len(set(ranks.values())) > 1
    ids = Batches().next_batch()["input_ids"]
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
    method.export(model, byte_tokenizer, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and (tmp_path / "rank_allocation.png").stat().st_size > 1000
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("criterion", ["obs", "obs_grad", "activation"])
def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path: Path, criterion: str) -> None:
    """10 steps == 6 steps + checkpoint (adapter + masks, optimizer, scheduler, callback) + 4 steps."""
    cfg, sparsity = method_cfg(criterion=criterion), schedule(final=0.75, every=4, per_event=2)

    def fresh():
        model = tiny_llama()
        method = build_method(cfg, sparsity)
        method.attach(model)
        return model, method.callbacks()

    full_model, full_cbs = fresh()
    train(full_model, full_cbs, 10, tmp_path)

    first_model, first_cbs = fresh()
    batches, opt, sched = train(first_model, first_cbs, 6, tmp_path)
    state = copy.deepcopy({"adapter": adapter_state_dict(first_model), "opt": opt.state_dict(),
                           "sched": sched.state_dict(), "cb": [cb.state_dict() for cb in first_cbs]})
    model, cbs = fresh()
    load_adapter_state_dict(model, state["adapter"])
    _, opt2, sched2 = train(model, [], 0, tmp_path)  # just builds optimizer and scheduler
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for cb, s in zip(cbs, state["cb"], strict=True):
        cb.load_state_dict(s)
    train(model, cbs, 10, tmp_path, batches=batches, optimizer=opt2, scheduler=sched2, start_step=6)

    for (n, p), q in zip(full_model.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=n)
    assert full_cbs[0].state_dict()["events"] == cbs[0].state_dict()["events"] == 2


def test_callback_state_round_trips_with_activation_statistics(tmp_path: Path) -> None:
    def callback(model: nn.Module) -> PrunedLoraCallback:
        method = build_method(method_cfg(criterion="activation"), schedule(every=4))
        method.attach(model)
        return method.callbacks()[0]

    model = tiny_llama()
    cb = callback(model)
    train(model, [cb], 6, tmp_path)  # an event at step 4, then statistics of steps 5-6
    state = copy.deepcopy(cb.state_dict())
    assert (state["events"], state["last_event_step"]) == (1, 4)
    assert set(state["activation"]["tokens"].values()) == {2 * 2 * 16}  # 2 steps of (2, 16) tokens
    cb2 = callback(tiny_llama())
    cb2.load_state_dict(state)
    restored = cb2.state_dict()
    assert {k: v for k, v in restored.items() if k != "activation"} == {"events": 1, "last_event_step": 4}
    assert restored["activation"]["tokens"] == state["activation"]["tokens"]
    for name, t in state["activation"]["gram_sum"].items():  # the whole Σ z zᵀ (output OBS needs it)
        assert torch.equal(restored["activation"]["gram_sum"][name], t) and t.abs().sum() > 0
        assert t.shape == (R0, R0) and torch.equal(t, t.T) and (t.diagonal() >= 0).all()


# ============================================================================ the CLI, end to end
BIN = Path(sys.executable).parent
CLI_TINY = ["model=tiny", "method=prunedlora", "task=gsm8k", "train.batch_size=2", "train.seq_len=512",
            "task.max_samples=64", "eval.enabled=false", "logging.progress=false", "method.init_rank=8",
            "method.alpha=16", "sparsity.every=2", "sparsity.per_event=2", "train.max_steps=8", "train.save_every=4"]


def run_cli(args: list[str], data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRUNEDLORA_DATA_ROOT": str(data_root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([str(BIN / "prunedlora-train"), *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_run_and_a_multirun_over_sparsity_final(tmp_path: Path, data_root: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli([*CLI_TINY, "method.allocation=global", f"hydra.run.dir={run_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(summary["ranks"].values()) == 4 * len(summary["ranks"]) and summary["sparsity"] == pytest.approx(0.5)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the default (geometric) schedule: events at steps 2 and 4 (<= 0.6 * 8), each keeping sqrt(1/2) of the rank:
    # 64 components in 8 modules -> 64 - round(64 (1 - 0.5 ** 0.5)) = 45 -> 32
    assert [r["pruned_this_step"] for r in records] == [0, 19, 0, 13, 0, 0, 0, 0]
    assert (run_dir / "rank_allocation.png").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()

    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *CLI_TINY, "sparsity.final=0.5,0.75", f"hydra.sweep.dir={sweep}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, target in (("0", 4), ("1", 2)):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert set(summary["ranks"].values()) == {target}, job
        assert summary["target_rank"] == target and summary["init_rank"] == 8


@pytest.mark.slow
def test_zero2_and_zero3_prune_exactly_like_plain_pytorch(tmp_path: Path, data_root: Path) -> None:
    """Grads, weights and Adam moments go through prunedlora.distributed: same losses, ranks and adapter."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    args = [*CLI_TINY, "method.allocation=global", "method.dropout=0", "train.max_steps=6", "train.grad_accum=2",
            "train.save_every=3", "task.max_samples=32"]
    runs = {}
    for stage in ("none", "deepspeed_zero2", "deepspeed_zero3"):
        proc = run_cli([*args, f"distributed={stage}", f"hydra.run.dir={tmp_path / stage}"], data_root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        runs[stage] = ([r["loss"] for r in records], json.loads((tmp_path / stage / "summary.json").read_text()),
                       load_file(tmp_path / stage / "adapter" / "adapter_model.safetensors"))
    losses, summary, adapter = runs["none"]
    assert len(set(summary["ranks"].values())) > 1  # global allocation: the comparison covers uneven ranks
    for stage in ("deepspeed_zero2", "deepspeed_zero3"):
        assert runs[stage][0] == pytest.approx(losses, abs=1e-5) and runs[stage][1]["ranks"] == summary["ranks"]
        assert all((runs[stage][2][k] - adapter[k]).abs().max() < 1e-5 for k in adapter)
