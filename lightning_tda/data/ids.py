"""Example ids read from the user's own collated batches (``GradientLogger(example_ids=...)``).

A batch says which training examples it holds in one of four ways, chosen by :class:`ExampleIds`:
a tuple position (``2`` for ``(x, y, idx)`` batches), a mapping key (``"idx"``), a function
``batch -> Tensor[B]``, or, by default, recognition: :class:`~lightning_tda.data.indexed.Indexed`
batches, then the keys ``example_id``, ``idx``, ``index``, ``id``. The batch itself is never changed:
the model's ``training_step`` and ``per_example_loss`` see it as the user's data yields it.

Data without any id is numbered by position by the library itself (:func:`with_positions`): a private
wrapper pairs each item with its index and the collated batch with the ids, as a
:class:`PositionedBatch` the library splits (:func:`split_ids`) before the loss sees the user's batch.

>>> ExampleIds(2)((torch.zeros(2, 3), torch.zeros(2), torch.tensor([7, 9]))).tolist()
[7, 9]
>>> ExampleIds()({"x": torch.zeros(2, 3), "idx": torch.tensor([4, 5])}).tolist()
[4, 5]
>>> ExampleIds("uid").find({"x": torch.zeros(2, 3)}) is None
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_tda.data.indexed import Indexed
from lightning_tda.errors import ConfigError, MissingExampleIdsError

DEFAULT_KEYS = ("example_id", "idx", "index", "id")
"""Mapping keys recognised as example ids when ``example_ids`` is not given (at most one may be present)."""
FIX = "GradientLogger(example_ids=<position | key | fn>)"
IdsSpec = int | str | Callable[[Any], Any] | None
"""``example_ids=``: a tuple position, a mapping key, ``fn(batch) -> Tensor[B]`` or ``None`` (recognise)."""

_MISSING = object()


@dataclass(frozen=True)
class ExampleIds:
    """Where a collated batch keeps its example ids.

    Args:
        where: a tuple position (``int``), a mapping key or attribute name (``str``), a callable
            ``batch -> Tensor[B]``, or ``None``: ``Indexed`` batches, then the keys of
            :data:`DEFAULT_KEYS` (a batch holding more than one of them is ambiguous: an error).
    """

    where: IdsSpec = None

    def __post_init__(self) -> None:
        w = self.where
        if isinstance(w, ExampleIds):
            object.__setattr__(self, "where", w.where)
        elif isinstance(w, bool) or not (w is None or isinstance(w, (int, str)) or callable(w)):
            raise ConfigError(
                f"example_ids must be a tuple position (int), a mapping key (str), a callable "
                f"batch -> Tensor[B] or None (recognise Indexed batches and the keys {list(DEFAULT_KEYS)}); "
                f"got {w!r}"
            )

    @classmethod
    def resolve(cls, spec: ExampleIds | IdsSpec) -> ExampleIds:
        return spec if isinstance(spec, ExampleIds) else cls(spec)

    @property
    def is_default(self) -> bool:
        return self.where is None

    def __call__(self, batch: Any) -> torch.Tensor:
        """``[B]`` int64 ids of ``batch``.

        Raises:
            MissingExampleIdsError: the batch has no id where this spec looks (the message names the fix),
                or its ids are not a 1-D integer tensor.
        """
        ids = self.find(batch)
        if ids is None:
            raise MissingExampleIdsError(self.missing_message(batch))
        return ids

    def find(self, batch: Any) -> torch.Tensor | None:
        """``[B]`` int64 ids, or ``None`` when the batch holds none where this spec looks."""
        raw = self._raw(batch)
        return None if raw is _MISSING or raw is None else _as_ids(raw, self.label())

    def _raw(self, batch: Any) -> Any:
        w = self.where
        if w is None:
            return _recognise(batch)
        if callable(w) and not isinstance(w, (int, str)):
            return w(batch)
        if isinstance(w, int) and not isinstance(batch, (tuple, list, Mapping)):
            return _MISSING  # a tensor batch indexed by position would give a row, not ids
        try:
            return batch[w]
        except (KeyError, IndexError, TypeError):
            pass
        if isinstance(w, str) and not isinstance(batch, Mapping):
            value = getattr(batch, w, _MISSING)  # a named tuple's or dataclass's field
            return _MISSING if callable(value) else value
        return _MISSING

    def label(self) -> str:
        """How ``where`` reads in messages: ``example_ids=2``, ``example_ids='idx'`` ..."""
        if self.where is None:
            return "the default recognition (Indexed batches, keys " + ", ".join(DEFAULT_KEYS) + ")"
        w = self.where
        shown = repr(w) if isinstance(w, (int, str)) else getattr(w, "__qualname__", repr(w))
        return f"example_ids={shown}"

    def item_id(self, item: Any) -> int | None:
        """The id of ONE dataset item (before collation: a scalar where a batch holds ``[B]``), or
        ``None`` when the item has none where this spec looks.

        >>> ExampleIds(2).item_id((torch.zeros(3), 1, torch.tensor(7)))
        7
        """
        raw = self._raw(item)
        if raw is _MISSING or raw is None:
            return None
        value = torch.as_tensor(raw)
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            return None
        return int(value.reshape(()))

    def describe(self) -> dict[str, Any]:
        """JSON-able description, recorded in the store (``example_ids`` root attribute)."""
        w = self.where
        if w is None:
            return {"where": "default", "recognises": ["Indexed", *DEFAULT_KEYS]}
        if isinstance(w, (int, str)):
            return {"where": w}
        return {"where": f"callable:{getattr(w, '__qualname__', type(w).__name__)}"}

    def missing_message(self, batch: Any) -> str:
        shape = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
        return (
            f"This batch ({shape}) carries no example ids where {self.label()} looks, so its rows cannot "
            f"be tied to training examples. Say where the ids are: {FIX} (a tuple position such as 2 for "
            "(x, y, idx) batches, a mapping key such as 'idx', or fn(batch) -> Tensor[B]); by default "
            f"Indexed batches and the keys {', '.join(map(repr, DEFAULT_KEYS))} are recognised. For data "
            "without ids, wrap the dataset in lightning_tda.IndexedDataset (items become "
            "Indexed(example_id, data) or dicts with an 'example_id' key) and keep that field through any "
            "custom collate_fn."
        )


def _recognise(batch: Any) -> Any:
    if isinstance(batch, Indexed):
        return batch.example_id
    if not isinstance(batch, Mapping):
        return _MISSING
    found = [k for k in DEFAULT_KEYS if k in batch]
    if len(found) > 1:
        raise ConfigError(
            f"the batch holds several example-id keys {found}; say which one holds the ids: "
            f"GradientLogger(example_ids={found[0]!r}) (or another key, position or fn(batch) -> Tensor[B])"
        )
    return batch[found[0]] if found else _MISSING


def _as_ids(raw: Any, label: str) -> torch.Tensor:
    try:
        ids = torch.as_tensor(raw)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        what = (
            f"shape {tuple(ids.shape)} and dtype {ids.dtype}" if ids is not None else repr(raw)[:80]
        )
        raise MissingExampleIdsError(
            f"example ids must be a 1-D integer tensor [B], got {what} (read with {label}); point "
            f"{FIX} at integer ids, or use IndexedDataset and the default collate_fn."
        )
    return ids.to(torch.int64)


# -- positions added by the library --------------------------------------------------------------
class PositionedBatch(NamedTuple):
    """A batch of data without ids, with the positions the library gave its items (stripped before
    the loss sees ``batch``)."""

    ids: torch.Tensor
    batch: Any


class _Positioned(Dataset):
    """``(index, item)`` for every item of a map-style dataset."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]


