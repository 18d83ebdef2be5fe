"""Deprecated location of the two-stage SOURCE; use :mod:`lightning_tda.staged`.

The code moved up a layer (it builds on the ``AttributionStore`` facade), so this module imports it
lazily on first attribute access instead of at import time.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW = "lightning_tda.staged"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(_NEW)
    if not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_tda.methods.stages is deprecated; import {name} from {_NEW}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(importlib.import_module(_NEW).__all__)
