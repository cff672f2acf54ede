"""AdaLoRA (Zhang et al., ICLR 2023) through PEFT, in our loop. ``config.py`` (options, registration), ``method.py``
(``AdaLoraMethod``, the ``AdaLoraAllocator`` callback, export)."""

from prunedlora.methods.adalora.config import AdaLoraConfig
from prunedlora.methods.registry import lazy_attributes

__getattr__ = lazy_attributes(__name__, {"AdaLoraMethod": ".method", "AdaLoraAllocator": ".method"})
__all__ = ["AdaLoraAllocator", "AdaLoraConfig", "AdaLoraMethod"]  # noqa: F822
