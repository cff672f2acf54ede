"""Methods: one folder each (``lora/``, ``droplora/``, ``adalora/``, ``prunedlora/``, ``loraprune/``, ``salr/``), all
behind the ``Method`` base class (``base.py``) and registered by their own ``config.py`` (``registry.py``).

Importing this package, or a method's config, imports no torch: ``Method``, ``Callback`` and ``AttachContext`` are
loaded from ``base.py`` on first access.
"""

from __future__ import annotations

from prunedlora.methods.registry import (
    METHODS,
    MethodSpec,
    build_method,
    lazy_attributes,
    method_spec,
    method_specs,
    register,
    unregister,
)

__getattr__ = lazy_attributes(__name__, {"Method": ".base", "Callback": ".base", "AttachContext": ".base"})

__all__ = ["METHODS", "AttachContext", "Callback", "Method", "MethodSpec", "build_method", "method_spec",  # noqa: F822
           "method_specs", "register", "unregister"]
