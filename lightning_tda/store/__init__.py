"""The HDF5 attribution store: schema, crash-safe writer, lazy reader."""

from lightning_tda.store.reader import CheckpointInfo, SchemaVersionError, StoreReader
from lightning_tda.store.schema import SCHEMA_VERSION
from lightning_tda.store.writer import StoreError, StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "CheckpointInfo",
    "SchemaVersionError",
    "StoreError",
    "StoreReader",
    "StoreWriter",
]
