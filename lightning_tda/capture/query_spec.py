"""``QuerySpec``: how examples are batched and which task describes what is differentiated.

One object instead of the ``task, loss_fn, batch_size, collate_fn`` keywords that every featurising
entry point (``attribute``, ``query_vectors``, staged SOURCE, STRIDE, the report, the W&B panels)
takes. Public entry points accept ``query_spec=`` and keep ``task=``, ``loss_fn=``, ``batch_size=``,
``collate_fn=`` as keyword shorthands (:meth:`QuerySpec.resolve`); internally one ``QuerySpec``
travels. ``loss_fn=f`` is the shorthand of ``task=LossFnTask(f)``. A query's gradient is that of
``task.measurement(model, batch)`` (the loss by default); training rows use
``task.per_example_loss``.

>>> spec = QuerySpec.resolve(None, batch_size=8)
>>> spec.batch_size, spec.loss_fn is None, spec.described
(8, True, False)
>>> QuerySpec.resolve(spec, task=ClassificationTask(measurement_kind="margin")).task.measurement_kind
'margin'
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
from lightning_tda.capture.task import (
    ClassificationTask,  # noqa: F401 (module doctest)
    Task,
    missing_loss_error,
    resolve_task,
)
from lightning_tda.errors import ConfigError


@dataclass(frozen=True)
class QuerySpec:
    """How query (or training) examples are featurised.

    Args:
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, the shorthand of ``task=LossFnTask(loss_fn)``.
        batch_size: batch size when the data is a Dataset (a DataLoader keeps its own).
        collate_fn: collate function for a Dataset.
        task: the :class:`~lightning_tda.capture.task.Task` (training loss, query measurement,
            targets). ``None`` with no ``loss_fn``: the entry point's default (the task recorded in
            the store, else the module's own ``per_example_loss`` / ``query_measurement``).
    """

    loss_fn: LossFn | None = None
    batch_size: int = 64
    collate_fn: Callable[[list[Any]], Any] | None = None
    task: Task | None = None

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
        if self.task is not None:
            resolve_task(self.task, self.loss_fn)  # type check; refuses task= and loss_fn= together

    @classmethod
    def resolve(
        cls,
        spec: QuerySpec | None = None,
        *,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        task: Task | None = None,
    ) -> QuerySpec:
        """``spec`` with the keyword shorthands applied (a keyword given overrides the spec's field;
        ``task=`` or ``loss_fn=`` replaces the spec's task description; both at once is an error)."""
        out = spec if spec is not None else cls()
        if not isinstance(out, QuerySpec):
            raise ConfigError(f"query_spec must be a QuerySpec, got {type(out).__name__}")
        changes: dict[str, Any] = {
            k: v
            for k, v in (("batch_size", batch_size), ("collate_fn", collate_fn))
            if v is not None
        }
        if task is not None or loss_fn is not None:
            resolve_task(task, loss_fn)  # refuses both at once
            changes.update(task=task, loss_fn=loss_fn)
        return replace(out, **changes) if changes else out

    @property
    def described(self) -> bool:
        """Whether the caller described the task (``task`` or ``loss_fn`` set)."""
        return self.task is not None or self.loss_fn is not None

    def task_or(self, default: Task | None = None) -> Task:
        """The task: ``task``, else ``LossFnTask(loss_fn)``, else ``default``, else the module's own."""
        return resolve_task(self.task, self.loss_fn, default)

    def with_task(self, default: Task | None = None) -> QuerySpec:
        """This spec with its task resolved (:meth:`task_or`) into the ``task`` field."""
        return replace(self, task=self.task_or(default), loss_fn=None)

    def loss_for(self, model: nn.Module) -> LossFn:
        """The per-example TRAINING loss ``(model, batch) -> Tensor[B]`` (``task.per_example_loss``);
        with no task described, ``model.per_example_loss`` (raises early when the model has none)."""
        if self.task is not None:
            return self.task.per_example_loss
        return resolve_loss_fn(model, self.loss_fn)

    def measurement_for(self, model: nn.Module) -> LossFn:
        """What a query's gradient is taken of: ``task.measurement`` ``(model, batch) -> Tensor[B]``
        (the loss by default). The module default is checked up front: a model with neither
        ``per_example_loss`` nor ``query_measurement`` raises before any batch is read."""
        task = self.task_or()
        if type(task) is Task and not _has_fn(model, "per_example_loss", "query_measurement"):
            raise missing_loss_error(model)
        return task.measurement

    def loader(self, data: Any) -> DataLoader | list:
        """A DataLoader over a Dataset (in order), a DataLoader as is, or ``[batch]`` for a batch."""
        return as_loader(data, self.batch_size, self.collate_fn)


def _has_fn(model: nn.Module, *names: str) -> bool:
    return any(callable(getattr(model, n, None)) for n in names)


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
