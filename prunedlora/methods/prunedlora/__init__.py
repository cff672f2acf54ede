"""PrunedLoRA (Yu et al., arXiv 2510.00192): rank components pruned while training. ``config.py`` (options, target
rank, registration), ``callback.py`` (``PrunedLoraCallback``: masks, schedule, criteria, recovery), ``method.py``
(``PrunedLoraMethod``: attach, report, export)."""

from prunedlora.methods.prunedlora.config import PrunedLoraConfig
from prunedlora.methods.registry import lazy_attributes

__getattr__ = lazy_attributes(__name__, {"PrunedLoraMethod": ".method", "PrunedLoraCallback": ".callback"})
__all__ = ["PrunedLoraCallback", "PrunedLoraConfig", "PrunedLoraMethod"]  # noqa: F822
