"""The HDF5 attribution store: schema, crash-safe writer, lazy reader."""

from lightning_tda.errors import SchemaVersionError, StoreError
from lightning_tda.store.extension import ExtensionGroup
from lightning_tda.store.reader import CheckpointInfo, StoreReader
from lightning_tda.store.schema import SCHEMA_VERSION
from lightning_tda.store.writer import StoreWriter, open_for_update

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointInfo",
    "ExtensionGroup",
    "SchemaVersionError",
    "StoreError",
    "StoreReader",
    "StoreWriter",
    "open_for_update",
]
