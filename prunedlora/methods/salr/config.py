"""``method=salr``'s options, their checks, and its registration."""

from __future__ import annotations

from dataclasses import dataclass, field

from prunedlora.config import SALR_BASE_FORMATS, MethodConfig, SparsityConfig, check, check_one_of
from prunedlora.methods.registry import register
from prunedlora.pruning.criteria import BASE_CRITERIA
from prunedlora.pruning.schedules import ONE_SHOT


@dataclass
class SalrConfig(MethodConfig):
    name: str = "salr"
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    residual_rank: int = 8
    """Rank of the truncated-SVD residual adapter (0: none; docs/methods.md §6.2 item 3)."""
    pattern: str = "unstructured"
    """unstructured (magnitude threshold) or 2:4 (2 largest |w| of every 4 input columns: always 50%)."""
    scope: str = "per_matrix"
    """per_matrix or global magnitude threshold (docs/methods.md §8 item 22); unstructured only."""
    residual_trainable: bool = True
    """Train the residual adapter (the paper's default); false freezes it at its SVD init."""
    svd: str = "auto"
    """full (torch.linalg.svd), lowrank (torch.svd_lowrank, full-SVD fallback if the 1 - r/n bound fails)
    or auto (full up to min(d_out, d_in) = 256, lowrank above)."""
    base_format: str = "dense"
    """How the sparse base runs in this run (training and its own evaluation), one of ``SALR_BASE_FORMATS`` (the
    converters: ``prunedlora.methods.salr.formats.BASE_FORMATS``): dense (masked ``nn.Linear``, the reference),
    bitmap (decode then GEMM), fused (the fused bitmap kernel where no gradient flows to the input, else decode then
    GEMM), auto (fused or dense, timed per shape) or semi_structured (PyTorch 2:4 kernels, CUDA, pattern=2:4). The
    export is the same whatever it is."""
    base_criterion: str = "wanda"
    """How the base is pruned: wanda (default: |W_ij| * ||X_j||, per output row, from a calibration pass; it
    measures best after fine-tuning, docs/RESULTS.md), sparsegpt (OBS with weight updates, same pass) or magnitude
    (the SALR paper's) (``prunedlora.pruning.criteria.BASE_CRITERIA``). Pruning methods: docs/methods.md
    Decisions item 0."""
    calibration_sequences: int = 32
    """wanda/sparsegpt: rows of train.seq_len tokens cut from the training data for the calibration pass."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """SALR's own checks (docs/methods.md §6.4): one-shot pruning, pattern/scope/format combinations."""
        p: list[str] = []
        check(p, self.rank is not None, "method.rank=null: salr needs the task LoRA rank (e.g. 8)")
        check(p, self.residual_rank >= 0, f"method.residual_rank={self.residual_rank} must be >= 0")
        check(p, self.pattern in ("unstructured", "2:4"),
              f"method.pattern={self.pattern} is not one of unstructured, 2:4 (in YAML write \"2:4\" quoted: "
              "unquoted, YAML reads 2:4 as the base-60 number 124)")
        check_one_of(p, "method.scope", self.scope, ("per_matrix", "global"))
        check_one_of(p, "method.svd", self.svd, ("auto", "full", "lowrank"))
        check_one_of(p, "method.base_format", self.base_format, SALR_BASE_FORMATS)
        check(p, self.pattern != "2:4" or sparsity.final == 0.5,
              f"method.pattern=2:4 always prunes exactly 50% (2 of every 4 weights), but sparsity.final="
              f"{sparsity.final}; set sparsity.final=0.5")
        check(p, self.pattern != "2:4" or self.scope == "per_matrix",
              "method.pattern=2:4 works per group of 4 columns; set method.scope=per_matrix")
        check_one_of(p, "method.base_criterion", self.base_criterion, BASE_CRITERIA.names())
        check(p, self.calibration_sequences >= 1,
              f"method.calibration_sequences={self.calibration_sequences} must be >= 1 (default 32)")
        scoped = [c.name for c in BASE_CRITERIA if self.scope in c.scopes]
        if self.base_criterion in BASE_CRITERIA and scoped:
            criterion = BASE_CRITERIA[self.base_criterion]
            check(p, self.scope in criterion.scopes,
                  f"method.scope={self.scope} needs method.base_criterion={' or '.join(scoped)}: "
                  f"{criterion.name} prunes each matrix on its own ({criterion.summary}); set method.scope=per_matrix")
        check(p, self.base_format != "semi_structured" or self.pattern == "2:4",
              "method.base_format=semi_structured needs method.pattern=2:4")
        check(p, self.schedule(sparsity) in ("none", ONE_SHOT),
              f"sparsity.schedule={sparsity.schedule}: salr prunes once, before training (docs/methods.md §7); "
              "use sparsity.schedule=auto or one_shot (the same: sparsity.final sets the base sparsity)")
        return p

    def schedule(self, sparsity: SparsityConfig) -> str:
        """``sparsity.schedule``, ``auto`` being one_shot: the base is pruned once, before training."""
        return ONE_SHOT if sparsity.schedule == "auto" else sparsity.schedule

    def export_formats(self) -> tuple[str, ...]:
        """model/ (the pruned base, dense), adapter/ (residual and task adapters fused) and compressed/ (bitmap)."""
        return ("hf", "adapter", "bitmap")


register("salr", schema=SalrConfig, factory="prunedlora.methods.salr.method:SalrMethod", starts_at_base=False)
