"""The generic validation of a composed config (``validate``): values the schemas' types cannot check, every
problem reported at once, each naming its key. A method's own checks live in its config (``MethodConfig.validate``),
which ``validate`` calls."""

from __future__ import annotations

from prunedlora.config import (
    DTYPES,
    EVAL_TASKS,
    EXPORT_FORMATS,
    QUANTIZATIONS,
    RECOVERY_OBJECTIVES,
    SALR_BASE_FORMATS,
    SALR_FORMS,
    SANDBOX_LEVELS,
    ConfigError,
    ExportConfig,
    MethodConfig,
    ModelConfig,
    RecoveryConfig,
    RootConfig,
    check,
    check_one_of,
)

COMPILE_BACKENDS = ("inductor", "aot_eager")
SCHEDULES = ("auto", "none", "constant", "geometric", "linear", "cubic", "one_shot")
TASK_KINDS = ("qa", "text", "mc", "code")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_NAMES = ("adamw", "adamw8bit")


def validate(cfg: RootConfig) -> None:
    """Check values the schema's types cannot, reporting every problem at once.

    Raises:
        ConfigError: one paragraph naming each bad key, its value and what is accepted.
    """
    p: list[str] = []
    check_one_of(p, "model.dtype", cfg.model.dtype, DTYPES)
    check_one_of(p, "model.quantization", cfg.model.quantization, QUANTIZATIONS)
    m = cfg.method
    check(p, m.rank is None or m.rank > 0, f"method.rank={m.rank} must be a positive integer (or null)")
    check(p, m.alpha > 0, f"method.alpha={m.alpha} must be positive")
    check(p, 0 <= m.dropout < 1, f"method.dropout={m.dropout} must be in [0, 1)")
    check(p, bool(m.target_modules), "method.target_modules is empty; name at least one linear, or [all-linear]")
    s = cfg.sparsity
    check_one_of(p, "sparsity.schedule", s.schedule, SCHEDULES)
    check(p, 0 <= s.final < 1, f"sparsity.final={s.final} must be in [0, 1)")
    check(p, 0 <= s.initial <= s.final or s.final == 0, f"sparsity.initial={s.initial} must be in [0, final]")
    check(p, s.every >= 1, f"sparsity.every={s.every} must be >= 1")
    check(p, 0 < s.per_event < 1 or (s.per_event >= 1 and float(s.per_event).is_integer()),
          f"sparsity.per_event={s.per_event} must be a whole number of components (>= 1) or a fraction of the "
          "remaining rank in (0, 1), e.g. 2 or 0.25")
    check(p, 0 < s.end_frac <= 1, f"sparsity.end_frac={s.end_frac} must be in (0, 1] (0.6: the target by 60% of "
          "train.max_steps)")
    check(p, s.warmup_frac + s.cooldown_frac < 1, "sparsity.warmup_frac + sparsity.cooldown_frac must be < 1")
    check_one_of(p, "task.kind", cfg.task.kind, TASK_KINDS)
    zero_stage = (cfg.distributed.deepspeed.get("zero_optimization") or {}).get("stage") \
        if cfg.distributed.name != "none" else None
    base_gradients = m.needs().get("base_gradients")
    check(p, not (base_gradients and zero_stage == 3),
          f"{base_gradients} with distributed=deepspeed_zero3: it reads the frozen base weights' own gradients, which "
          "ZeRO-3 partitions outside any optimizer; use distributed=deepspeed_zero2 (or none), or a setting that "
          "does not need them (for loraprune: criterion channel_taylor, lora_guided or magnitude)")
    _validate_base_rewrite(p, m.needs().get("base_rewrite"), cfg, zero_stage)
    t = cfg.train
    check(p, t.max_steps >= 0, f"train.max_steps={t.max_steps} must be >= 0 (0: evaluate the method's starting "
          "model without training)")
    for key in ("batch_size", "grad_accum", "save_every", "log_every"):
        check(p, getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be >= 1")
    check(p, t.lr > 0, f"train.lr={t.lr} must be positive")
    check_one_of(p, "train.compile_backend", t.compile_backend, COMPILE_BACKENDS)
    check(p, not t.compile or cfg.distributed.name == "none",
          f"train.compile=true with distributed={cfg.distributed.name}: DeepSpeed wraps and (ZeRO-3) partitions the "
          "module behind hooks torch.compile does not trace; use train.compile=false, or distributed=none")
    check(p, not t.compile or cfg.model.quantization == "none",
          f"train.compile=true with model.quantization={cfg.model.quantization}: bitsandbytes' 4-/8-bit layers are "
          "opaque to torch.compile (graph breaks at every layer); use train.compile=false, or model.quantization=none")
    check(p, t.skip_nonfinite >= 0, f"train.skip_nonfinite={t.skip_nonfinite} must be >= 0 (0: stop at the first)")
    check(p, t.skip_nonfinite == 0 or cfg.distributed.name == "none",
          f"train.skip_nonfinite={t.skip_nonfinite} with distributed={cfg.distributed.name}: DeepSpeed applies the "
          "update inside its own step, so a non-finite step cannot be skipped; use train.skip_nonfinite=0 (the run "
          "stops at the first non-finite step) or distributed=none")
    check(p, t.seq_len >= 8, f"train.seq_len={t.seq_len} must be >= 8")
    check(p, 0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)")
    check_one_of(p, "train.scheduler", t.scheduler, LR_SCHEDULES)
    check_one_of(p, "train.optimizer", t.optimizer, OPTIMIZER_NAMES)
    check(p, t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
          f"train.device={t.device} is not one of auto, cpu, cuda, cuda:N")
    for task in cfg.eval.tasks or []:
        check_one_of(p, "eval.tasks", task, EVAL_TASKS)
    check(p, cfg.eval.limit is None or cfg.eval.limit >= 1, f"eval.limit={cfg.eval.limit} must be >= 1 or null")
    for task, limit in cfg.eval.task_limits.items():
        check_one_of(p, "eval.task_limits", task, EVAL_TASKS)
        check(p, limit is None or limit >= 1, f"eval.task_limits.{task}={limit} must be >= 1 (null: use eval.limit)")
    check(p, cfg.eval.seqlen >= 16, f"eval.seqlen={cfg.eval.seqlen} must be >= 16")
    check(p, cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size} must be >= 1")
    check(p, cfg.eval.num_fewshot is None or cfg.eval.num_fewshot >= 0,
          f"eval.num_fewshot={cfg.eval.num_fewshot} must be >= 0 or null")
    check(p, cfg.eval.max_gen_toks is None or cfg.eval.max_gen_toks >= 1,
          f"eval.max_gen_toks={cfg.eval.max_gen_toks} must be >= 1 or null")
    check(p, cfg.eval.humaneval_timeout_s > 0, f"eval.humaneval_timeout_s={cfg.eval.humaneval_timeout_s} must be > 0")
    check_one_of(p, "eval.sandbox", cfg.eval.sandbox, SANDBOX_LEVELS)
    check_one_of(p, "eval.weights", cfg.eval.weights, ("merged", "adapter"))
    check_one_of(p, "eval.salr_form", cfg.eval.salr_form, SALR_FORMS)
    check_one_of(p, "eval.base_format", cfg.eval.base_format, SALR_BASE_FORMATS)
    _validate_export(p, cfg.export, m)
    _validate_recovery(p, cfg.recovery, cfg.model)
    p.extend(m.validate(cfg.sparsity))
    if p:
        raise ConfigError("Invalid configuration: " + "; ".join(p) + ".")


def _validate_base_rewrite(p: list[str], setting: str | None, cfg: RootConfig, zero_stage: int | None) -> None:
    """A method that rewrites frozen base weights while it trains needs them in float and whole in one process."""
    if not setting or cfg.method.schedule(cfg.sparsity) == "one_shot":  # rewritten before training, in float
        return
    check(p, cfg.model.quantization == "none",
          f"{setting} with model.quantization={cfg.model.quantization}: it rewrites the frozen base weights at every "
          "pruning event, and bitsandbytes' packed 4-/8-bit weights cannot be rewritten; use model.quantization=none, "
          "or sparsity.schedule=one_shot (pruned and re-fitted in float before training, then quantized)")
    check(p, cfg.distributed.name == "none",
          f"{setting} with distributed={cfg.distributed.name}: it rewrites frozen base weights at every pruning event, "
          f"which DeepSpeed {'partitions (ZeRO-3)' if zero_stage == 3 else 'runs leave out of their rank-0 export'}; "
          "use distributed=none, or sparsity.schedule=one_shot (pruned and re-fitted before DeepSpeed starts)")


def _validate_export(p: list[str], export: ExportConfig, method: MethodConfig) -> None:
    """``export.formats``: known names, at least one, each one the method writes."""
    if export.formats is None:
        return
    writes = method.export_formats()
    check(p, bool(export.formats), f"export.formats=[] writes nothing; name at least one of {', '.join(writes)} "
                                  f"(null: everything method={method.name} writes)")
    for fmt in export.formats:
        check_one_of(p, "export.formats", fmt, tuple(EXPORT_FORMATS))
        check(p, fmt not in EXPORT_FORMATS or fmt in writes,
              f"export.formats contains {fmt} ({EXPORT_FORMATS.get(fmt)}), which method={method.name} does not write; "
              f"it writes {', '.join(writes)}: drop {fmt}, or set export.formats=null for all of them")
    check(p, len(set(export.formats)) == len(export.formats), f"export.formats={list(export.formats)} names a "
                                                               "format twice")


def _validate_recovery(p: list[str], r: RecoveryConfig, model: ModelConfig) -> None:
    """``recovery``: a known objective whose α agrees with its name, a positive temperature, a held teacher's
    storage."""
    check_one_of(p, "recovery", r.name, tuple(RECOVERY_OBJECTIVES))
    expected = {"ce": r.alpha == 1.0, "distill": r.alpha == 0.0, "mix": 0.0 < r.alpha < 1.0}
    check(p, expected.get(r.name, True),
          f"recovery.alpha={r.alpha} with recovery={r.name}, which means {RECOVERY_OBJECTIVES.get(r.name)}; for "
          "another weight of the cross-entropy choose recovery=mix recovery.alpha=<in (0, 1)> (recovery=ce: 1, "
          "recovery=distill: 0)")
    check(p, r.temperature > 0, f"recovery.temperature={r.temperature} must be > 0 (1: the distributions as they are)")
    check_one_of(p, "recovery.teacher_dtype", r.teacher_dtype, DTYPES)
    check(p, not (r.teacher_offload and model.quantization != "none"),
          f"recovery.teacher_offload=true with model.quantization={model.quantization}: bitsandbytes' packed "
          "weights stay on the device they were quantized on; use recovery.teacher_offload=false (a 4-bit teacher "
          "is already a quarter of a bf16 one)")
