"""Example identity and small offline datasets."""

from lightning_tda.data.indexed import (
    Indexed,
    IndexedDataset,
    MissingExampleIdsError,
    get_example_ids,
)

__all__ = ["Indexed", "IndexedDataset", "MissingExampleIdsError", "get_example_ids"]