class _PositionCollate:
    """Collate ``(index, item)`` pairs as ``PositionedBatch(ids, user_collate(items))``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, pairs: list[tuple[int, Any]]) -> PositionedBatch:
        ids = torch.tensor([p for p, _ in pairs], dtype=torch.int64)
        return PositionedBatch(ids, self.collate_fn([item for _, item in pairs]))


def with_positions(loader: DataLoader) -> DataLoader:
    """``loader`` (same order, batching and collate) with batches ``PositionedBatch(ids, batch)``, the ids
    being each item's index in ``loader.dataset``."""
    ds = loader.dataset
    if isinstance(ds, IterableDataset) or loader.batch_sampler is None:
        raise MissingExampleIdsError(
            "this data carries no example ids and cannot be numbered by position (an iterable dataset or "
            f"a loader without batching); say where the ids are, {FIX}, or wrap a map-style dataset in "
            "lightning_tda.IndexedDataset."
        )
    batching: dict[str, Any] = (
        {"batch_size": loader.batch_size, "sampler": loader.sampler, "drop_last": loader.drop_last}
        if loader.batch_size is not None
        else {"batch_sampler": loader.batch_sampler}
    )
    return DataLoader(
        _Positioned(ds),
        **batching,
        collate_fn=_PositionCollate(loader.collate_fn),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
    )


