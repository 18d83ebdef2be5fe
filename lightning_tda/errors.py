"""Every exception the library raises on purpose, in one place.

Each error says what is wrong and names the fix. They subclass the built-in exception a caller
would already catch (``ValueError`` for bad arguments, ``RuntimeError`` for store problems), so
``except ValueError`` keeps working.

>>> from lightning_tda.errors import ConfigError, StoreError, SchemaVersionError
>>> issubclass(ConfigError, ValueError), issubclass(SchemaVersionError, StoreError)
(True, True)
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = [
    "ConfigError",
    "InFlightRowsError",
    "LockTimeout",
    "MissingExampleIdsError",
    "NonFiniteError",
    "ProjectionMismatchError",
    "SchemaVersionError",
    "StoreError",
]


class ConfigError(MisconfigurationException, ValueError):
    """A configuration value is invalid (raised when the config object is built, before any training).

    Both a Lightning ``MisconfigurationException`` and a ``ValueError``, so callers catching either
    keep working.
    """


class MissingExampleIdsError(ValueError):
    """A batch reached the logger without example ids."""


class ProjectionMismatchError(ValueError):
    """Query-side layers or projection differ from the store's."""


class NonFiniteError(FloatingPointError):
    """A per-example loss or gradient is NaN or Inf."""


class StoreError(RuntimeError):
    """The store cannot be written or read as asked."""


class SchemaVersionError(StoreError):
    """The file was written with a schema this version cannot read."""


class InFlightRowsError(StoreError):
    """A method asked a batch (in-flight) checkpoint for rows it does not hold."""


class LockTimeout(TimeoutError):
    """The store stayed locked by another process for longer than the timeout."""
