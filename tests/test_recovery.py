"""The recovery objective (``recovery`` group, ``train/objective.py``): config, teacher per method, training.

The loss math itself is ``test_distill.py``'s. Here: the options compose and refuse bad values; a method's YAML can
choose its default objective; the KL term is exactly zero while the student is the unpruned model; the teacher is the
unpruned model after every method's pruning events (its logits equal the base's logits before ``attach``, in float32
and under bf16 autocast); gradient accumulation, a resume after a crash or a ``kill -9`` and a separately held
teacher train exactly as they should. ZeRO-2/3: ``test_deepspeed.py``; an nf4 base: ``test_quantized.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch
from cli_helpers import BIN, TINY, cli_env, logged_steps, run_cli
from recipe_helpers import TINY_OVERRIDES, compose_root, crash_then_resume, metric_records, throwaway_method

from prunedlora.config import ConfigError
from prunedlora.methods import METHODS, method_spec
from prunedlora.methods.base import AttachContext, Callback, TeacherStorage
from prunedlora.methods.lora.config import LoraConfig
from prunedlora.methods.lora.method import LoraMethod
from prunedlora.train import checkpoint as ckpt
from prunedlora.train import recipe
from prunedlora.train.engine import autocast_context
from prunedlora.train.objective import Objective, SwitchedTeacher
from prunedlora.train.rundir import config_differences
from prunedlora.validation import validate

STEPS = ["train.max_steps=6", "train.save_every=3", "train.grad_accum=2", "train.packing=true"]
MIX = ["recovery=mix", "recovery.teacher_dtype=float32", "recovery.temperature=2.0"]
"""An even mix, T = 2, and teacher weights held in float32 so that a held teacher is the base bit for bit."""


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, name, alpha", [
    ([], "ce", 1.0),
    (["recovery=distill"], "distill", 0.0),
    (["recovery=mix"], "mix", 0.5),
    (["recovery=mix", "recovery.alpha=0.25"], "mix", 0.25),
])
def test_the_options_compose_to_their_weight(overrides: list[str], name: str, alpha: float) -> None:
    cfg = compose_root(["model=tiny", *overrides])
    assert (cfg.recovery.name, cfg.recovery.alpha, cfg.recovery.temperature) == (name, alpha, 1.0)
    assert cfg.recovery.distills is (alpha < 1)
    validate(cfg)


MEASURED_DEFAULTS = {"loraprune": "mix", "salr": "mix", "prunedlora": "mix"}
"""The objectives the recovery grid measured best (docs/RESULTS.md "Recovery"; PrunedLoRA's in both seeds); the
methods it did not measure (lora, droplora, adalora) train on cross-entropy."""


def test_each_method_defaults_to_the_objective_that_measured_best() -> None:
    for name in METHODS:
        expected = MEASURED_DEFAULTS.get(name, "ce")
        recovery = compose_root(["model=tiny", f"method={name}"]).recovery
        assert (recovery.name, recovery.alpha) == (expected, 0.5 if expected == "mix" else 1.0), name
        assert compose_root(["model=tiny", f"method={name}", "recovery=ce"]).recovery.name == "ce", name


def test_a_method_yaml_chooses_its_default_objective_and_the_command_line_wins(tmp_path: Path) -> None:
    """The mechanism a method uses once measurement picks its default (README, "Recovery objective")."""
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "lora_mixed.yaml").write_text(
        "defaults:\n  - /schema/method/lora@_here_\n  - override /recovery@_global_.recovery: mix\n  - _self_\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    assert compose_root(["model=tiny", searchpath, "method=lora_mixed"]).recovery.name == "mix"
    for last in (["recovery=distill"], ["recovery=ce"]):
        for overrides in ([searchpath, "method=lora_mixed", *last], [searchpath, *last, "method=lora_mixed"]):
            assert compose_root(["model=tiny", *overrides]).recovery.name == last[0].split("=")[1], overrides


@pytest.mark.parametrize("overrides, named", [
    (["recovery.alpha=0.5"], "recovery.alpha=0.5 with recovery=ce"),
    (["recovery=distill", "recovery.alpha=0.1"], "recovery.alpha=0.1 with recovery=distill"),
    (["recovery=mix", "recovery.alpha=1.5"], "recovery.alpha=1.5 with recovery=mix"),
    (["recovery=mix", "recovery.alpha=0.0"], "recovery.alpha=0.0 with recovery=mix"),
    (["recovery.name=kd"], "recovery=kd is not one of ce, distill, mix"),
    (["recovery=mix", "recovery.temperature=0"], "recovery.temperature=0"),
    (["recovery=mix", "recovery.teacher_dtype=int8"], "recovery.teacher_dtype=int8"),
    (["recovery=mix", "recovery.teacher_offload=true", "model.quantization=nf4"],
     "recovery.teacher_offload=true with model.quantization=nf4"),
])
def test_bad_settings_are_refused_up_front_naming_the_key(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("+", r"\+")):
        validate(compose_root(["model=tiny", *overrides]))


def test_changing_the_objective_between_starts_is_a_different_run() -> None:
    """The run-directory guard: the objective is part of the run; a run from before the group is a CE run."""
    ce, mix = (json.loads(json.dumps(asdict(compose_root(["model=tiny", *o])))) for o in ([], ["recovery=mix"]))
    assert config_differences(ce, mix) == ["recovery.alpha", "recovery.name"]
    legacy = {k: v for k, v in ce.items() if k != "recovery"}
    assert config_differences(legacy, ce) == []
    assert config_differences(legacy, mix) == ["recovery.alpha", "recovery.name"]


# -------------------------------------------------------------------------------------------- objective
def _lora_on_tiny(tiny_model: torch.nn.Module, nonzero_b: bool) -> tuple[torch.nn.Module, LoraMethod]:
    import copy

    model = copy.deepcopy(tiny_model)
    method = LoraMethod(LoraConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]), None)
    torch.manual_seed(0)
    method.attach(model)
    if nonzero_b:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
    return model.train(), method


def _batch(rows: int, width: int = 24, seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 200, (rows, width), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt: the same count of tokens in every row
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_while_the_student_is_the_unpruned_model_the_kl_is_zero_and_the_loss_is_alpha_ce(tiny) -> None:
    model, method = _lora_on_tiny(tiny, nonzero_b=False)  # B = 0: LoRA computes the base exactly
    objective = Objective(0.5, 2.0, SwitchedTeacher(model, method))
    batch = _batch(2)
    loss = objective.loss(model, model, batch)
    figures = objective.take_figures()
    ce = model(**batch).loss
    assert figures["loss_kl"] == 0.0 and figures["loss_ce"] == ce.item()
    assert loss.item() == (0.5 * ce).item()
    assert objective.take_figures() == {}  # taken once per step
    assert model.training  # the teacher ran in eval mode, and the modes are back


def test_the_default_teacher_is_the_base_and_puts_every_adapter_back(tiny) -> None:
    model, method = _lora_on_tiny(tiny, nonzero_b=True)
    before = dict(model.named_modules())
    ids = _batch(2)["input_ids"]
    with torch.no_grad():
        base = tiny(ids).logits
        with method.teacher(model):
            teacher = model(ids).logits
        student = model(ids).logits
    assert torch.equal(teacher, base) and not torch.allclose(student, base)
    assert dict(model.named_modules()) == before


def test_accumulating_two_micro_batches_of_one_equals_one_batch_of_two(tiny) -> None:
    """Both terms are means over the counted tokens, divided by ``grad_accum`` like the cross-entropy: with rows of
    equal counts, 2 x 1 and 1 x 2 give the same gradient, update and logged terms."""
    from prunedlora.train.engine import TorchEngine

    batch = _batch(2)
    results = []
    for accum in (1, 2):
        model, method = _lora_on_tiny(tiny, nonzero_b=True)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        engine = TorchEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                             grad_accum=accum, max_grad_norm=None, device=torch.device("cpu"), bf16=False,
                             objective=Objective(0.3, 2.0, SwitchedTeacher(model, method)))
        rows = [batch] if accum == 1 else [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)]
        for i, micro in enumerate(rows):
            engine.micro_step(micro, boundary=i == len(rows) - 1)
        grads = [p.grad.clone() for p in params]
        figures = engine.optimizer_step()
        results.append((grads, [p.detach().clone() for p in params], figures))
    (g1, p1, f1), (g2, p2, f2) = results
    for a, b in zip(g1 + p1, g2 + p2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert f1["loss_kl"] > 0 and f1["loss_kl"] == pytest.approx(f2["loss_kl"], rel=1e-5)
    assert f1["loss_ce"] == pytest.approx(f2["loss_ce"], rel=1e-6)


def test_a_skipped_step_logs_none_of_its_terms(tiny) -> None:
    from prunedlora.train.engine import TorchEngine

    model, method = _lora_on_tiny(tiny, nonzero_b=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = TorchEngine(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
                         grad_accum=1, max_grad_norm=None, device=torch.device("cpu"), bf16=False,
                         objective=Objective(0.5, 1.0, SwitchedTeacher(model, method)))
    engine.micro_step(_batch(1), boundary=True)
    engine.skip_step()
    engine.micro_step(_batch(1, seed=4), boundary=True)
    figures = engine.optimizer_step()
    assert figures["loss_ce"] == pytest.approx(model(**_batch(1, seed=4)).loss.item(), rel=1e-2)
    assert engine.objective.take_figures() == {}


def test_offloading_a_teacher_that_holds_nothing_says_it_has_no_effect(tiny, caplog: pytest.LogCaptureFixture
                                                                       ) -> None:
    from prunedlora.config import RecoveryConfig
    from prunedlora.train.objective import build_objective

    model, method = _lora_on_tiny(tiny, nonzero_b=False)
    for offload in (False, True):
        caplog.clear()
        objective = build_objective(RecoveryConfig("mix", 0.5, teacher_offload=offload), method, model)
        assert isinstance(objective.teacher, SwitchedTeacher)
        assert ("recovery.teacher_offload=true has no effect with method=lora" in caplog.text) is offload


def test_salr_holds_the_dense_weights_in_the_teacher_dtype_and_nothing_without_distillation(tiny) -> None:
    """What SALR's teacher costs: one copy of every pruned linear in ``recovery.teacher_dtype``, outside the model."""
    import copy

    from prunedlora.config import SparsityConfig
    from prunedlora.methods.salr.config import SalrConfig
    from prunedlora.methods.salr.method import SalrMethod

    cfg = SalrConfig(base_criterion="magnitude", residual_rank=2, rank=2)
    targets = sum(m.weight.numel() for n, m in tiny.named_modules() if n.rsplit(".", 1)[-1] in cfg.target_modules)
    for storage, size in ((TeacherStorage("bfloat16"), 2), (TeacherStorage("float32"), 4), (None, 0)):
        model = copy.deepcopy(tiny)
        method = SalrMethod(cfg, SparsityConfig(final=0.5))
        method.prepare(AttachContext(teacher=storage))
        method.attach(model)
        assert method.teacher_held_bytes() == size * targets
        assert not any("dense" in n for n, _ in model.named_modules())  # the copies are not part of the model
    with pytest.raises(RuntimeError, match="holds no dense weights"), method.teacher(model):
        pass


# ------------------------------------------------------------------------------- every method, recipe
class TeacherProbe(Callback):
    """At the last step, after its pruning event: the run's teacher's logits of ``tokens`` (wherever it is)."""

    def __init__(self, seen: dict, max_steps: int) -> None:
        self.seen, self.max_steps = seen, max_steps

    def on_train_start(self, model, optimizer, max_steps) -> None:
        self.model = model

    def on_step_end(self, step: int) -> dict:
        if step == self.max_steps:
            teacher, bf16 = self.seen["objective"].teacher, self.seen.get("bf16", False)
            with autocast_context(torch.device("cpu"), bf16):  # as the engine runs it
                self.seen["teacher"] = teacher.logits(self.model, {"input_ids": self.seen["tokens"]}).float()
            self.seen["student"] = _eval_logits(self.model, self.seen["tokens"], bf16)
        return {}


def _eval_logits(model: torch.nn.Module, tokens: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    from prunedlora.train.objective import eval_mode

    with torch.no_grad(), eval_mode(model), autocast_context(torch.device("cpu"), bf16):
        return model(tokens).logits.float()


def _instrument(monkeypatch: pytest.MonkeyPatch, seen: dict, max_steps: int) -> None:
    """The base's logits before ``attach``, the run's objective, and a ``TeacherProbe`` among the callbacks."""
    build, build_objective = recipe.build_method, recipe.build_objective

    def instrumented(*args, **kwargs):
        method = build(*args, **kwargs)
        attach, callbacks = method.attach, method.callbacks

        def attach_and_look(model):
            seen["base"] = _eval_logits(model, seen["tokens"], seen.get("bf16", False))
            return attach(model)

        method.attach = attach_and_look
        method.callbacks = lambda: [*callbacks(), TeacherProbe(seen, max_steps)]
        return method

    def objective_seen(*args, **kwargs):
        seen["objective"] = build_objective(*args, **kwargs)
        return seen["objective"]

    monkeypatch.setattr(recipe, "build_method", instrumented)
    monkeypatch.setattr(recipe, "build_objective", objective_seen)


PROGRESSIVE = ["sparsity.schedule=cubic", "method.criterion=channel_taylor", "method.refit=false",
               "method.gqa_balanced=false"]
"""LoRAPrune's progressive method with no re-fit: its masks are the only change, so its teacher is itself."""
LORAPRUNE_CASES = {  # extra overrides, the teacher's source, whether step 1's student is the base
    "loraprune": ([], "copy", False),  # the default: the one-shot cut re-fits and compacts the base before step 1
    "loraprune-progressive": (PROGRESSIVE, "self", True),
    "loraprune-refit": ([*PROGRESSIVE[:3], "method.refit=true"], "copy", True),  # re-fits at each event
}


@pytest.mark.slow  # one tiny recipe run per method
@pytest.mark.parametrize("case", sorted({*METHODS, *LORAPRUNE_CASES}))
def test_the_teacher_is_the_unpruned_model_after_the_methods_pruning(case: str, data_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    name = "loraprune" if case in LORAPRUNE_CASES else case
    spec = method_spec(name)
    extra, expected_source, starts_at_base = LORAPRUNE_CASES.get(case, ([], "self", spec.starts_at_base))
    seen = {"tokens": torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7))}
    _instrument(monkeypatch, seen, 6)
    cfg = compose_root([*TINY_OVERRIDES, f"method={name}", *spec.smoke_overrides, *extra, *STEPS, *MIX], data_root)
    summary = recipe.run(cfg, tmp_path)
    torch.testing.assert_close(seen["teacher"], seen["base"], atol=1e-5, rtol=0)
    assert not torch.equal(seen["student"], seen["base"])  # the switch is not vacuous: the student differs
    records = metric_records(tmp_path)
    for r in records:  # the logged loss is the mix of the logged terms (means over the step's micro-batches)
        assert r["loss"] == pytest.approx(0.5 * r["loss_ce"] + 0.5 * r["loss_kl"], rel=1e-5)
    if starts_at_base:  # step 1's student is the base
        assert records[0]["loss_kl"] == 0.0
    else:  # SALR and one-shot LoRAPrune start pruned
        assert records[0]["loss_kl"] > 0.0
    source = recipe.build_method(cfg.method, cfg.sparsity).teacher_source
    assert source == expected_source
    assert {k: summary["recovery"][k] for k in ("objective", "alpha", "temperature", "teacher")} == \
        {"objective": "mix", "alpha": 0.5, "temperature": 2.0, "teacher": source}
    held = summary["recovery"]["teacher_held_mb"]
    assert held > 0 if name == "salr" or source == "copy" else held == 0


@pytest.mark.slow  # three tiny recipe runs
@pytest.mark.parametrize("case", ["loraprune", "loraprune-progressive", "salr"])
def test_under_bf16_autocast_the_teacher_is_the_base_as_autocast_computes_it(case: str, data_root: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.bf16=true`` with the default teacher storage (``recovery.teacher_dtype=bfloat16``): after the pruning,
    progressive LoRAPrune's switched-off model and SALR's bf16 dense weights give exactly the logits the base gives
    under the same autocast (a bf16 copy holds the very weight autocast would multiply with); one-shot LoRAPrune's
    held copy is a whole bf16 model (norms and residual stream too), equal to bf16 precision. Both terms train."""
    name = "loraprune" if case in LORAPRUNE_CASES else case
    extra, source, starts_at_base = LORAPRUNE_CASES.get(case, ([], "self", False))
    seen = {"tokens": torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7)), "bf16": True}
    _instrument(monkeypatch, seen, 6)
    cfg = compose_root([*TINY_OVERRIDES, f"method={name}", *method_spec(name).smoke_overrides, *extra, *STEPS,
                        "recovery=mix", "train.bf16=true"], data_root)
    summary = recipe.run(cfg, tmp_path)
    if source == "copy":  # a bf16 model against float32 weights under bf16 autocast: a few bf16 roundings apart
        torch.testing.assert_close(seen["teacher"], seen["base"], atol=0.03, rtol=0)
    else:
        assert torch.equal(seen["teacher"], seen["base"])
    assert not torch.equal(seen["student"], seen["base"])
    records = metric_records(tmp_path)
    for r in records:
        assert r["loss"] == pytest.approx(0.5 * r["loss_ce"] + 0.5 * r["loss_kl"], rel=1e-5)
    assert (records[0]["loss_kl"] == 0.0) is starts_at_base and records[-1]["loss_kl"] > 0.0
    holds = name == "salr" or source == "copy"
    assert summary["recovery"].get("teacher_dtype") == ("bfloat16" if holds else None)


@pytest.mark.slow
def test_a_distilling_run_resumes_bit_exactly_after_a_crash(data_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRAPrune: masks switched off and back on inside every teacher forward, a pruning event before the crash;
    3 steps + crash + resume + 3 steps equal 6 steps exactly (losses, both terms, adapter and callback state)."""
    cfg = compose_root([*TINY_OVERRIDES, "method=loraprune", *method_spec("loraprune").smoke_overrides, *STEPS,
                        *MIX], data_root)
    recipe.run(cfg, tmp_path / "full")
    crash_then_resume(cfg, tmp_path / "resumed", 3 * 2 + 1, monkeypatch)
    keys = ("step", "loss", "loss_ce", "loss_kl", "grad_norm")
    runs = [[{k: r[k] for k in keys} for r in metric_records(tmp_path / d)] for d in ("full", "resumed")]
    assert runs[0] == runs[1] and len(runs[0]) == 6
    final = [ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / d / "checkpoints")) for d in ("full", "resumed")]
    for key, value in final[0][ckpt.ADAPTER_KEY].items():
        assert torch.equal(value, final[1][ckpt.ADAPTER_KEY][key]), key