def split_ids(
    batch: Any, example_ids: ExampleIds | None = None, required: bool = True
) -> tuple[torch.Tensor | None, Any]:
    """``(ids [B] or None, the user's batch)``: a :class:`PositionedBatch` split, any other batch as is
    with its ids read by ``example_ids`` (``required``: raise when it has none)."""
    if isinstance(batch, PositionedBatch):
        return batch.ids, batch.batch
    spec = example_ids if example_ids is not None else ExampleIds()
    return (spec(batch) if required else spec.find(batch)), batch


def recorded_ids(record: Mapping[str, Any] | None) -> tuple[ExampleIds, bool]:
    """``(spec, positional)`` from a store's ``example_ids`` record (``ExampleIds.describe`` plus
    ``source``): how later passes over the same data (STRIDE, reports) find each example's id.

    A recorded callable cannot be rebuilt from the file: the caller must pass ``example_ids=`` again.
    A store without the record (older stores, in-flight) recognises ids by default.

    >>> recorded_ids({"where": 2, "source": "batch"})
    (ExampleIds(where=2), False)
    >>> recorded_ids({"where": "default", "source": "position"})
    (ExampleIds(where=None), True)
    """
    if not record:
        return ExampleIds(), False
    where = record.get("where", "default")
    if isinstance(where, str) and where.startswith("callable:"):
        raise ConfigError(
            f"the store's example ids were read by a function ({where[len('callable:') :]}), which "
            "cannot be rebuilt from the file; pass the same example_ids= again"
        )
    spec = ExampleIds(None if where == "default" else where)
    return spec, record.get("source") == "position"


def batches_with_ids(
    loader: DataLoader | list, example_ids: ExampleIds | None = None, positional: bool = False
) -> Iterator[tuple[torch.Tensor | None, Any]]:
    """``(ids [B] or None, the user's batch)`` for each batch of ``loader``, the ids read by
    ``example_ids`` or, with ``positional``, each item's index in the loader's dataset (as a sweep
    of data without ids numbered it)."""
    if positional:
        if not isinstance(loader, DataLoader):
            raise MissingExampleIdsError(
                "this store numbered its examples by position; pass the training data as a Dataset "
                "or DataLoader (in the order it was logged), not a single batch"
            )
        loader = with_positions(loader)
    for batch in loader:
        yield split_ids(batch, example_ids, required=False)


__all__ = [
    "DEFAULT_KEYS",
    "ExampleIds",
    "IdsSpec",
    "PositionedBatch",
    "batches_with_ids",
    "recorded_ids",
    "split_ids",
    "with_positions",
]
