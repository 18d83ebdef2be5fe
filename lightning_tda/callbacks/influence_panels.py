"""Deprecated location: ``InfluencePanels`` and ``attribute_by_checkpoint`` moved to
:mod:`lightning_tda.integrations.influence_panels` (a W&B integration, above the callbacks layer).

The names still resolve here, lazily and with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_NEW = "lightning_tda.integrations.influence_panels"
_MOVED = ("InfluencePanels", "attribute_by_checkpoint")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"lightning_tda.callbacks.influence_panels.{name} moved to {_NEW}.{name}; import it "
            "from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_NEW), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_MOVED)
