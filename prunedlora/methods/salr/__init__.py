"""SALR (Zhang et al., AAAI 2026): sparse base + SVD residual + task LoRA. ``config.py`` (options, registration),
``method.py`` (``SalrMethod``; ``target_linears``, the linears it prunes), ``export.py`` (the three folders),
``load.py`` (base formats, ``load_salr_export``)."""

from prunedlora.methods.registry import lazy_attributes
from prunedlora.methods.salr.config import SalrConfig

__getattr__ = lazy_attributes(__name__, {"SalrMethod": ".method", "target_linears": ".method", "export_salr": ".export",
                                         "load_salr_export": ".load"})  # the README's path to the loader
__all__ = ["SalrConfig", "SalrMethod", "export_salr", "load_salr_export", "target_linears"]  # noqa: F822
