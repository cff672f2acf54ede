"""``method=lora``'s options and its registration."""

from __future__ import annotations

from dataclasses import dataclass

from prunedlora.config import MethodConfig
from prunedlora.methods.registry import register


@dataclass
class LoraConfig(MethodConfig):
    """Plain LoRA: the shared fields, nothing else."""

    name: str = "lora"


register("lora", schema=LoraConfig, factory="prunedlora.methods.lora.method:LoraMethod")
