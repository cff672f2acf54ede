"""SALR (Zhang et al., AAAI 2026): sparse base + SVD residual + task LoRA. ``config.py`` (options, registration),
``method.py`` (``SalrMethod``; ``target_linears``, the linears it prunes), ``export.py`` (the three folders),
``formats.py`` (the base's formats in training); the loader of ``compressed/``,
``load_salr_export``, lives in ``prunedlora.export.compressed`` and is re-exported here."""

from prunedlora.methods.registry import lazy_attributes
from prunedlora.methods.salr.config import SalrConfig

# load_salr_export: re-exported from its module, the path users know
__getattr__ = lazy_attributes(__name__, {"SalrMethod": ".method", "target_linears": ".method", "export_salr": ".export",
                                         "load_salr_export": "prunedlora.export.compressed"})
__all__ = ["SalrConfig", "SalrMethod", "export_salr", "load_salr_export", "target_linears"]  # noqa: F822
