"""``method=adalora``'s options, their checks, and its registration."""

from __future__ import annotations

from dataclasses import dataclass

from prunedlora.config import MethodConfig, SparsityConfig, check, rank_after_pruning
from prunedlora.methods.registry import register


@dataclass
class AdaLoraConfig(MethodConfig):
    name: str = "adalora"
    rank: int | None = None
    """Unused (AdaLoRA's ranks are init_rank and target_rank); must stay null."""
    alpha: float = 64.0
    """Scaling numerator: PEFT scales by alpha / init_rank for the whole run (2 at the defaults)."""
    init_rank: int = 32
    """Starting rank of every adapted matrix (PEFT ``init_r``); PrunedLoRA's r0 (docs/methods.md §8 item 26)."""
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
        """AdaLoRA's own checks (docs/methods.md §2, §8 item 26)."""
        p: list[str] = []
        check(p, self.rank is None, f"method.rank={self.rank} is not used by adalora; set method.init_rank and "
                                    "method.target_rank (or sparsity.final) instead")
        check(p, self.init_rank >= 1, f"method.init_rank={self.init_rank} must be >= 1")
        target = self.final_rank(sparsity.final)
        check(p, 1 <= target < self.init_rank,
              f"adalora's target rank {target} (method.target_rank={self.target_rank}, sparsity.final="
              f"{sparsity.final}) must be in [1, method.init_rank={self.init_rank}); AdaLoRA must mask something")
        check(p, self.delta_t >= 1, f"method.delta_t={self.delta_t} must be >= 1")
        check(p, 0 < self.beta1 < 1 and 0 < self.beta2 < 1,
              f"method.beta1={self.beta1} and method.beta2={self.beta2} must be in (0, 1)")
        check(p, self.orth_reg_weight >= 0, f"method.orth_reg_weight={self.orth_reg_weight} must be >= 0")
        check(p, self.tinit_frac >= 0 and self.tfinal_frac >= 0 and self.tinit_frac + self.tfinal_frac < 1,
              f"method.tinit_frac={self.tinit_frac} and method.tfinal_frac={self.tfinal_frac} must be >= 0 "
              "with a sum < 1 (the budget needs steps in between)")
        check(p, not self.use_rslora, "method.use_rslora=true is not supported by adalora (PEFT scales by "
                                      "alpha / init_rank); set it to false")
        check(p, sparsity.schedule in ("auto", "cubic"),
              f"sparsity.schedule={sparsity.schedule} is not supported by adalora, which always uses its own "
              "cubic budget (method.tinit_frac, method.tfinal_frac, method.delta_t); use auto or cubic")
        return p


register("adalora", schema=AdaLoraConfig, factory="prunedlora.methods.adalora.method:AdaLoraMethod",
         smoke_overrides=("method.init_rank=8", "method.delta_t=1", "method.tinit_frac=0.2", "method.tfinal_frac=0.2"))
