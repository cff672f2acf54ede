"""``method=droplora``'s options, their checks, and its registration."""

from __future__ import annotations

from dataclasses import dataclass, field

from prunedlora.config import MethodConfig, SparsityConfig, check, check_one_of
from prunedlora.methods.registry import register

MASK_MODES = ("element", "rank")


@dataclass
class DropLoraConfig(MethodConfig):
    """DropLoRA (docs/methods.md §4), with the authors' scripts' values (§4.3): lora_dropout 0.05 and adapters on
    q, k, v, up and down (no o_proj, no gate_proj)."""

    name: str = "droplora"
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    p: float = 0.5
    """Drop probability on the rank bottleneck; kept entries are rescaled by 1/(1-p)."""
    mask_mode: str = "element"
    """element: independent per token and rank (authors' code); rank: one rank mask per optimizer step."""

    def validate(self, sparsity: SparsityConfig) -> list[str]:
        """DropLoRA's own checks (docs/methods.md §4); ``sparsity`` is ignored (nothing is pruned)."""
        problems: list[str] = []
        check(problems, 0 <= self.p < 1, f"method.p={self.p} is the drop probability and must be in [0, 1) "
                                         "(default 0.5)")
        check_one_of(problems, "method.mask_mode", self.mask_mode, MASK_MODES)
        return problems


register("droplora", schema=DropLoraConfig, factory="prunedlora.methods.droplora.method:DropLoraMethod",
         smoke_overrides=("method.mask_mode=rank",))
