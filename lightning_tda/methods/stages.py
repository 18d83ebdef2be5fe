"""Deprecated location of the two-stage SOURCE; use :mod:`lightning_tda.staged`.

The code moved up a layer (it builds on the ``AttributionStore`` facade), so this module resolves its
names lazily (:func:`lightning_tda._moved.moved`).
"""

from lightning_tda._moved import moved

__getattr__ = moved(__name__, "lightning_tda.staged")
