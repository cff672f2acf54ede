"""Methods behind one small interface (``Method``), chosen by ``method.name`` from ``METHODS``."""

from __future__ import annotations

from collections.abc import Callable

from prunedlora.config import ConfigError, MethodConfig, SparsityConfig
from prunedlora.methods.adalora import AdaLoraMethod
from prunedlora.methods.base import Callback, Method
from prunedlora.methods.droplora import DropLoraMethod
from prunedlora.methods.lora import LoraMethod
from prunedlora.methods.loraprune import LoraPruneMethod
from prunedlora.methods.prunedlora import PrunedLoraMethod
from prunedlora.methods.salr import SalrMethod

METHODS: dict[str, Callable[[MethodConfig, SparsityConfig], Method]] = {
    "lora": LoraMethod,
    "droplora": DropLoraMethod,
    "adalora": AdaLoraMethod,
    "prunedlora": PrunedLoraMethod,
    "salr": SalrMethod,
    "loraprune": LoraPruneMethod,
}


def build_method(cfg: MethodConfig, sparsity: SparsityConfig) -> Method:
    """Instantiate the method named by ``cfg.name``."""
    try:
        factory = METHODS[cfg.name]
    except KeyError:
        raise ConfigError(
            f"method={cfg.name} is not implemented; available methods: {', '.join(sorted(METHODS))}."
        ) from None
    return factory(cfg, sparsity)


__all__ = ["METHODS", "Callback", "Method", "build_method"]
