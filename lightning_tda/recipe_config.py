"""Deprecated location of :mod:`lightning_tda.cli.recipe_config` (the CLI's run loader).

The module moved up to the command-line layer; its names resolve lazily
(:func:`lightning_tda._moved.moved`).
"""

from lightning_tda._moved import moved

__getattr__ = moved(__name__, "lightning_tda.cli.recipe_config")
