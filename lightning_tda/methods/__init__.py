"""Attribution methods, selectable by name or as classes with typed hyper-parameters."""

from __future__ import annotations

from typing import Any

from lightning_tda.methods.base import AttributionMethod
from lightning_tda.methods.datainf import DataInf
from lightning_tda.methods.influence import Influence
from lightning_tda.methods.lorif import LoRIF
from lightning_tda.methods.source import Source
from lightning_tda.methods.tracin import GradCos, GradDot, TracIn, TracInAdam
from lightning_tda.stride.method import Stride

METHODS: dict[str, type[AttributionMethod]] = {
    m.name: m
    for m in (GradDot, GradCos, TracIn, TracInAdam, Influence, Source, DataInf, LoRIF, Stride)
}


def get_method(method: str | AttributionMethod, **kwargs: Any) -> AttributionMethod:
    """Resolve a method name (plus its hyper-parameters) or pass an instance through."""
    if isinstance(method, AttributionMethod):
        if kwargs:
            raise TypeError(
                "pass hyper-parameters either to the method instance or as keywords, not both"
            )
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    return METHODS[method](**kwargs)


__all__ = [
    "METHODS",
    "AttributionMethod",
    "DataInf",
    "GradCos",
    "GradDot",
    "Influence",
    "LoRIF",
    "Source",
    "Stride",
    "TracIn",
    "TracInAdam",
    "get_method",
]
