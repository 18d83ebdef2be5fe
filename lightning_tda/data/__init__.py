"""Example identity, staged (multi-stage) training data and small offline datasets."""

from lightning_tda.data.indexed import Indexed, IndexedDataset, get_example_ids
from lightning_tda.data.staged import StagedDataModule
from lightning_tda.errors import MissingExampleIdsError

__all__ = [
    "Indexed",
    "IndexedDataset",
    "MissingExampleIdsError",
    "StagedDataModule",
    "get_example_ids",
]
