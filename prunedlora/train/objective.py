"""The recovery objective of one micro-batch: ``α · CE + (1 - α) · KL(teacher || student)`` (the ``recovery`` group).

``α = 1`` (``recovery=ce``, the default) is the model's own cross-entropy and nothing else: no teacher exists and no
teacher forward runs, so a CE run computes exactly what it did before there was a choice. Below 1, per micro-batch:

1. the teacher's logits, under ``no_grad`` and in eval mode (no dropout: the teacher is deterministic and draws no
   random numbers, so a resumed run is bit-exact), inside the caller's autocast; a 4-bit base computes with the
   kernel and layout training uses (``cpu_repack_disabled``: an eval-mode forward would otherwise repack it in place
   on some CPUs, for the student too);
2. the student's forward with the labels (its cross-entropy, as before);
3. ``distill_kl`` on the same counted tokens with the same mean (``train/distill.py``), mixed by ``mix_losses``.

The engine divides the mixed loss by ``grad_accum`` (or DeepSpeed does) exactly as it did the cross-entropy, so both
terms accumulate alike. The teacher is the unpruned model, in one of two places (``Method.teacher_source``):

- ``SwitchedTeacher``: the training model itself inside ``Method.teacher(model)``, which switches off what the
  method added (adapters, masks, pruned weights). It runs through the engine's eager module: under DeepSpeed the
  engine's forward, so ZeRO-3 gathers the parameters the usual way; under ``train.compile`` the uncompiled module,
  so the compiled training graph is neither broken nor recompiled (the swaps are undone before the student runs).
- ``HeldTeacher``: a separate frozen model, the base loaded before the method attached (``build_held_teacher``), in
  ``recovery.teacher_dtype`` (or quantized like the base), optionally offloaded to CPU memory layer by layer
  (``accelerate.cpu_offload``).

``loss_ce`` and ``loss_kl`` (means over the step's micro-batches) join the step's figures in ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

from prunedlora.config import ModelConfig, RecoveryConfig
from prunedlora.methods.base import Method, TeacherStorage
from prunedlora.models.quantize import cpu_repack_disabled, stored_bytes
from prunedlora.train.distill import distill_kl, mix_losses

log = logging.getLogger(__name__)

Forward = Callable[..., Any]
"""A model call: ``forward(**batch)`` returns a transformers ``CausalLMOutput``."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode; every module's own ``training`` flag is put back on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its labels: the teacher computes logits only, never a loss."""
    return {k: v for k, v in batch.items() if k != "labels"}


class Teacher(Protocol):
    """Where a distilling run's teacher logits come from."""

    def logits(self, forward: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(batch, seq, vocab)`` teacher logits of ``batch``; ``forward`` is the engine's eager model call."""
        ...

    def held_bytes(self) -> int:
        """Bytes of teacher weights kept beside the training model."""
        ...


class SwitchedTeacher:
    """The training model with the method's additions switched off (``Method.teacher``)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        self.model, self.method = model, method

    def logits(self, forward: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), eval_mode(self.model), self.method.teacher(self.model), cpu_repack_disabled(self.model):
            return forward(**_inputs(batch)).logits

    def held_bytes(self) -> int:
        return self.method.teacher_held_bytes()


class HeldTeacher:
    """A separate frozen model (``build_held_teacher``): the engine's forward is not used."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def logits(self, forward: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), cpu_repack_disabled(self.model):
            return self.model(**_inputs(batch)).logits

    def held_bytes(self) -> int:
        return stored_bytes(self.model)


class Objective:
    """The loss of a micro-batch, and the means of its two terms over the micro-batches of a step.

    Args:
        alpha: α, the weight of the cross-entropy (1: cross-entropy alone; no teacher needed).
        temperature: T of the KL term.
        teacher: where the teacher logits come from (needed when ``alpha < 1``).
    """

    def __init__(self, alpha: float = 1.0, temperature: float = 1.0, teacher: Teacher | None = None) -> None:
        if alpha < 1.0 and teacher is None:
            raise ValueError(f"recovery.alpha={alpha} < 1 weighs the KL term, which needs a teacher")
        self.alpha, self.temperature, self.teacher = alpha, temperature, teacher
        self._parts: list[torch.Tensor] = []

    @property
    def distills(self) -> bool:
        return self.alpha < 1.0

    def loss(self, student: Forward, teacher_forward: Forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's loss through ``student`` (the engine's training call, maybe compiled); ``teacher_forward``
        is the engine's eager call of the same model, for a ``SwitchedTeacher``."""
        if not self.distills:
            return student(**batch).loss
        teacher_logits = self.teacher.logits(teacher_forward, batch)  # first: its activations are gone before ours
        out = student(**batch)
        kl = distill_kl(out.logits, teacher_logits, batch["labels"], temperature=self.temperature)
        self._parts.append(torch.stack([out.loss.detach().float(), kl.detach().float()]))
        return mix_losses(out.loss, kl, self.alpha)

    def take_figures(self) -> dict[str, float]:
        """``loss_ce`` and ``loss_kl``, means over the micro-batches since the last call (none for ``α = 1``)."""
        if not self._parts:
            return {}
        ce, kl = torch.stack(self._parts).mean(0).tolist()  # one host sync per step
        self._parts.clear()
        return {"loss_ce": ce, "loss_kl": kl}


def storage(recovery: RecoveryConfig) -> TeacherStorage | None:
    """What ``AttachContext.teacher`` says for this objective: None when nothing distills."""
    return TeacherStorage(recovery.teacher_dtype, recovery.teacher_offload) if recovery.distills else None


def build_held_teacher(model_cfg: ModelConfig, recovery: RecoveryConfig, device: torch.device) -> nn.Module:
    """The unpruned base as a separate frozen model, loaded as the run loads its own (``teacher_source = "copy"``).

    Stored in ``recovery.teacher_dtype`` (a quantized base is loaded quantized the same way: the teacher is the
    quantized base); with ``recovery.teacher_offload`` its weights stay in CPU memory and each module's go to the
    device only for its forward (``accelerate.cpu_offload``; on a CPU run that moves nothing). Loading draws no random
    number from the run's generators (a tiny model's initialisation is forked), so the run trains as it would with any
    other teacher.
    """
    from prunedlora.models.load import load_model

    quantized = model_cfg.quantization != "none"
    cfg = model_cfg if quantized else replace(model_cfg, dtype=recovery.teacher_dtype)
    offload = recovery.teacher_offload  # validation refuses it on a quantized base
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        teacher, _ = load_model(cfg, "cpu" if offload else device)
    teacher.requires_grad_(False)
    teacher.eval()
    if offload:
        from accelerate import cpu_offload

        cpu_offload(teacher, execution_device=device)
    return teacher


def build_objective(recovery: RecoveryConfig, method: Method, model: nn.Module,
                    held: nn.Module | None = None) -> Objective:
    """The run's objective: cross-entropy alone, or the mix with the teacher ``method.teacher_source`` names
    (``held``: the copy ``build_held_teacher`` loaded)."""
    if not recovery.distills:
        return Objective()
    if method.teacher_source == "copy":
        if held is None:
            raise ValueError(f"method={method.name} distills from a separate copy of the base, but none was built")
        return Objective(recovery.alpha, recovery.temperature, HeldTeacher(held))
    teacher = SwitchedTeacher(model, method)
    if recovery.teacher_offload and not teacher.held_bytes():
        log.warning("recovery.teacher_offload=true has no effect with method=%s: its teacher is the training model "
                    "with the method's additions switched off, which holds no weights to offload", method.name)
    return Objective(recovery.alpha, recovery.temperature, teacher)
