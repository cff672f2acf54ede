"""Which methods exist: one ``register`` call per method, next to its config, read by everything that lists them.

A method is a folder, ``prunedlora/methods/<name>/``, whose ``config.py`` defines the config dataclass and
registers the method::

    register("lora", schema=LoraConfig, factory="prunedlora.methods.lora.method:LoraMethod")

The registry finds the folders itself (every package under ``prunedlora/methods/`` with a ``config`` module), so
nothing else lists them: ``METHODS`` and ``build_method`` (the recipe), ``register_configs`` (Hydra's schemas,
``prunedlora.compose``), the method list of ``--help``, the suggestions of ``cli_errors`` and the contract tests
(``tests/test_method_contract.py``) all read ``method_specs()``.

Nothing here imports torch: a schema is a plain dataclass and a factory a ``"module:attribute"`` path imported on
the first ``build_method``, so composing, validating and printing a config (``--help``, ``--cfg job``) stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunedlora.config import ConfigError, MethodConfig, SparsityConfig

if TYPE_CHECKING:
    from prunedlora.methods.base import Method

Factory = Callable[[MethodConfig, SparsityConfig], "Method"]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method."""

    name: str
    """``method.name``, the option ``method=<name>`` and its YAML ``configs/method/<name>.yaml``."""
    schema: type[MethodConfig]
    """The config dataclass (Hydra's schema of ``method=<name>``)."""
    factory: str | Factory
    """The ``Method`` class (or any callable ``(cfg, sparsity) -> Method``), or its ``"module:attribute"`` path,
    imported on first use so that the registry stays torch-free."""
    starts_at_base: bool = True
    """Right after ``attach``, at the method's defaults, the model computes what the base computed (false for SALR,
    which prunes the base: its start is the pruned base plus the residual adapter; and for LoRAPrune, whose default
    one-shot cut prunes it). The contract test checks either promise."""
    smoke_overrides: tuple[str, ...] = ()
    """Overrides with which six steps of ``model=tiny`` exercise the method (a pruning event, an allocation): the
    contract and deployment tests run every method with them."""

    def resolve(self) -> Factory:
        """The factory itself (imported now when given as a path)."""
        if not isinstance(self.factory, str):
            return self.factory
        return resolve_path(self.factory)


def resolve_path(path: str) -> Any:
    """The attribute ``"package.module:attribute"`` names (its module imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a method folder's ``__init__``: ``where`` maps a public name to the
    module that defines it (``".method"``, relative to ``package``, or an absolute path), imported on first access,
    so that importing the folder (for its config) stays torch-free while ``from prunedlora.methods.<name> import
    <Name>Method`` still works."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__


_SPECS: dict[str, MethodSpec] = {}
_FOUND = False


def register(name: str, *, schema: type[MethodConfig], factory: str | Factory, starts_at_base: bool = True,
             smoke_overrides: tuple[str, ...] = ()) -> MethodSpec:
    """Add a method (see ``MethodSpec`` for the fields); a method folder's ``config.py`` calls it once.

    Raises:
        ValueError: ``name`` is registered already, or the schema's default ``name`` is not ``name``.
    """
    if name in _SPECS:
        raise ValueError(f"method {name!r} is registered twice ({_SPECS[name].schema.__module__} and "
                         f"{schema.__module__}); give the new one another name")
    if schema.name != name:
        raise ValueError(f"{schema.__name__}.name defaults to {schema.name!r}, but it is registered as {name!r}; "
                         "the two must agree (method.name selects the method)")
    _SPECS[name] = MethodSpec(name, schema, factory, starts_at_base, tuple(smoke_overrides))
    return _SPECS[name]


def unregister(name: str) -> None:
    """Remove a method registered with ``register`` (a test's throwaway method, a plug-in being unloaded)."""
    _SPECS.pop(name, None)


def discover() -> None:
    """Import the ``config`` module of every method folder once; each registers its method.

    A package under ``methods/`` without a ``config.py`` is not a method (shared helpers may live in one); a method
    folder whose ``config.py`` does not register is caught by the contract test, which matches the registry against
    ``configs/method/*.yaml``.
    """
    global _FOUND
    if _FOUND:
        return
    _FOUND = True
    folder = Path(__file__).parent
    for info in pkgutil.iter_modules([str(folder)]):
        if info.ispkg and (folder / info.name / "config.py").is_file():
            importlib.import_module(f"{__package__}.{info.name}.config")


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method by name, sorted by name."""
    discover()
    return dict(sorted(_SPECS.items()))


def method_spec(name: str) -> MethodSpec:
    """The method registered as ``name``.

    Raises:
        ConfigError: no method has that name (the message lists those that do).
    """
    specs = method_specs()
    if name not in specs:
        raise ConfigError(f"method={name} is not implemented; available methods: {', '.join(sorted(specs))}.")
    return specs[name]


def build_method(cfg: MethodConfig, sparsity: SparsityConfig) -> Method:
    """Instantiate the method named by ``cfg.name`` for this config and sparsity schedule."""
    return method_spec(cfg.name).resolve()(cfg, sparsity)


class _Methods(Mapping[str, Factory]):
    """``METHODS[name]``: the method classes by name, read from the registry (imported when looked up)."""

    def __getitem__(self, name: str) -> Factory:
        return method_specs()[name].resolve()

    def __iter__(self) -> Iterator[str]:
        return iter(method_specs())

    def __len__(self) -> int:
        return len(method_specs())


METHODS: Mapping[str, Factory] = _Methods()
"""Method classes by ``method.name`` (``build_method`` picks from it)."""
