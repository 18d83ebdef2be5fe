"""Query-side featurization: load a checkpoint's saved state into the model and project gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tda.capture.basis import Bases
from lightning_tda.capture.featurize import Featurizer, preserved_training_state
from lightning_tda.capture.layers import LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.progress import progress_bar


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


def featurize_data(
    model: nn.Module,
    data: Any,
    layers: list[LayerSpec],
    config: ProjectionConfig,
    loss_fn: LossFn,
    batch_size: int = 64,
    collate_fn: Any = None,
    bases: Bases | None = None,
    *,
    description: str = "query gradients",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Projected gradients of every example in ``data`` at the model's current weights.

    A transient progress bar labelled ``description`` counts batches (none for a single batch).

    Returns:
        ``(rows [Q, D] fp32 on the model's device, ids [Q] or None, losses [Q])``.
    """
    device = model_device(model)
    feat = Featurizer(model, layers, config, loss_fn, device, require_ids=False, bases=bases)
    rows, ids, losses = [], [], []
    batches = as_loader(data, batch_size, collate_fn)
    total = _num_batches(batches)
    show = total is None or total > 1
    with (
        preserved_training_state(model),
        progress_bar(description, total, unit="batches", verbose=show, transient=True) as bar,
    ):
        for batch in batches:
            fb = feat(move_data_to_device(batch, device))
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
