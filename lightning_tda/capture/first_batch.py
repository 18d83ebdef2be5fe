"""Fail in seconds: the checks a logged fit runs on its first batch, before any optimizer step.

On one batch at the starting weights: the per-example loss is a finite ``[B]`` tensor with one value
per example id, it reaches every captured layer (forward hooks fire and the backward arrives), and
the projected rows (dense ``torch.func`` block included) are finite. The caller supplies the batch and
its ids and runs this under :func:`~lightning_tda.capture.featurize.preserved_training_state`, so the
check changes nothing training does next (gradients are taken with ``torch.autograd.grad``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_tda.capture.checks import _check_finite, _check_losses
from lightning_tda.capture.dense import DenseProjector
from lightning_tda.capture.hooks import LayerGradientHooks
from lightning_tda.capture.layers import DENSE, LayerSpec
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.projection import ProjectionConfig
from lightning_tda.errors import ConfigError, MissingExampleIdsError, NonFiniteError

LIBRARY_ERRORS = (ConfigError, MissingExampleIdsError, NonFiniteError)


def check_first_batch(
    model: nn.Module,
    layers: list[LayerSpec],
    config: ProjectionConfig,
    loss_fn: LossFn,
    batch: Any,
    ids: torch.Tensor,
    device: torch.device,
    *,
    positional: bool = False,
) -> None:
    """Check the loss, the captured layers and the projection on ``batch`` (ids ``[B]``).

    A PCA basis is not fitted yet at the first batch: the check projects with seeded random matrices
    of the same sizes. ``positional``: the ids were added by the library (the data has none), so a
    loss that fails on the batch most likely expects ``IndexedDataset`` batches; that is said.

    Raises:
        ValueError: the loss is not one value per example (``[B]``), or is not differentiable.
        NonFiniteError: a loss or projected gradient is NaN/Inf (the example ids are named).
        ConfigError: a captured layer is not reached by the loss (its rows would be zero).
        MissingExampleIdsError: ``positional`` and the loss raised on the batch.
    """
    cfg = replace(config, basis="random") if config.basis == "pca" else config
    hooks = LayerGradientHooks(model, layers, cfg, device)
    with torch.enable_grad(), hooks:
        losses = _first_losses(loss_fn, model, batch, positional)
        _check_losses(losses, ids)
        _check_differentiable(losses)
        items = hooks.output_gradients(losses)  # one backward: reach check and rows
        _check_layers_reached(hooks, items)
        rows, _ = hooks.project(losses, items)
    _check_finite(rows, ids, "gradient")
    dense = [s for s in layers if s.kind == DENSE]
    if dense:
        d_rows, _ = DenseProjector(model, dense[0], cfg, device)(loss_fn, batch)
        _check_finite(d_rows, ids, "gradient (dense block)")


def _first_losses(loss_fn: LossFn, model: nn.Module, batch: Any, positional: bool) -> Any:
    try:
        return loss_fn(model, batch)
    except LIBRARY_ERRORS:
        raise
    except Exception as err:
        if not positional:
            raise
        raise MissingExampleIdsError(
            "the attribution data carries no example ids, so GradientLogger numbered its items by "
            "position (0..N-1) and gave the per-example loss each batch exactly as the data yields it; "
            f"the loss failed on the first one ({type(err).__name__}: {err}). If the module expects "
            "IndexedDataset batches (`ids, (x, y) = batch`), wrap the data in lightning_tda.IndexedDataset; "
            "if the batches carry ids, say where: GradientLogger(example_ids=<position | key | fn>)."
        ) from err


def first_examples(batch: Any, ids: torch.Tensor, n: int) -> tuple[Any, torch.Tensor]:
    """The first ``n`` examples of ``batch`` (``ids`` ``[B]``): every tensor whose first dimension is
    ``B`` sliced to ``[:n]``. The batch is returned whole when it is small already or when any tensor
    in it has another first dimension (slicing it would guess how the batch is laid out).

    Example:
        >>> b, ids = first_examples({"x": torch.zeros(6, 3), "y": torch.arange(6)}, torch.arange(6), 2)
        >>> b["x"].shape, ids.tolist()
        (torch.Size([2, 3]), [0, 1])
    """
    size = ids.shape[0]
    if size <= n:
        return batch, ids
    leading: set[int] = set()
    apply_to_collection(batch, torch.Tensor, lambda t: leading.add(t.shape[0] if t.dim() else -1))
    if leading != {size}:
        return batch, ids
    try:
        head = apply_to_collection(batch, torch.Tensor, lambda t: t[:n])
    except (TypeError, ValueError):  # a batch type that cannot be rebuilt: check it whole
        return batch, ids
    return head, ids[:n]


def _check_differentiable(losses: torch.Tensor) -> None:
    if not losses.requires_grad:
        raise ValueError(
            "the per-example loss does not depend on any trainable parameter (computed under "
            "torch.no_grad() or detached?); return the differentiable per-example losses [B]."
        )


def _check_layers_reached(hooks: LayerGradientHooks, items: list) -> None:
    """Every captured layer ran forward with a grad-requiring output that the loss depends on
    (``items``: :meth:`LayerGradientHooks.output_gradients`)."""
    reached = {proj.spec.name for proj, _, _, g in items if g is not None}
    missed = [name for name in hooks.projectors if name not in reached]
    if missed:
        shown = ", ".join(missed[:6]) + (" ..." if len(missed) > 6 else "")
        raise ConfigError(
            f"the per-example loss does not reach {len(missed)} captured layer(s) ({shown}) on the first "
            "batch, so their rows would be zero. Exclude them (GradientLogger(exclude=[...])) or capture "
            "only the layers the loss uses (modules=[...])."
        )


__all__ = ["check_first_batch", "first_examples"]
