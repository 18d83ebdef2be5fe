"""Deprecated location of :mod:`lightning_tda.cli.recipe_config` (the CLI's run loader).

The module moved up to the command-line layer; it is imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW = "lightning_tda.cli.recipe_config"


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module(_NEW)
    if not hasattr(module, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"lightning_tda.recipe_config is deprecated; import {name} from {_NEW}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)
