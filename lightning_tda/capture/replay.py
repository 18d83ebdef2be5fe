"""Query-side featurization: load a checkpoint's saved state into the model and project gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader

from lightning_tda.capture.basis import Bases
from lightning_tda.capture.featurize import Featurizer, preserved_training_state
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.capture.query_spec import QuerySpec, as_loader
from lightning_tda.capture.task import Task
from lightning_tda.data.ids import ExampleIds, batches_with_ids
from lightning_tda.progress import progress_bar

Quantity = Literal["measurement", "loss"]
"""What :func:`featurize_data` differentiates: the query measurement or the training loss."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def loaded_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Copy ``state`` (parameter and buffer names -> tensors) into ``model``; put the old values back after."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    missing = [k for k in state if k not in tensors]
    if missing:
        raise KeyError(
            f"the store's checkpoint state has tensors the model lacks: {missing[:5]}; pass a model of the "
            "architecture that was logged."
        )
    saved = {k: tensors[k].detach().clone() for k in state}
    try:
        with torch.no_grad():
            for k, v in state.items():
                t = tensors[k]
                if t.shape != v.shape:
                    raise ValueError(
                        f"checkpoint tensor {k} has shape {tuple(v.shape)}, model has {tuple(t.shape)}"
                    )
                t.copy_(v.to(device=t.device, dtype=t.dtype))
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                tensors[k].copy_(v)


def featurize_data(
    model: nn.Module,
    data: Any,
    layers: list[LayerSpec],
    config: ProjectionConfig,
    loss_fn: LossFn | None = None,
    batch_size: int | None = None,
    collate_fn: Any = None,
    bases: Bases | None = None,
    *,
    query_spec: QuerySpec | None = None,
    task: Task | None = None,
    of: Quantity = "measurement",
    description: str = "query gradients",
    ids: tuple[ExampleIds, bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Projected gradients of every example in ``data`` at the model's current weights.

    ``ids``: ``(spec, positional)``, how the items carry their ids (a store's record,
    :func:`~lightning_tda.data.ids.recorded_ids`); default: recognised, never positional.

    ``query_spec`` says how ``data`` is batched and which task describes it; ``task``, ``loss_fn``,
    ``batch_size`` and ``collate_fn`` are shorthands that override its fields
    (:meth:`QuerySpec.resolve`; defaults: the module's own task, 64, the default collate).
    ``of="measurement"`` differentiates ``task.measurement`` (queries; the loss unless the task
    measures something else), ``of="loss"`` ``task.per_example_loss`` (training examples).
    A transient progress bar labelled ``description`` counts batches (none for a single batch).

    Returns:
        ``(rows [Q, D] fp32 on the model's device, ids [Q] or None, values [Q])``: ``values`` are
        the differentiated measurements (or losses).
    """
    spec = QuerySpec.resolve(
        query_spec, task=task, loss_fn=loss_fn, batch_size=batch_size, collate_fn=collate_fn
    )
    if of not in ("measurement", "loss"):
        raise ValueError(f"of must be 'measurement' or 'loss', got {of!r}")
    fn = spec.measurement_for(model) if of == "measurement" else spec.loss_for(model)
    device = model_device(model)
    spec_ids, positional = ids if ids is not None else (ExampleIds(), False)
    feat = Featurizer(
        model, layers, config, fn, device, require_ids=False, bases=bases, example_ids=spec_ids
    )
    rows, ids, losses = [], [], []
    loader = spec.loader(data)
    total = _num_batches(loader)
    # the library's positions split off; other ids are read by the featurizer (queries may have none)
    batches = (
        batches_with_ids(loader, None, positional) if positional else ((None, b) for b in loader)
    )
    show = total is None or total > 1
    with (
        preserved_training_state(model),
        progress_bar(description, total, unit="batches", verbose=show, transient=True) as bar,
    ):
        for given, batch in batches:
            fb = feat(move_data_to_device(batch, device), given)
            rows.append(fb.rows)
            losses.append(fb.losses)
            ids.append(fb.ids)
            bar.advance()
    if not rows:
        raise ValueError("the query data is empty")
    out_ids = None if any(i is None for i in ids) else torch.cat(ids).cpu()
    return torch.cat(rows), out_ids, torch.cat(losses)


def _num_batches(batches: DataLoader | list) -> int | None:
    """``len(batches)``, or ``None`` for a loader of unknown length (iterable datasets)."""
    try:
        return len(batches)
    except TypeError:
        return None


__all__ = ["as_loader", "featurize_data", "loaded_state", "model_device"]
