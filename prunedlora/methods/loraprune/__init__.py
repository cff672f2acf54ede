"""LoRAPrune (Zhang et al., ACL Findings 2024): heads and MLP channels of the base pruned while LoRA trains.
``config.py`` (options, registration), ``callback.py`` (scores, EMA, masks), ``uniform.py`` (``structure=uniform``'s
plan), ``export.py`` (compaction), ``method.py`` (``LoraPruneMethod``)."""

from prunedlora.methods.loraprune.config import LoraPruneConfig
from prunedlora.methods.registry import lazy_attributes

__getattr__ = lazy_attributes(__name__, {"LoraPruneMethod": ".method", "LoraPruneCallback": ".callback"})
__all__ = ["LoraPruneCallback", "LoraPruneConfig", "LoraPruneMethod"]  # noqa: F822
