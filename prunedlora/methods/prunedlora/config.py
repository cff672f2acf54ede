"""``method=prunedlora``'s options, their checks, and its registration."""

from __future__ import annotations

from dataclasses import dataclass

from prunedlora.config import MethodConfig, SparsityConfig, check, check_one_of, rank_after_pruning
from prunedlora.methods.registry import register
from prunedlora.pruning.criteria import RANK_CRITERIA, RECOVERY_FACTORS

ALLOCATIONS = ("uniform", "global")


@dataclass
class PrunedLoraConfig(MethodConfig):
    name: str = "prunedlora"
    rank: int | None = None
    alpha: float = 64.0
    """Scaling numerator, fixed at alpha / init_rank for the whole run (default 2 r0: docs/methods.md §8 item 5)."""
    dropout: float = 0.05
    """lora_dropout on the input of the LoRA branch, as the authors' trainer (docs/methods.md §3.3)."""
    init_rank: int = 32
    """Starting (over-parameterised) rank r0."""
    criterion: str = "obs"
    """obs (default: OBS on the adapter's output, docs/methods.md Decisions item 0), obs_grad (the paper's
    gradient-Gram OBS, §3.2), magnitude, taylor or activation (``prunedlora.pruning.criteria.RANK_CRITERIA``)."""
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
    """Apply the criterion's closed-form recovery update to the surviving components (obs and obs_grad have one)."""
    recovery_factor: str = "b"
    """obs_grad: the factor its recovery moves, b or a; both is the paper's two-sided update, which double
    counts the removed term (docs/methods.md Decisions item 0) and is there to reproduce the paper."""

    def final_rank(self, sparsity_final: float) -> int:
        """The rank training ends at: ``rank`` when set, else ``init_rank * (1 - sparsity_final)``.

        The one place the target rank is derived; ``sparsity.final`` itself is never rewritten (the pruning callback
        ramps its schedule to ``1 - final_rank / init_rank`` of r0, which is ``sparsity.final`` unless ``rank`` is
        set).
        """
        return rank_after_pruning(self.init_rank, sparsity_final, self.rank)

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """PrunedLoRA's own checks (docs/methods.md §3, §8 items 1-6); module shapes are checked at attach."""
        p: list[str] = []
        target = self.final_rank(sparsity.final)
        check(p, self.init_rank >= 1, f"method.init_rank={self.init_rank} must be >= 1")
        check(p, 1 <= target <= self.init_rank,
              f"prunedlora's target rank {target} (method.rank={self.rank}, sparsity.final={sparsity.final}) "
              f"must be in [1, method.init_rank={self.init_rank}]; lower method.rank or raise method.init_rank")
        check_one_of(p, "method.criterion", self.criterion, RANK_CRITERIA.names())
        check_one_of(p, "method.allocation", self.allocation, ALLOCATIONS)
        check(p, self.allocation != "global" or 1 <= self.min_rank <= target,
              f"method.min_rank={self.min_rank} must be in [1, target rank {target}] (allocation=global's floor)")
        check(p, 0.0 <= self.newton_scale <= 1.0,
              f"method.newton_scale={self.newton_scale} must be in [0, 1] (0: OBS compensation, 1: full Newton)")
        check(p, self.damping > 0, f"method.damping={self.damping} must be > 0 (H + eps I must be invertible)")
        check(p, self.rel_damping > 0,
              f"method.rel_damping={self.rel_damping} must be > 0 (H + lambda mean(diag H) I must be invertible; "
              "0.01 is the default)")
        check_one_of(p, "method.recovery_factor", self.recovery_factor, RECOVERY_FACTORS)
        check(p, sparsity.schedule != "none" or target == self.init_rank,
              f"sparsity.schedule=none never prunes, but the target rank is {target} < method.init_rank="
              f"{self.init_rank}; use sparsity=constant (or linear, cubic), or method=lora")
        check(p, sparsity.schedule != "one_shot",
              "sparsity.schedule=one_shot cuts before the first step, and prunedlora prunes the adapter's rank while "
              "it trains (B = 0 at the start has no ranking); use sparsity.schedule=auto (geometric) or constant")
        return p


register("prunedlora", schema=PrunedLoraConfig, factory="prunedlora.methods.prunedlora.method:PrunedLoraMethod",
         smoke_overrides=("method.init_rank=8", "method.rank=4", "sparsity.every=1"))
