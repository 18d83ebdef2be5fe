"""``QuerySpec``: how examples are batched and which per-example loss is differentiated.

One object instead of the ``loss_fn, batch_size, collate_fn`` triple that every featurising entry
point (``attribute``, ``query_vectors``, staged SOURCE, STRIDE, the report, the W&B panels) takes.
Public entry points accept ``query_spec=`` and keep ``loss_fn=``, ``batch_size=``, ``collate_fn=`` as
keyword shorthands (:meth:`QuerySpec.resolve`); internally one ``QuerySpec`` travels.

>>> spec = QuerySpec.resolve(None, batch_size=8)
>>> spec.batch_size, spec.loss_fn is None
(8, True)
>>> QuerySpec(batch_size=0)
Traceback (most recent call last):
...
lightning_tda.errors.ConfigError: QuerySpec.batch_size must be a positive int, got 0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.capture.losses import LossFn, resolve_loss_fn
from lightning_tda.errors import ConfigError


@dataclass(frozen=True)
class QuerySpec:
    """How query (or training) examples are featurised.

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``; ``None``: ``model.per_example_loss(batch)``.
        batch_size: batch size when the data is a Dataset (a DataLoader keeps its own).
        collate_fn: collate function for a Dataset.
    """

    loss_fn: LossFn | None = None
    batch_size: int = 64
    collate_fn: Callable[[list[Any]], Any] | None = None

    def __post_init__(self) -> None:
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"QuerySpec.batch_size must be a positive int, got {b!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(
                f"QuerySpec.loss_fn must be callable as loss_fn(model, batch) -> Tensor[B], got "
                f"{type(self.loss_fn).__name__}"
            )
        if self.collate_fn is not None and not callable(self.collate_fn):
            raise ConfigError(
                f"QuerySpec.collate_fn must be callable, got {type(self.collate_fn).__name__}"
            )

    @classmethod
    def resolve(
        cls,
        spec: QuerySpec | None = None,
        *,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> QuerySpec:
        """``spec`` with the keyword shorthands applied (a keyword given overrides the spec's field)."""
        out = spec if spec is not None else cls()
        if not isinstance(out, QuerySpec):
            raise ConfigError(f"query_spec must be a QuerySpec, got {type(out).__name__}")
        changes = {
            k: v
            for k, v in (
                ("loss_fn", loss_fn),
                ("batch_size", batch_size),
                ("collate_fn", collate_fn),
            )
            if v is not None
        }
        return replace(out, **changes) if changes else out

    def loss_for(self, model: nn.Module) -> LossFn:
        """The per-example loss to differentiate for ``model``."""
        return resolve_loss_fn(model, self.loss_fn)

    def loader(self, data: Any) -> DataLoader | list:
        """A DataLoader over a Dataset (in order), a DataLoader as is, or ``[batch]`` for a batch."""
        return as_loader(data, self.batch_size, self.collate_fn)


def as_loader(data: Any, batch_size: int, collate_fn: Any = None) -> DataLoader | list:
    """A DataLoader for a dataset, the loader itself, or ``[batch]`` for an already collated batch."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__") and not _is_batch(data)
    ):
        kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
        return DataLoader(data, batch_size=batch_size, shuffle=False, **kwargs)
    return [data]


def _is_batch(data: Any) -> bool:
    if isinstance(data, Mapping):
        return True
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return True  # Indexed batch
    return (
        isinstance(data, (tuple, list))
        and len(data) > 0
        and all(isinstance(t, torch.Tensor) for t in data)
    )


__all__ = ["QuerySpec", "as_loader"]
