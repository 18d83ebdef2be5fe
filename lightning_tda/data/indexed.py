"""Stable example identity: every item a model sees carries the integer id of its example."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from lightning_tda.errors import MissingExampleIdsError  # noqa: F401 (re-exported)

EXAMPLE_ID_KEY = "example_id"


class Indexed(NamedTuple):
    """An item (or, after ``default_collate``, a batch) tagged with its example id(s).

    ``default_collate`` keeps the named-tuple type, so a batch is ``Indexed(example_id=[B], data=...)``
    and a training step can unpack it as ``ids, (x, y) = batch``.
    """

    example_id: Any
    data: Any


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so every item carries its stable integer example id.

    Mapping items (e.g. Hugging Face rows) get an extra ``"example_id"`` key; any other item ``x``
    becomes ``Indexed(example_id, x)``.

    Args:
        dataset: any map-style dataset (``__getitem__`` and ``__len__``).
        ids: optional sequence of unique integer ids, one per item; defaults to ``0..len-1``.

    Example:
        >>> ds = IndexedDataset([(1.0, 0), (2.0, 1)], ids=[10, 11])
        >>> ds[1]
        Indexed(example_id=11, data=(2.0, 1))
        >>> IndexedDataset([{"text": "a"}])[0]
        {'text': 'a', 'example_id': 0}
    """

    def __init__(self, dataset: Any, ids: Sequence[int] | None = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "IndexedDataset needs a map-style dataset with __getitem__ and __len__; "
                f"got {type(dataset).__name__}. Materialise an iterable dataset into a list first."
            )
        self.dataset = dataset
        n = len(dataset)
        if ids is None:
            self.ids = list(range(n))
        else:
            self.ids = [int(i) for i in ids]
            if len(self.ids) != n:
                raise ValueError(
                    f"IndexedDataset got {len(self.ids)} ids for {n} items; pass one id per item."
                )
            if len(set(self.ids)) != n:
                raise ValueError("IndexedDataset ids must be unique; found duplicates.")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        example_id = self.ids[index]
        if isinstance(item, Mapping):
            if EXAMPLE_ID_KEY in item:
                raise KeyError(
                    f"item already has a {EXAMPLE_ID_KEY!r} key; rename it or drop it before wrapping"
                )
            return {**item, EXAMPLE_ID_KEY: example_id}
        return Indexed(example_id, item)


def get_example_ids(batch: Any) -> torch.Tensor:
    """Return the example ids of a collated batch as an int64 tensor ``[B]``.

    The default recognition of :class:`lightning_tda.data.ids.ExampleIds`: ``Indexed`` batches, then
    the keys ``example_id``, ``idx``, ``index``, ``id``.

    Raises:
        MissingExampleIdsError: the batch carries no ids (wrap the dataset in ``IndexedDataset``, or
            say where they are with ``GradientLogger(example_ids=...)``).
    """
    from lightning_tda.data.ids import ExampleIds  # ids.py builds on Indexed (same layer)

    return ExampleIds()(batch)


def strip_example_ids(batch: Any) -> Any:
    """Return the batch without its ids (the wrapped data for ``Indexed`` batches)."""
    if isinstance(batch, Indexed):
        return batch.data
    if isinstance(batch, Mapping) and EXAMPLE_ID_KEY in batch:
        return {k: v for k, v in batch.items() if k != EXAMPLE_ID_KEY}
    return batch