@pytest.mark.slow  # three CLI runs of a slightly wider tiny model
def test_a_distilling_run_killed_with_sigkill_resumes_bit_exactly(data_root: Path, tmp_path: Path) -> None:
    """SALR (the dense copies are held again from a fresh process's base), the default bf16 teacher storage, dropout
    on (the RNG resumes too): kill -9 mid-training, then the same command gives the same losses and terms, bit for bit,
    as a run never killed."""
    args = [*TINY, "method=salr", "method.calibration_sequences=4", "method.dropout=0.1", "recovery=mix",
            "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512", "train.max_steps=12",
            "train.save_every=2", "eval.enabled=false"]
    straight = run_cli(["prunedlora-train", *args, f"hydra.run.dir={tmp_path / 'straight'}"], data_root)
    assert straight.returncode == 0, straight.stderr[-3000:]
    victim = tmp_path / "victim"
    proc = subprocess.Popen([str(BIN / "prunedlora-train"), *args, f"hydra.run.dir={victim}"], env=cli_env(data_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and logged_steps(victim / "metrics.jsonl") < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (victim / "summary.json").exists()
    resumed = run_cli(["prunedlora-train", *args, f"hydra.run.dir={victim}"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    keys = ("step", "loss", "loss_ce", "loss_kl", "grad_norm")
    runs = [[{k: r[k] for k in keys} for r in metric_records(d)] for d in (tmp_path / "straight", victim)]
    assert runs[0] == runs[1] and len(runs[0]) == 12 and runs[0][0]["loss_kl"] > 0


# ---------------------------------------------------------------------------------- a held copy teacher
@dataclass
class CopyTeacherLoraConfig(LoraConfig):
    name: str = "lora_copy_teacher"


class CopyTeacherLora(LoraMethod):
    """LoRA whose teacher is a separately held copy of the base (what a method that compacts the model uses)."""

    teacher_source = "copy"


@pytest.fixture
def lora_copy_teacher() -> Iterator[str]:
    with throwaway_method("lora_copy_teacher", CopyTeacherLoraConfig, CopyTeacherLora) as name:
        yield name


@pytest.mark.slow
def test_a_held_copy_of_the_base_teaches_exactly_what_the_switched_off_model_does(
        lora_copy_teacher: str, data_root: Path, tmp_path: Path) -> None:
    """Loading the copy draws no random number from the run, and in float32 it is the base: the runs are identical,
    offloaded or not (on CPU the offload hooks move nothing, but they run); the copy's memory is reported."""
    runs = {}
    for name, extra in (("lora", []), (lora_copy_teacher, []), ("offloaded", ["recovery.teacher_offload=true"])):
        method = "lora" if name == "lora" else lora_copy_teacher
        cfg = compose_root([*TINY_OVERRIDES, f"method={method}", *STEPS, *MIX, "train.max_steps=3", *extra], data_root)
        summary = recipe.run(cfg, tmp_path / name)
        runs[name] = (summary, [(r["loss"], r["loss_kl"]) for r in metric_records(tmp_path / name)])
    own, copy, offloaded = runs["lora"], runs[lora_copy_teacher], runs["offloaded"]
    assert own[1] == copy[1] == offloaded[1]
    assert own[1][0][1] == 0.0 and own[1][-1][1] > 0.0
    assert copy[0]["recovery"]["teacher"] == "copy" and own[0]["recovery"]["teacher"] == "self"
    # float32 weights (and the rotary frequencies, a few bytes)
    assert copy[0]["recovery"]["teacher_held_mb"] == pytest.approx(4 * own[0]["params_total"] / 2**20, rel=1e-3)
    assert offloaded[0]["recovery"]["teacher_offload"] is True


def test_a_run_with_the_default_objective_builds_no_teacher(data_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``recovery=ce``: no teacher forward at all (zero overhead), no loss terms logged, the objective recorded."""
    calls = []
    monkeypatch.setattr(SwitchedTeacher, "logits", lambda self, *a: calls.append(1))
    cfg = compose_root([*TINY_OVERRIDES, "train.max_steps=2", "train.packing=true"], data_root)
    summary = recipe.run(cfg, tmp_path)
    assert not calls and summary["recovery"] == {"objective": "ce", "alpha": 1.0, "temperature": 1.0}
    assert all("loss_kl" not in r for r in metric_records(tmp_path))
    assert replace(cfg.recovery).distills is False
