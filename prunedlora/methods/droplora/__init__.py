"""DropLoRA (Zhang, arXiv 2508.17337): LoRA with a random mask on the rank bottleneck. ``config.py`` (options,
registration), ``method.py`` (``DropLoraMethod``, ``RankMaskSampler``)."""

from prunedlora.methods.droplora.config import DropLoraConfig
from prunedlora.methods.registry import lazy_attributes

__getattr__ = lazy_attributes(__name__, {"DropLoraMethod": ".method", "RankMaskSampler": ".method"})
__all__ = ["DropLoraConfig", "DropLoraMethod", "RankMaskSampler"]  # noqa: F822
