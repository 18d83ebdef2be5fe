"""Attribution methods, selectable by name or as classes with typed hyper-parameters.

Names resolve through a lazy registry: each name maps to a ``"module:Class"`` string imported on
first use, so this package never imports the layers above it (``"stride"`` lives in
:mod:`lightning_tda.stride`). ``METHODS`` is a read-only mapping name -> class over the registry;
:func:`register_method` adds a name for an extension's method. The protocol a method implements is
in :mod:`lightning_tda.methods.base`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from lightning_tda._moved import moved
from lightning_tda.errors import ConfigError
from lightning_tda.methods.base import AttributionMethod, ModelMethod, RowMethod
from lightning_tda.methods.datainf import DataInf
from lightning_tda.methods.influence import Influence
from lightning_tda.methods.lorif import LoRIF
from lightning_tda.methods.source import Source
from lightning_tda.methods.tracin import GradCos, GradDot, TracIn, TracInAdam

_REGISTRY: dict[str, str] = {
    "graddot": "lightning_tda.methods.tracin:GradDot",
    "gradcos": "lightning_tda.methods.tracin:GradCos",
    "tracin": "lightning_tda.methods.tracin:TracIn",
    "tracin_adam": "lightning_tda.methods.tracin:TracInAdam",
    "influence": "lightning_tda.methods.influence:Influence",
    "source": "lightning_tda.methods.source:Source",
    "datainf": "lightning_tda.methods.datainf:DataInf",
    "lorif": "lightning_tda.methods.lorif:LoRIF",
    "stride": "lightning_tda.stride.method:Stride",
}
_RESOLVED: dict[str, type[AttributionMethod]] = {}
_HIGHER_LAYER = {"Stride": "lightning_tda.stride"}  # re-exported lazily (module __getattr__)


def _resolve(name: str) -> type[AttributionMethod]:
    """Import the class registered under ``name`` (cached)."""
    if name not in _RESOLVED:
        target = _REGISTRY[name]
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, AttributionMethod)):
            raise ConfigError(
                f"method {name!r} is registered as {target!r}, which is not an AttributionMethod "
                "subclass (RowMethod or ModelMethod)"
            )
        _RESOLVED[name] = cls
    return _RESOLVED[name]


class _MethodRegistry(Mapping[str, type[AttributionMethod]]):
    """Read-only mapping method name -> class; a class is imported when first looked up."""

    def __getitem__(self, name: str) -> type[AttributionMethod]:
        if name not in _REGISTRY:
            raise KeyError(name)
        return _resolve(name)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({sorted(_REGISTRY)})"


METHODS: Mapping[str, type[AttributionMethod]] = _MethodRegistry()


def register_method(name: str, target: str, *, replace: bool = False) -> None:
    """Make ``name`` select the method class at ``target`` (``"package.module:Class"``).

    The module is imported on first use of the name. ``replace=True`` rebinds an existing name.

    Example::

        register_method("my_if", "my_pkg.methods:MyInfluence")
        store.attribute(queries, model=model, method="my_if")
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ConfigError(
            f"a method name must be a non-empty string other than 'auto', got {name!r}"
        )
    module, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not (module and sep and attr.isidentifier()):
        raise ConfigError(f"register_method needs a 'package.module:Class' string, got {target!r}")
    if name in _REGISTRY and _REGISTRY[name] != target and not replace:
        raise ConfigError(
            f"method {name!r} is already registered as {_REGISTRY[name]!r}; pass replace=True"
        )
    _REGISTRY[name] = target
    _RESOLVED.pop(name, None)


def get_method(method: str | AttributionMethod, **kwargs: Any) -> AttributionMethod:
    """Resolve a method name (plus its hyper-parameters) or pass an instance through."""
    if isinstance(method, AttributionMethod):
        if kwargs:
            raise TypeError(
                "pass hyper-parameters either to the method instance or as keywords, not both"
            )
        return method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    return METHODS[method](**kwargs)


# ``from lightning_tda.methods import Stride`` (deprecated: import it from its own layer)
__getattr__ = moved(__name__, _HIGHER_LAYER)


__all__ = [
    "METHODS",
    "AttributionMethod",
    "DataInf",
    "GradCos",
    "GradDot",
    "Influence",
    "LoRIF",
    "ModelMethod",
    "RowMethod",
    "Source",
    "TracIn",
    "TracInAdam",
    "get_method",
    "register_method",
]
