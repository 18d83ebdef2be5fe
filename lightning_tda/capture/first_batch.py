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
        _check_layers_reached(hooks, losses)
        rows, _ = hooks.projected_gradients(losses)
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


def _check_layers_reached(hooks: LayerGradientHooks, losses: torch.Tensor) -> None:
    """Every captured layer ran forward with a grad-requiring output that the loss depends on."""
    if not losses.requires_grad:
        raise ValueError(
            "the per-example loss does not depend on any trainable parameter (computed under "
            "torch.no_grad() or detached?); return the differentiable per-example losses [B]."
        )
    outputs = [(name, r.output) for name, p in hooks.projectors.items() for r in p.records]
    grads = (
        torch.autograd.grad(
            losses.sum(), [o for _, o in outputs], allow_unused=True, retain_graph=True
        )
        if outputs
        else ()
    )
    reached = {name for (name, _), g in zip(outputs, grads, strict=True) if g is not None}
    missed = [name for name in hooks.projectors if name not in reached]
    if missed:
        shown = ", ".join(missed[:6]) + (" ..." if len(missed) > 6 else "")
        raise ConfigError(
            f"the per-example loss does not reach {len(missed)} captured layer(s) ({shown}) on the first "
            "batch, so their rows would be zero. Exclude them (GradientLogger(exclude=[...])) or capture "
            "only the layers the loss uses (modules=[...])."
        )


__all__ = ["check_first_batch"]
