"""``method=loraprune``'s options, their checks, and its registration."""

from __future__ import annotations

from dataclasses import dataclass, field

from prunedlora.config import MethodConfig, SparsityConfig, check, check_one_of
from prunedlora.methods.registry import register
from prunedlora.pruning.criteria import STRUCTURED_CRITERIA
from prunedlora.pruning.schedules import ONE_SHOT

GQA_POLICIES = ("query_head", "kv_group")
SCHEDULES = ("auto", "cubic", "linear", "none", "one_shot")
DEFAULT_SCHEDULE = ONE_SHOT
"""What ``sparsity.schedule=auto`` means for LoRAPrune: cut, re-fit and compact before the first step, then train
the smaller model (it measures best, docs/RESULTS.md "Recovery"); the paper's progressive schedule is ``cubic``."""
REFIT_ANCHORS = ("zero", "kept")
"""``method.refit_anchor`` (``prunedlora.pruning.refit.ANCHORS``; a test keeps the two in step)."""
REFIT_LORA = ("keep", "merge")
"""``method.refit_lora``: what an event's re-fit does with the adapters of o_proj and down_proj."""
SCORES_BEFORE_TRAINING_NEVER = frozenset({"lora_gradients", "base_gradients"})
"""Needs a one-shot cut cannot meet: it scores before the first step, when B = 0 and no training gradient exists."""
STRUCTURES = ("per_layer", "uniform")
HEAD_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CHANNEL_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraPruneConfig(MethodConfig):
    """LoRAPrune (docs/methods.md §5, §5.8): structured pruning of the base (heads, MLP channels), before or while LoRA
    trains.

    The target comes from the ``sparsity`` group: ``sparsity.final`` of the heads and of the channels of every
    prunable layer, cut once before the first step by default (``schedule: auto`` = one_shot); a progressive
    schedule (``cubic``, the paper's; ``linear``) prunes at an event every ``sparsity.every`` optimizer steps
    between ``warmup_frac`` and ``cooldown_frac``.
    """

    name: str = "loraprune"
    dropout: float = 0.05
    """lora_dropout 0.05, as the authors' script (docs/methods.md §5.3)."""
    target_modules: list[str] = field(default_factory=lambda: [*HEAD_PROJECTIONS, *CHANNEL_PROJECTIONS])
    criterion: str = "activation"
    """activation (default: ||X_j|| * ||W[:, j]|| summed over a group's o_proj / down_proj input columns, from the
    calibration pass; with the re-fit and one-shot schedule it measures best, docs/RESULTS.md "Recovery"),
    channel_taylor (|sum_t g * h| over a head's slice of the o_proj input / a channel of the down_proj input),
    activation_taylor (the mean of activation's and channel_taylor's normalised vectors), lora_guided (the paper's:
    |(G_B A + B G_A - G_B G_A) * (W0 + s BA)|, progressive schedules only), magnitude or true_gradient
    (LLM-Pruner's, memory-heavy) (``prunedlora.pruning.criteria.STRUCTURED_CRITERIA``)."""
    calibration_sequences: int = 32
    """activation, activation_taylor and refit: rows of train.seq_len tokens cut from the training data for the
    calibration pass (at each event; once before a one-shot cut)."""
    refit: bool = True
    """At each cut (the one-shot cut, or every event of a progressive schedule), re-solve the kept input columns of
    o_proj and down_proj by damped least squares so the layer's output on the calibration rows stays as it was
    before the cut (layer by layer, one layer's Gram at a time). Nothing pruned (``sparsity=none``): nothing to do."""
    refit_damping: float = 0.01
    """Ridge λ of the re-fit, relative to the mean diagonal of the kept columns' Gram matrix."""
    refit_anchor: str = "zero"
    """zero: ``W G[:, k] (G_kk + λI)⁻¹`` (damped toward 0); kept: damped toward the columns' current weights
    (SparseGPT's; equal to dropping the columns when G = I)."""
    refit_lora: str = "keep"
    """What an event's re-fit does with the adapters of o_proj and down_proj: keep (the base absorbs the re-fit,
    the adapter and its optimizer state stay) or merge (the adapter is merged into the base before the re-fit, B is
    zeroed and the first moments of A and B cleared, so it restarts). Progressive schedules only."""
    ema: float = 0.9
    """Moving-average factor of the group importance, updated every optimizer step."""
    score_power: int = 1
    """1: absolute value of the Taylor term (the authors' code); 2: its square (the paper)."""
    prune_every: int | None = None
    """Unused, must stay null: events happen every ``sparsity.every`` steps (one source of truth)."""
    exempt_first_frac: float = 0.1
    """Never prune the first floor(frac * num_layers) decoder layers."""
    exempt_last: int = 1
    """Never prune the last this many decoder layers."""
    gqa_policy: str = "query_head"
    """query_head: prune query heads, drop a KV head when all its query heads are gone; kv_group."""
    gqa_balanced: bool = True
    """query_head only, no effect under kv_group, whose whole groups are balanced already (default on; the paper's
    script has it off): remove floor(target * G) query heads from every KV group of a layer, so every layer
    stays standard GQA at export (no k/v expansion); fewer heads go when G does not divide evenly."""
    prune_heads: bool = True
    prune_channels: bool = True
    structure: str = "per_layer"
    """per_layer: prune the prunable layers only, each by its own scores (exported as ``pruned_llama``, loaded with
    trust_remote_code). uniform: prune every layer by the same counts (query heads per KV group, KV groups, MLP
    channels), sized to per_layer's exported parameter count under the same settings, so ``model/`` is a plain
    checkpoint of the base's architecture (transformers without remote code, vLLM)."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """LoRAPrune's own checks (docs/methods.md §5, §8 items 13-18)."""
        p: list[str] = []
        check_one_of(p, "method.structure", self.structure, STRUCTURES)
        check(p, self.structure != "uniform" or self.prune_channels,
              "method.structure=uniform matches per_layer's parameter count through the MLP width, and "
              "method.prune_channels=false leaves only whole heads, too coarse to match it; set "
              "method.prune_channels=true or method.structure=per_layer")
        check(p, self.rank is not None, "method.rank=null: loraprune needs a LoRA rank (default 8)")
        check_one_of(p, "method.criterion", self.criterion, STRUCTURED_CRITERIA.names())
        check_one_of(p, "method.gqa_policy", self.gqa_policy, GQA_POLICIES)
        check(p, 0 <= self.ema < 1, f"method.ema={self.ema} must be in [0, 1) (default 0.9)")
        check(p, self.score_power in (1, 2), f"method.score_power={self.score_power} must be 1 or 2")
        check(p, self.prune_every is None,
              f"method.prune_every={self.prune_every} is not used: loraprune prunes every sparsity.every steps, "
              f"the cadence the schedule is computed on; set sparsity.every={self.prune_every} instead")
        check(p, 0 <= self.exempt_first_frac < 1 and self.exempt_last >= 0,
              f"method.exempt_first_frac={self.exempt_first_frac} must be in [0, 1) and method.exempt_last="
              f"{self.exempt_last} >= 0")
        check(p, self.prune_heads or self.prune_channels,
              "method.prune_heads and method.prune_channels are both false: nothing to prune; use method=lora")
        check(p, sparsity.schedule in SCHEDULES,
              f"sparsity.schedule={sparsity.schedule} is not supported by loraprune (its target is a fraction "
              f"of each layer's heads and channels); use one of {', '.join(SCHEDULES)}")
        self._validate_calibrated(p, sparsity)
        if "lora_gradients" in self.needs() and "all-linear" not in self.target_modules:
            needed = (HEAD_PROJECTIONS if self.prune_heads else []) + (CHANNEL_PROJECTIONS if self.prune_channels
                                                                       else [])
            missing = [name for name in needed if name not in self.target_modules]
            check(p, not missing, f"method.target_modules lacks {missing}: criterion {self.criterion} scores a group "
                                  "from the LoRA gradients of every projection in it; add them, or use "
                                  "method.criterion=activation (the default), channel_taylor or magnitude")
        return p

    def _validate_calibrated(self, p: list[str], sparsity: SparsityConfig) -> None:
        """The re-fit's options, and what a one-shot cut (before the first step) can score."""
        check(p, self.calibration_sequences >= 1,
              f"method.calibration_sequences={self.calibration_sequences} must be >= 1 (default 32)")
        check(p, self.refit_damping >= 0, f"method.refit_damping={self.refit_damping} must be >= 0 (default 0.01)")
        check_one_of(p, "method.refit_anchor", self.refit_anchor, REFIT_ANCHORS)
        check_one_of(p, "method.refit_lora", self.refit_lora, REFIT_LORA)
        if self.schedule(sparsity) == ONE_SHOT and self.criterion in STRUCTURED_CRITERIA:
            unmet = STRUCTURED_CRITERIA[self.criterion].needs & SCORES_BEFORE_TRAINING_NEVER
            able = [c.name for c in STRUCTURED_CRITERIA
                    if not any(STRUCTURED_CRITERIA[n].needs & SCORES_BEFORE_TRAINING_NEVER for n in c.parts)]
            check(p, not unmet, f"method.criterion={self.criterion} with sparsity.schedule=one_shot: the cut happens "
                                f"before the first step, when LoRA's B is zero and no training gradient exists, so "
                                f"{self.criterion} cannot score it; use method.criterion={' or '.join(able)}, or a "
                                "progressive sparsity.schedule (cubic, the paper's)")

    def schedule(self, sparsity: SparsityConfig) -> str:
        """``sparsity.schedule``, ``auto`` being ``DEFAULT_SCHEDULE`` (one_shot)."""
        return DEFAULT_SCHEDULE if sparsity.schedule == "auto" else sparsity.schedule

    def needs(self) -> dict[str, str]:
        """What ``method.criterion`` and ``method.refit`` need from the run (``NEEDS`` keys), by the setting."""
        needs = {}
        if self.criterion in STRUCTURED_CRITERIA:
            needs = dict.fromkeys(STRUCTURED_CRITERIA[self.criterion].needs, f"method.criterion={self.criterion}")
        if self.refit:
            needs.update(dict.fromkeys(("input_gram", "base_rewrite"), "method.refit=true"))
        return needs

    def export_formats(self) -> tuple[str, ...]:
        """model/ only: the LoRA is merged into the physically pruned base, on which no adapter of the
        original base fits."""
        return ("hf",)


# starts_at_base=False: the default one-shot cut prunes before the first step (a progressive schedule starts at the
# base); sparsity.every=1 gives a progressive schedule an event at every step.
register("loraprune", schema=LoraPruneConfig, factory="prunedlora.methods.loraprune.method:LoraPruneMethod",
         starts_at_base=False, smoke_overrides=("model.tiny.num_hidden_layers=3", "sparsity.every=1"))
