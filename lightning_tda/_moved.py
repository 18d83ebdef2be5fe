"""Deprecation aliases for names that moved to a higher layer.

A module whose contents moved up keeps answering the old import path, lazily: its module-level
``__getattr__`` imports the new home on first access (so the old, lower module holds no import of
the higher layer) and warns with a ``DeprecationWarning`` naming the new path.

>>> import types, warnings
>>> old = types.ModuleType("old_home")
>>> old.__getattr__ = moved("old_home", "json", names=["dumps"])
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     old.__getattr__("dumps")([1])
...     str(caught[0].message)
'[1]'
'old_home.dumps moved to json.dumps; import it from there'
>>> old.__getattr__("loads")
Traceback (most recent call last):
...
AttributeError: module 'old_home' has no attribute 'loads'
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def moved(
    old: str, new: str | Mapping[str, str], names: Iterable[str] | None = None
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for module ``old`` resolving names from ``new``.

    Args:
        old: the old module's name (``__name__``).
        new: the module the names moved to, or ``{name: module}`` when they went to several.
        names: the names that moved (default: every public name of ``new``).
    """
    homes = dict(new) if isinstance(new, Mapping) else None
    allowed = (
        frozenset(homes) if homes is not None else (None if names is None else frozenset(names))
    )

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (allowed is not None and name not in allowed):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        home = homes[name] if homes is not None else new
        module = importlib.import_module(home)
        if not hasattr(module, name):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {home}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(module, name)

    return __getattr__
