"""Deprecated location: ``InfluencePanels`` and ``attribute_by_checkpoint`` moved to
:mod:`lightning_tda.integrations.influence_panels` (a W&B integration, above the callbacks layer).

The names still resolve here, lazily and with a ``DeprecationWarning`` (:func:`lightning_tda._moved.moved`).
"""

from lightning_tda._moved import moved

_MOVED = ("InfluencePanels", "attribute_by_checkpoint")
__getattr__ = moved(__name__, "lightning_tda.integrations.influence_panels", _MOVED)
__all__ = list(_MOVED)
